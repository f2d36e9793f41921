"""A blob being received: hashed as it arrives, held in memory while small, spilled to a
temp file when large, readable by many readers while it is still growing.

Readers share the spool by reference (``acquire``/``release``): the temp file is removed when
the last one lets go, so a commit into the cache can never pull it from under a reader.

Given ``room``, the file never grows unnoticed: room is claimed before its bytes are written
(SPEC 3 min_free). When the filesystem has none, the blob is kept in memory instead as far as
the budget allows; past that the spool fails with SpoolUnwritable (readers pass it through).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import BinaryIO

import xxhash

from proxy.blocking import run
from proxy.digest import Algorithm, Digest
from proxy.errors import CorruptBlob, TooLarge
from proxy.tier import CHUNK_SIZE, Blob, BytesBlob, FileBlob

SPOOL_PREFIX = "spool-"
# Bytes hashed on the loop at most at once (~0.1 ms of SHA-1); more go to the executor.
HASH_INLINE_MAX = 256 << 10
_IOV_MAX = 1024  # buffers one writev takes at most (Linux's IOV_MAX)
# Room for a file of unknown final size is claimed this far ahead: one claim (an executor hop,
# maybe evictions) per step, not per write.
ROOM_STEP = 8 << 20
# Makes room for this many more bytes on the spool's filesystem (the disk cache evicts to keep its
# min_free, SPEC 3); False when it cannot.
Room = Callable[[int], Awaitable[bool]]


class MemoryBudget:
    """How many bytes all spools together may keep in memory; beyond it they use files.

    Keeping a blob in memory takes the disk write off the client's path (the cache commit
    writes it afterwards); the budget bounds what many concurrent misses can hold."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used + size <= self.limit

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class SpoolUnwritable(Exception):
    """The spool's filesystem refused the bytes (full, read-only, gone): a failure of this
    machine, never of the tier the bytes came from."""


class SpoolFailed(Exception):
    """The bytes being spooled turned out bad or stopped coming; readers must abort."""


class FileRoom:
    """The room a spool's file may grow into, claimed from the folder's owner (the disk cache,
    which evicts to keep its min_free) before the bytes are written: all at once when the tier
    announced the size, else a step ahead."""

    def __init__(self, room: Room | None, directory: str | None) -> None:
        self.expected: int | None = None  # the size the tier announced, if it did
        self._room = room
        self._directory = directory
        self._granted = 0  # the file size room was made for

    async def claim(self, size: int, on_disk: int) -> bool:
        """Room for a file of ``size`` bytes, ``on_disk`` of which it holds already."""
        if self._room is None or size <= self._granted:
            return True
        wants = [max(size, self.expected or self._granted + ROOM_STEP), size]
        for want in dict.fromkeys(wants):  # the step ahead, else just what this write needs
            try:
                made = await self._room(want - on_disk)
            except Exception as error:  # this machine failing, never the tier it reads
                raise SpoolUnwritable(f"cannot make room in {self._directory}: {error!r}") from error
            if made:
                self._granted = want
                return True
        return False


class Spool:
    """Write-once buffer for one blob. ``finish()`` verifies the digest; until then readers
    may tail it (``chunks``) and must treat SpoolFailed as "abort what you sent"."""

    def __init__(
        self,
        digest: Digest | None,
        directory: str | None = None,
        memory_limit: int = CHUNK_SIZE,
        max_size: int | None = None,
        algorithm: Algorithm = "sha1",
        budget: MemoryBudget | None = None,
        room: Room | None = None,
    ) -> None:
        # With no digest to check against (POST uploads), finish() names the blob instead.
        self.expected = digest
        self.digest: Digest | None = digest
        self.size = 0
        self.path: str | None = None
        self.verified = False
        self.failed: BaseException | None = None
        self._directory = directory
        self._memory_limit = memory_limit
        self._budget = budget
        self._reserved = 0  # bytes of the budget this spool holds
        self._max_size = max_size
        self._room = FileRoom(room, directory)
        self._hasher = hashlib.new(digest.algorithm if digest else algorithm)
        # The disk cache's checksum (SPEC 4) of the same bytes, so a commit reads nothing again.
        self._fast = xxhash.xxh3_64()
        self.checksum: str | None = None  # of the verified bytes, when they went to a file
        self._memory: bytearray | None = bytearray()
        self._frozen: bytes | None = None  # the verified bytes, when they stayed in memory
        # Received, not yet hashed or written: kept as they came, for one writev and a hash in a thread.
        self._pending: list[bytes] = []
        self._pending_size = 0
        # Kept in memory, not yet hashed: hashed in blocks in the executor, off the loop.
        self._unhashed: list[bytes] = []
        self._unhashed_size = 0
        self._fd: int | None = None
        self._refs = 1  # the writer's
        self._changed = asyncio.Event()

    # -- writing -------------------------------------------------------------------------

    async def write(self, chunk: bytes) -> None:
        received = self.received + len(chunk)
        if self._max_size is not None and received > self._max_size:
            raise TooLarge(f"more than {self._max_size} bytes")
        if self._memory is not None and received <= self._memory_limit and self._reserve(len(chunk)):
            await self._keep([chunk], len(chunk))
            return
        # Network bodies arrive in small pieces: gather a block before each hop to the executor.
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= CHUNK_SIZE:
            await self._flush()

    @property
    def received(self) -> int:
        """Bytes written so far, including those not yet visible to readers."""
        return self.size + self._pending_size

    async def _keep(self, chunks: list[bytes], size: int) -> None:
        """Keep bytes (reserved from the budget) in memory: readers see them at once."""
        assert self._memory is not None
        for chunk in chunks:
            self._memory += chunk
        self.size += size
        self._notify()
        self._unhashed += chunks
        self._unhashed_size += size
        if self._unhashed_size >= HASH_INLINE_MAX:
            await self._hash_unhashed()

    async def _hash_unhashed(self) -> None:
        chunks, self._unhashed, size, self._unhashed_size = self._unhashed, [], self._unhashed_size, 0
        if size < HASH_INLINE_MAX:
            _update_all(self._hasher, self._fast, chunks)  # cheaper than the hop to a thread
        else:
            await run(_update_all, self._hasher, self._fast, chunks)

    async def expect(self, size: int) -> None:
        """The tier announced ``size`` bytes: past max_size TooLarge (nothing evicted for it); else
        room claimed for all, or memory if the budget can, or SpoolUnwritable (SPEC 4: passed through)."""
        if self._max_size is not None and size > self._max_size:
            raise TooLarge(f"{size} bytes announced, more than {self._max_size}")
        self._room.expected = size
        if size <= self._memory_limit or await self._room.claim(size, 0):
            return
        if self._budget is None or not self._budget.fits(size):  # no budget: memory is not for it
            raise SpoolUnwritable(f"no room for {size} bytes on disk or in the spool's memory budget")
        self._memory_limit = sys.maxsize  # the budget still bounds it

    async def _keep_in_memory(self) -> None:
        """No room for the file: keep the blob in memory from now on, if it has no file yet."""
        block, size, self._pending, self._pending_size = self._pending, self._pending_size, [], 0
        if self._memory is None or self._budget is None or not self._reserve(size):
            raise SpoolUnwritable(f"no room to spool {self.received + size} bytes, on disk or in memory")
        self._memory_limit = sys.maxsize  # the budget still bounds it
        await self._keep(block, size)

    async def _flush(self) -> None:
        if not await self._room.claim(self.received, 0 if self._memory is not None else self.size):
            await self._keep_in_memory()
            return
        await self._hash_unhashed()  # the bytes kept in memory so far come first
        block, size, self._pending, self._pending_size = self._pending, self._pending_size, [], 0
        loop = asyncio.get_running_loop()
        # hashlib and os.writev both release the GIL: hash and write the block at the same time,
        # in two threads, so verification costs max(hash, write) instead of their sum.
        hashed = loop.run_in_executor(None, _update_all, self._hasher, self._fast, block)
        try:
            await asyncio.gather(hashed, loop.run_in_executor(None, self._write_to_file, block))
        except OSError as error:
            await asyncio.gather(hashed, return_exceptions=True)  # the hasher must be idle
            raise SpoolUnwritable(f"cannot spool to {self._directory or 'the temp folder'}: {error}") from error
        if self._memory is not None:
            self._memory = None  # switched here, on the loop, so readers never see it half-done
            self._unreserve()
        self.size += size
        self._notify()

    def _write_to_file(self, chunks: list[bytes]) -> None:
        if self._fd is None:
            if self._directory:
                os.makedirs(self._directory, mode=0o700, exist_ok=True)
            self._fd, self.path = tempfile.mkstemp(prefix=SPOOL_PREFIX, dir=self._directory)
            if self._memory:
                _write_all(self._fd, [self._memory])
        _write_all(self._fd, chunks)

    async def finish(self) -> None:
        """Check the digest: verified on a match, otherwise the spool fails with CorruptBlob."""
        if self._pending:
            await self._flush()
        await self._hash_unhashed()
        actual = Digest(self._hasher.hexdigest())
        if self.expected is not None and actual != self.expected:
            error = CorruptBlob(f"bytes hash to {actual}, not {self.expected}")
            self.fail(error)
            raise error
        self.digest = actual
        if self.path is not None:
            self.checksum = self._fast.hexdigest()
        if self._memory is not None:
            # Freeze once: consumers (responses, cache commits) share these bytes, no copies.
            self._frozen, self._memory = bytes(self._memory), bytearray()
        self.verified = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        if not self.verified:
            self.failed = error
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- sharing -------------------------------------------------------------------------

    def acquire(self) -> Spool:
        if self._refs <= 0:
            raise RuntimeError("spool already released")
        self._refs += 1
        return self

    def _reserve(self, size: int) -> bool:
        if self._budget is None:
            return True
        if not self._budget.take(size):
            return False
        self._reserved += size
        return True

    def _unreserve(self) -> None:
        if self._budget is not None:
            self._budget.give(self._reserved)
        self._reserved = 0

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            self._unreserve()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    # -- reading -------------------------------------------------------------------------

    @property
    def data(self) -> bytes | None:
        """The whole verified blob when it stayed in memory, else None (it is in ``path``)."""
        return self._frozen

    def blob(self) -> Blob:
        """The verified bytes as a whole blob with its own handle: it stays readable after the
        spool is released (an open file outlives its unlink)."""
        if not self.verified:
            raise RuntimeError("only a verified spool is a blob")
        if self._frozen is not None:
            return BytesBlob(self._frozen)
        file = self.open()
        assert file is not None
        return FileBlob(file, self.size)

    def open(self) -> BinaryIO | None:
        """A private read handle on the spilled file; valid while a reference is held."""
        if self.path is None or self._memory is not None:
            return None
        return open(self.path, "rb")

    async def wait_for_size(self, size: int) -> None:
        """Wait until ``size`` bytes arrived, or the spool is verified or failed."""
        while self.size < size and not self.verified and self.failed is None:
            await self._changed.wait()

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) as they arrive; raises SpoolFailed if the blob goes bad.
        The caller holds a reference for as long as it iterates."""
        loop = asyncio.get_running_loop()
        offset = start
        while True:
            if self.failed is not None:
                raise SpoolFailed(str(self.failed)) from self.failed
            stop = self.size if end is None else min(end, self.size)
            if not self.verified:
                # Hold back the answer's last byte until the digest is checked: a client must
                # never get a complete body (all of Content-Length) of bytes that turn out wrong,
                # a range that ends before the blob does included.
                stop = min(stop, self.size - 1, stop if end is None else end - 1)
            if offset < stop:
                count = min(CHUNK_SIZE, stop - offset)
                if self._frozen is not None:
                    chunk = self._frozen[offset : offset + count]
                elif self._memory is not None:
                    chunk = bytes(memoryview(self._memory)[offset : offset + count])  # one copy
                else:
                    assert self._fd is not None
                    chunk = await loop.run_in_executor(None, os.pread, self._fd, count, offset)
                offset += len(chunk)
                yield chunk
            elif self.verified or (end is not None and offset >= end):
                return
            else:
                await self._changed.wait()


def _update_all(hasher: hashlib._Hash, fast: xxhash.xxh3_64, chunks: list[bytes] | list[bytes | bytearray]) -> None:
    for chunk in chunks:
        hasher.update(chunk)
        fast.update(chunk)


def _write_all(fd: int, chunks: list[bytes] | list[bytearray]) -> None:
    views = [memoryview(chunk) for chunk in chunks if chunk]
    while views:
        written = os.writev(fd, views[:_IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]
