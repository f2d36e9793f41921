"""The local LRU cache tier, on diskcache.

Only bytes this process verified get in (``put`` takes a verified Spool), so hits are served
without re-hashing: small ones from an in-process hot LRU or SQLite, large ones as open files
for sendfile. The directory is private (0700) and holds raw bytes only: the Disk below refuses
to store or load pickles, since diskcache would unpickle whatever it finds in its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import diskcache

from proxy.digest import Digest
from proxy.errors import ConfigError, TierError
from proxy.spool import SPOOL_PREFIX
from proxy.tier import Blob, BytesBlob, FileBlob, Payload, Role, Stat, Tier
from proxy.units import SizeArg, parse_size

DEFAULT_SIZE_LIMIT = 10 << 30
SPOOL_DIR = "spool"  # temp files live inside the cache so a commit is a hard link, not a copy


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
        self.path = os.path.abspath(path)
        self.spool_dir = os.path.join(self.path, SPOOL_DIR)
        self.size_limit = parse_size(size_limit)
        self.min_free = parse_size(min_free)
        self.hot = HotCache(parse_size(memory_limit), parse_size(memory_item_limit))
        self._file_threshold = parse_size(file_threshold)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"tier-{name}")
        self._cache: diskcache.Cache | None = None
        self.evictions = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        info = os.stat(self.path)
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"tier {self.name!r}: {self.path} is writable by others; the cache directory "
                "must be private (chmod 700) since its database is trusted"
            )
        # Leftover spool files are partial or unverified writes of a crashed process.
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        os.makedirs(self.spool_dir, mode=0o700, exist_ok=True)
        self._cache = diskcache.Cache(
            self.path,
            disk=RawDisk,
            size_limit=self.size_limit,
            disk_min_file_size=self._file_threshold,
            eviction_policy="least-recently-used",
            cull_limit=64,
            statistics=False,
        )

    async def close(self) -> None:
        if self._cache is not None:
            await self._run(self._cache.close)
        self._executor.shutdown(wait=False)

    @property
    def cache(self) -> diskcache.Cache:
        if self._cache is None:
            raise TierError(f"{self.name}: not started")
        return self._cache

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- the protocol --------------------------------------------------------------------

    async def open(self, digest: Digest) -> Blob | None:
        data = self.hot.get(digest)
        if data is not None:
            return BytesBlob(data)
        found = await self._run(self._read, digest)
        if found is None:
            return None
        if isinstance(found, bytes):
            return BytesBlob(found)
        file, size = found
        return FileBlob(file, size)

    def _read(self, digest: Digest) -> bytes | tuple[BinaryIO, int] | None:
        try:
            value: Any = self.cache.get(digest, read=True)
        except (OSError, ValueError) as error:  # file evicted under us, or a foreign entry
            raise TierError(f"{self.name}: {error}") from error
        if value is None:
            return None
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
        self._make_room(size)
        if data is not None:
            self.cache.set(digest, data)
            self.hot.add(digest, data)
        else:
            assert path is not None
            self.cache.set(digest, _LinkFrom(path), read=True)

    def _make_room(self, incoming: int) -> None:
        """Evict beyond size_limit when the filesystem's free space would drop below min_free."""
        if not self.min_free:
            return
        deficit = self.min_free + incoming - shutil.disk_usage(self.path).free
        if deficit <= 0:
            return
        cache = self.cache
        volume = cache.volume()
        cache.reset("size_limit", max(0, volume - deficit))
        try:
            before = len(cache)
            cache.cull()
            self.evictions += before - len(cache)
        finally:
            cache.reset("size_limit", self.size_limit)

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
