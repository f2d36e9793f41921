"""The local LRU cache tier: the Tier protocol over the index, the hot cache, eviction and
crash recovery (one module each in this package).

Only bytes this process verified get in (``put`` takes a verified Payload), each with its
checksum; whatever comes off the disk is checked against it (reads.py). Small hits are
served from an in-process hot LRU, large ones as open files for sendfile, checked alongside the
send. Size and entry counts are kept in memory, refreshed from the index off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

from proxy import metrics
from proxy.blocking import run_on
from proxy.digest import Digest
from proxy.errors import ConfigError, TierError
from proxy.store.spool import SPOOL_PREFIX
from proxy.tier import Blob, BytesBlob, FileBlob, Payload, Role, Stat, Tier, Usage
from proxy.tiers.disk import integrity, recovery, reserve
from proxy.tiers.disk.eviction import AccessTimes, make_room
from proxy.tiers.disk.generation import Generation
from proxy.tiers.disk.hot import HotCache
from proxy.tiers.disk.index import Index
from proxy.tiers.disk.reads import CheckedReads, LargeEntry
from proxy.units import SizeArg, parse_size

DEFAULT_SIZE_LIMIT = 10 << 30
# Seconds between writes of recent hits' access times, which also refresh the in-memory size
# and entry count (other workers write the same cache).
TOUCH_INTERVAL = 5.0
log = logging.getLogger(__name__)


class DiskTier(Tier):
    trusted = True
    can_store: ClassVar[bool] = True

    def __init__(
        self,
        path: str,
        *,
        name: str = "disk",
        role: Role = "cache",
        size_limit: SizeArg = DEFAULT_SIZE_LIMIT,
        min_free: SizeArg = 0,
        memory_limit: SizeArg = "64 MiB",
        memory_item_limit: SizeArg = "2 MiB",
        file_threshold: SizeArg = "32 KiB",
        threads: int = 8,
        timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.role = role
        self.timeout = timeout
        self.path = os.path.abspath(path)
        self.state_dir = self.path
        # The folder the store spools into (proxy.store.fills: state_dir/spool/<pid>); made, and
        # those of gone processes cleared, at start.
        self.spool_dir = os.path.join(self.path, recovery.SPOOL_DIR, str(os.getpid()))
        self.size_limit = parse_size(size_limit)
        self.min_free = parse_size(min_free)
        self.hot = HotCache(parse_size(memory_limit), parse_size(memory_item_limit))
        self._file_threshold = parse_size(file_threshold)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"tier-{name}")
        self._index: Index | None = None
        self._reads: CheckedReads | None = None
        self._generation: Generation | None = None
        self._access = AccessTimes()
        self._tasks: list[asyncio.Task[None]] = []
        self._bytes = 0  # the index's volume and entry count, as last read (off the loop)
        self._entries = 0
        self.evictions = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        started = time.time()
        await run_on(self._executor, self._open)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._touch_periodically()),
            loop.create_task(self._sweep(started)),  # start stays quick whatever the cache size
        ]

    def _open(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        info = os.stat(self.path)
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"tier {self.name!r}: {self.path} is writable by others; the cache directory "
                "must be private (chmod 700) since its database is trusted"
            )
        reserve.release_if_short(self.path)  # below, folders and the index's files are made
        self.spool_dir = recovery.claim_spool(self.path)
        self._index = Index(self.path, self.size_limit, self._file_threshold)
        self._reads = CheckedReads(self.name, self._index, self.hot, self._access, self._refresh_usage)
        self._generation = Generation(self.path)
        self.hot.clear(self._generation.current())
        self._refresh_usage()
        reserve.restore(self.path)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._index is not None:
            await run_on(self._executor, self._touch_recent)
            await run_on(self._executor, self._index.close)
            self._index = None
        if self._generation is not None:
            self._generation.close()
            self._generation = None
        await run_on(self._executor, shutil.rmtree, self.spool_dir, ignore_errors=True)
        self._executor.shutdown(wait=False)

    async def flush_access_times(self) -> None:
        """Write the access times of hits so far (done every few seconds anyway)."""
        await run_on(self._executor, self._touch_recent)

    async def _touch_periodically(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_INTERVAL)
            try:
                await self.flush_access_times()
            except Exception as error:  # noqa: BLE001 - LRU order only; retried next round
                log.warning("%s: could not record recent hits: %r", self.name, error)

    def _touch_recent(self) -> None:
        keys = self._access.take()
        if keys:
            self.index.touch(keys)
        self._refresh_usage()
        reserve.restore(self.path)  # given up when the disk was full, taken again once it is not

    async def _sweep(self, started: float) -> None:
        try:
            await run_on(self._executor, recovery.sweep_torn, self.index, started)
        except Exception as error:  # noqa: BLE001 - leftovers stay until the next start
            log.warning("%s: could not sweep torn entries: %r", self.name, error)

    @property
    def index(self) -> Index:
        if self._index is None:
            raise TierError(f"{self.name}: not started")
        return self._index

    @property
    def reads(self) -> CheckedReads:
        if self._reads is None:
            raise TierError(f"{self.name}: not started")
        return self._reads

    # -- the protocol --------------------------------------------------------------------

    def peek(self, digest: Digest) -> Blob | None:
        self._follow_purges()
        data = self.hot.get(digest)
        if data is None:
            return None
        self._access.record(digest)
        return BytesBlob(data)

    def _follow_purges(self) -> int:
        """Drop the hot cache if any process removed entries since it was filled (a memory
        read); the generation the hot cache now belongs to."""
        if self._generation is None:
            return self.hot.generation
        generation = self._generation.current()
        if generation != self.hot.generation:
            self.hot.clear(generation)
        return generation

    async def open(self, digest: Digest) -> Blob | None:
        blob = self.peek(digest)
        if blob is not None:
            return blob
        found = await run_on(self._executor, self._read, digest)
        if found is None or isinstance(found, bytes):
            return None if found is None else BytesBlob(found)
        entry = found

        def check() -> asyncio.Future[None]:
            # Its own descriptor: the sender may close the file before the check ends.
            fd = os.dup(entry.file.fileno())
            return asyncio.ensure_future(run_on(self._executor, self.reads.check_copy, digest, fd, entry))

        return FileBlob(entry.file, entry.size, check=check)

    def _read(self, digest: Digest) -> bytes | LargeEntry | None:
        return self.reads.read(digest, self._follow_purges())

    async def stat(self, digest: Digest) -> Stat | None:
        self._follow_purges()
        data = self.hot.get(digest)
        if data is not None:
            return Stat(len(data))
        return await run_on(self._executor, self._stat, digest)

    def _stat(self, digest: Digest) -> Stat | None:
        found = self._read(digest)
        if found is None or isinstance(found, bytes):
            return None if found is None else Stat(len(found))
        found.file.close()
        return Stat(found.size)

    async def put(self, digest: Digest, payload: Payload) -> None:
        try:
            await run_on(self._executor, self._put, digest, payload.data, payload.path, payload.size, payload.checksum)
        except OSError as error:
            raise TierError(f"{self.name}: cannot store {digest}: {error}") from error

    def _put(self, digest: Digest, data: bytes | None, path: str | None, size: int, checksum: str | None) -> None:
        generation = self._follow_purges()
        # A spool file is committed by hard link: it is on the filesystem already.
        fits = make_room(
            self.index,
            self.path,
            incoming=size,
            new_bytes=size if data is not None else 0,
            size_limit=self.size_limit,
            min_free=self.min_free,
            evicted=self._evicted,
        )
        if not fits:
            log.info("%s: %s (%d bytes) is larger than the cache may hold; not cached", self.name, digest, size)
            return
        if data is not None:
            self.index.set_bytes(digest, data, integrity.checksum(data))
            self.hot.add(digest, data, generation)
        else:
            assert path is not None
            if checksum is None:  # a file whose writer did not compute it: one more pass
                with open(path, "rb") as file:
                    checksum = integrity.file_checksum(file.fileno(), size)
            self.index.set_file(digest, path, checksum)
        self._refresh_usage()

    async def make_room(self, size: int) -> bool:
        return await run_on(self._executor, self._make_room, size)

    def _make_room(self, size: int) -> bool:
        """Room for a spool file about to grow by ``size`` bytes: its space is taken as it is
        written (a commit only links it), so min_free is kept from the first byte."""
        evictions = self.evictions
        fits = make_room(
            self.index,
            self.path,
            incoming=0,
            new_bytes=size,
            size_limit=self.size_limit,
            min_free=self.min_free,
            evicted=self._evicted,
        )
        if self.evictions != evictions:
            self._refresh_usage()
        return fits

    def _evicted(self, key: str) -> None:
        self.evictions += 1
        metrics.EVICTIONS.labels(self.name).inc()
        self.hot.discard(key)

    async def delete(self, digest: Digest) -> bool:
        self.hot.discard(digest)
        return await run_on(self._executor, self._delete, digest)

    def _delete(self, digest: Digest) -> bool:
        removed = self.index.delete(digest)
        if removed:
            self._removed()
        return removed

    def _removed(self) -> None:
        """Entries were removed on purpose: every process drops what it holds in memory."""
        assert self._generation is not None
        self._generation.bump()
        self._refresh_usage()
        reserve.restore(self.path)

    async def check(self) -> tuple[int, list[str]]:
        """Hash every entry again and remove the ones whose bytes no longer match their name
        (bit rot, a file changed by hand). Returns how many were checked and what was removed."""
        return await run_on(self._executor, self._check)

    def _check(self) -> tuple[int, list[str]]:
        checked, removed = integrity.recheck(self.index)
        for key in removed:
            self.hot.discard(key)
        if removed:
            self._removed()
        return checked, removed

    # -- reporting -----------------------------------------------------------------------

    def _refresh_usage(self) -> None:
        self._bytes, self._entries = self.index.volume(), self.index.count()

    async def ready(self) -> bool:
        return await run_on(self._executor, _writable, self.spool_dir)

    def usage(self) -> Usage:
        return Usage(self._bytes, self.size_limit, self._entries, self.evictions)

    def describe(self) -> dict[str, object]:
        return {
            "path": self.path,
            "size": self._bytes,
            "size_limit": self.size_limit,
            "min_free": self.min_free,
            "entries": self._entries,
            "evictions": self.evictions,
            # found corrupt on disk and evicted by this process, on both read paths
            "corrupt_evicted": self._reads.corrupt if self._reads is not None else 0,
            "memory_size": self.hot.size,
            "memory_limit": self.hot.limit,
        }


def _writable(folder: str) -> bool:
    probe = os.path.join(folder, f"{SPOOL_PREFIX}probe")
    try:
        with open(probe, "wb") as file:
            file.write(b"ok")
        os.unlink(probe)
    except OSError:
        return False
    return True
