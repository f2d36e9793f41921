"""The local LRU cache tier, on diskcache.

Only bytes this process verified get in (``put`` takes a verified Spool), so hits are served
without re-hashing: small ones from an in-process hot LRU or SQLite, large ones as open files
for sendfile. The directory is private (0700) and holds raw bytes only: the Disk below refuses
to store or load pickles, since diskcache would unpickle whatever it finds in its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import diskcache

from proxy import metrics
from proxy.digest import Digest
from proxy.errors import BadDigest, ConfigError, TierError
from proxy.store.spool import SPOOL_PREFIX
from proxy.tier import Blob, BytesBlob, FileBlob, Payload, Role, Stat, Tier
from proxy.units import SizeArg, parse_size

DEFAULT_SIZE_LIMIT = 10 << 30
TOUCH_INTERVAL = 5.0  # seconds between writes of recent hits' access times
log = logging.getLogger(__name__)
SPOOL_DIR = "spool"  # temp files live inside the cache so a commit is a hard link, not a copy
FILL_LOCKS = "fills.lock"  # see proxy.store.fill_locks
_SPOOL_LOCK = ".lock"
_SPOOL_GRACE = 60.0  # seconds a new spool folder may go without its lock file (being created)


class _LinkFrom:
    """A verified file to move into the cache by hard link (copy across filesystems)."""

    def __init__(self, path: str) -> None:
        self.path = path


class RawDisk(diskcache.Disk):  # type: ignore[misc]
    """Keys are digest strings and values raw bytes; nothing is ever pickled or unpickled."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if not isinstance(key, str):
            raise TypeError("disk tier keys are digest strings")
        return str(key), True  # plain str: sqlite3 does not adapt subclasses

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise ValueError("refusing a pickled key from the cache database")
        return key

    def store(self, value: Any, read: bool, key: Any = diskcache.UNKNOWN) -> tuple[Any, ...]:
        if isinstance(value, _LinkFrom):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            try:
                os.link(value.path, full_path)
            except OSError:
                shutil.copyfile(value.path, full_path)
            return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None
        if type(value) is not bytes:
            raise TypeError("disk tier values are bytes")
        return super().store(value, read, key)  # type: ignore[no-any-return]

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise ValueError(f"refusing cache entry of mode {mode}: not raw bytes")
        return super().fetch(mode, filename, value, read)


class HotCache:
    """A small in-process LRU of small blobs: a hit costs no file open and no thread hop."""

    def __init__(self, limit: int, item_limit: int) -> None:
        self.limit = limit
        self.item_limit = item_limit
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()  # filled from executor threads, read on the loop

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            with contextlib.suppress(KeyError):  # evicted meanwhile: still a good copy
                self._items.move_to_end(key)
        return data

    def add(self, key: str, data: bytes) -> None:
        if len(data) > self.item_limit or len(data) > self.limit:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self.size += len(data)
            while self.size > self.limit:
                _, old = self._items.popitem(last=False)
                self.size -= len(old)

    def discard(self, key: str) -> None:
        with self._lock:
            data = self._items.pop(key, None)
            if data is not None:
                self.size -= len(data)


class DiskTier(Tier):
    trusted = True
    can_store = True

    def __init__(
        self,
        path: str,
        *,
        name: str = "disk",
        role: Role = "cache",
        size_limit: SizeArg = DEFAULT_SIZE_LIMIT,
        min_free: SizeArg = 0,
        memory_limit: SizeArg = "64 MiB",
        memory_item_limit: SizeArg = "256 KiB",
        file_threshold: SizeArg = "32 KiB",
        threads: int = 8,
        timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.role = role
        self.timeout = timeout
        self.path = self.state_dir = os.path.abspath(path)
        # Every process (worker) spools into its own folder, so one starting cannot clear
        # another's writes in progress.
        self.spool_root = os.path.join(self.path, SPOOL_DIR)
        self.spool_dir = os.path.join(self.spool_root, str(os.getpid()))
        self.fill_lock_path = os.path.join(self.path, FILL_LOCKS)
        self._spool_lock: int | None = None
        self.size_limit = parse_size(size_limit)
        self.min_free = parse_size(min_free)
        self.hot = HotCache(parse_size(memory_limit), parse_size(memory_item_limit))
        self._file_threshold = parse_size(file_threshold)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"tier-{name}")
        self._cache: diskcache.Cache | None = None
        self._reader: diskcache.Cache | None = None
        self._touched: set[str] = set()  # hits whose access time is not written yet
        self._toucher: asyncio.Task[None] | None = None
        self.evictions = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self._run(self._open)
        self._toucher = asyncio.get_running_loop().create_task(self._touch_periodically())

    def _open(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        info = os.stat(self.path)
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"tier {self.name!r}: {self.path} is writable by others; the cache directory "
                "must be private (chmod 700) since its database is trusted"
            )
        self._claim_spool()
        self._cache = diskcache.Cache(
            self.path,
            disk=RawDisk,
            size_limit=self.size_limit,
            disk_min_file_size=self._file_threshold,
            eviction_policy="least-recently-used",
            cull_limit=0,  # evicting is ours (_make_room): diskcache's drops entries in batches
            statistics=False,
        )
        # diskcache's LRU writes access_time in a transaction on every get, so hits would queue
        # on SQLite's write lock. Reads use a second handle whose policy (in memory only) is
        # "none" (a plain SELECT); hits are recorded and their access times written in batches.
        self._reader = diskcache.Cache(self.path, disk=RawDisk)
        self._reader.reset("eviction_policy", "none", update=False)

    def _claim_spool(self) -> None:
        """Make this process's spool folder, locked while it runs. A folder whose lock is free
        belonged to a process that died: its files are partial or unverified writes."""
        os.makedirs(self.spool_root, mode=0o700, exist_ok=True)
        for entry in os.scandir(self.spool_root):
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)  # the single-process layout of earlier versions
            elif entry.path == self.spool_dir or _abandoned(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)
        os.makedirs(self.spool_dir, mode=0o700)
        fd = os.open(os.path.join(self.spool_dir, _SPOOL_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._spool_lock = fd

    async def close(self) -> None:
        if self._toucher is not None:
            self._toucher.cancel()
        if self._cache is not None:
            await self._run(self._touch_recent)
            await self._run(self._cache.close)
            await self._run(self.reader.close)
        if self._spool_lock is not None:
            shutil.rmtree(self.spool_dir, ignore_errors=True)
            os.close(self._spool_lock)
            self._spool_lock = None
        self._executor.shutdown(wait=False)

    async def flush_access_times(self) -> None:
        """Write the access times of hits so far (done every few seconds anyway)."""
        await self._run(self._touch_recent)

    async def _touch_periodically(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_INTERVAL)
            try:
                await self.flush_access_times()
            except Exception as error:  # noqa: BLE001 - LRU order only; retried next round
                log.warning("%s: could not record recent hits: %r", self.name, error)

    def _touch_recent(self) -> None:
        """Write the access times of recent hits in one transaction (the LRU order)."""
        touched, self._touched = self._touched, set()
        if not touched:
            return
        with self.cache.transact():
            for key in touched:
                found = self.cache.get(key, read=True)  # the LRU policy updates access_time
                if found is not None and not isinstance(found, bytes):
                    found.close()

    @property
    def cache(self) -> diskcache.Cache:
        if self._cache is None:
            raise TierError(f"{self.name}: not started")
        return self._cache

    @property
    def reader(self) -> diskcache.Cache:
        if self._reader is None:
            raise TierError(f"{self.name}: not started")
        return self._reader

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the protocol --------------------------------------------------------------------

    def peek(self, digest: Digest) -> Blob | None:
        data = self.hot.get(digest)
        if data is None:
            return None
        self._touched.add(digest)
        return BytesBlob(data)

    async def open(self, digest: Digest) -> Blob | None:
        blob = self.peek(digest)
        if blob is not None:
            return blob
        found = await self._run(self._read, digest)
        if found is None:
            return None
        if isinstance(found, bytes):
            return BytesBlob(found)
        file, size = found
        return FileBlob(file, size)

    def _read(self, digest: Digest) -> bytes | tuple[BinaryIO, int] | None:
        try:
            value: Any = self.reader.get(digest, read=True)
        except (OSError, ValueError) as error:  # file evicted under us, or a foreign entry
            raise TierError(f"{self.name}: {error}") from error
        if value is None:
            return None
        self._touched.add(digest)
        if isinstance(value, bytes):
            self.hot.add(digest, value)
            return value
        size = os.fstat(value.fileno()).st_size
        if size <= self.hot.item_limit:
            with value:
                data: bytes = value.read()
            self.hot.add(digest, data)
            return data
        return value, size

    async def stat(self, digest: Digest) -> Stat | None:
        data = self.hot.get(digest)
        if data is not None:
            return Stat(len(data))
        return await self._run(self._stat, digest)  # type: ignore[no-any-return]

    def _stat(self, digest: Digest) -> Stat | None:
        found = self._read(digest)
        if found is None:
            return None
        if isinstance(found, bytes):
            return Stat(len(found))
        file, size = found
        file.close()
        return Stat(size)

    async def put(self, digest: Digest, payload: Payload) -> None:
        try:
            await self._run(self._put, digest, payload.data, payload.path, payload.size)
        except OSError as error:
            raise TierError(f"{self.name}: cannot store {digest}: {error}") from error

    def _put(self, digest: Digest, data: bytes | None, path: str | None, size: int) -> None:
        # A spool file is committed by hard link: it is on the filesystem already.
        if not self._make_room(size, new_bytes=size if data is not None else 0):
            log.info("%s: %s (%d bytes) is larger than the cache may hold; not cached", self.name, digest, size)
            return
        if data is not None:
            self.cache.set(digest, data)
            self.hot.add(digest, data)
        else:
            assert path is not None
            self.cache.set(digest, _LinkFrom(path), read=True)

    def _make_room(self, incoming: int, new_bytes: int) -> bool:
        """Evict least recently used entries, one at a time, until ``incoming`` bytes fit under
        size_limit and writing ``new_bytes`` leaves min_free; False if that cannot be done."""
        cache = self.cache
        while True:
            over = cache.volume() + incoming - self.size_limit
            if self.min_free:
                over = max(over, self.min_free + new_bytes - shutil.disk_usage(self.path).free)
            if over <= 0:
                return True
            # diskcache has no public "least recently used key"; its schema has been stable
            # since 4.0 (access_time is what its own LRU culling orders by).
            row = cache._sql("SELECT key FROM Cache ORDER BY access_time LIMIT 1").fetchone()
            if row is None:
                return False
            if cache.delete(row[0]):
                self.evictions += 1
                metrics.EVICTIONS.labels(self.name).inc()
                self.hot.discard(row[0])

    async def check(self) -> tuple[int, list[str]]:
        """Hash every entry again and remove the ones whose bytes no longer match their name
        (bit rot, a file changed by hand). Returns how many were checked and what was removed."""
        return await self._run(self._check)  # type: ignore[no-any-return]

    def _check(self) -> tuple[int, list[str]]:
        checked, removed = 0, []
        for key in list(self.reader.iterkeys()):
            checked += 1
            try:
                good = _hashes_to_its_name(key, self.reader.get(key, read=True))
            except (OSError, ValueError, BadDigest):  # its file is gone, or not a blob of ours
                good = False
            if not good and self.cache.delete(key):
                self.hot.discard(key)
                removed.append(str(key))
                log.warning("%s: removed %s: its bytes do not hash to its name", self.name, key)
        return checked, removed

    async def delete(self, digest: Digest) -> bool:
        self.hot.discard(digest)
        return bool(await self._run(self.cache.delete, digest))

    # -- reporting -----------------------------------------------------------------------

    def writable(self) -> bool:
        probe = os.path.join(self.spool_dir, f"{SPOOL_PREFIX}probe")
        try:
            with open(probe, "wb") as file:
                file.write(b"ok")
            os.unlink(probe)
        except OSError:
            return False
        return True

    def describe(self) -> dict[str, object]:
        cache = self._cache
        return {
            "path": self.path,
            "size": cache.volume() if cache is not None else 0,
            "size_limit": self.size_limit,
            "min_free": self.min_free,
            "entries": len(cache) if cache is not None else 0,
            "evictions": self.evictions,
            "memory_size": self.hot.size,
            "memory_limit": self.hot.limit,
        }


def _abandoned(folder: str) -> bool:
    """True if the process that made this spool folder is gone (its lock is free)."""
    try:
        fd = os.open(os.path.join(folder, _SPOOL_LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # Made a moment ago by a process that has not locked it yet, or left by a crash then.
        with contextlib.suppress(FileNotFoundError):
            return time.time() - os.stat(folder).st_mtime > _SPOOL_GRACE
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases the lock just taken
    return True


def _hashes_to_its_name(key: object, value: bytes | BinaryIO | None) -> bool:
    if value is None:
        return True  # evicted while the check ran
    hasher = Digest.parse(str(key)).hasher()
    if isinstance(value, bytes):
        hasher.update(value)
    else:
        with value:
            while chunk := value.read(1 << 20):
                hasher.update(chunk)
    return Digest.parse(str(key)).matches(hasher)
