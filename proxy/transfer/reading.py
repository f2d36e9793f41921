"""How an export reads a blob through the store: once, verified whole, for several targets
(Shared), or as it arrives, for the one target that wants it (StoreBlob). Either way every byte
is verified, and nothing read fills the caches."""

from __future__ import annotations

from collections.abc import AsyncIterator

from proxy.digest import Digest
from proxy.errors import CorruptBlob, UpstreamFailed
from proxy.store.composite import Composite
from proxy.store.opened import Opened
from proxy.store.spool import MemoryBudget, Spool
from proxy.tier import Blob, FileBlob
from proxy.transfer.reporting import caused_by


class Shared:
    """A verified blob several targets read, each from the start (a file read with pread, or
    bytes in memory counted against the transfer's memory budget); closed when the last target
    lets go."""

    def __init__(self, blob: Blob, size: int, budget: MemoryBudget | None = None) -> None:
        self.blob = blob
        self.size = size
        self._budget = budget  # holds ``size`` of it, for bytes in memory
        self._refs = 1

    def acquire(self) -> Shared:
        self._refs += 1
        return self

    def chunks(self) -> AsyncIterator[bytes]:
        return self.blob.chunks()

    async def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            if self._budget is not None:
                self._budget.give(self.size)
            await self.blob.close()


async def read_once(store: Composite, digest: Digest, budget: MemoryBudget) -> Shared:
    """The blob read once through the store and verified whole, for several targets. Bytes
    in memory beyond the memory budget go to a file, to wait there for a slow target."""
    opened = await store.open(digest, cache=False)
    try:
        blob = await opened.verified()
    finally:
        await opened.close()
    size = blob.size
    if size is None:  # not a verified Bytes/FileBlob: never the case, but never guessed at
        await blob.close()
        raise UpstreamFailed(f"{opened.tier} does not know the size of {digest}")
    if isinstance(blob, FileBlob):
        return Shared(blob, size)
    if budget.take(size):
        return Shared(blob, size, budget)
    spool = Spool(digest, store.spool_dir, memory_limit=0)
    try:
        async for chunk in blob.chunks():
            await spool.write(chunk)
        await spool.finish()
        return Shared(spool.blob(), size)
    finally:
        spool.release()  # the blob's own handle keeps the file readable
        await blob.close()


class StoreBlob:
    """A blob read through the store for export, with its size known before the first byte.

    A trusted hit (the disk cache) is read as it is. A fill is followed as it arrives (the
    store holds its last byte back until the whole copy is verified), or, with ``whole``, waited
    for until verified, for targets that cannot take back what they wrote. Read without filling
    the caches: an export passes over every blob once and must not push the hot ones out of
    the disk cache (SPEC 7)."""

    def __init__(self, opened: Opened, size: int, whole: Blob | None = None) -> None:
        self.opened = opened
        self.size = size
        self._whole = whole  # the verified blob, when waited for

    @classmethod
    async def open(cls, store: Composite, digest: Digest, *, whole: bool) -> StoreBlob:
        opened = await store.open(digest, cache=False)
        try:
            if not whole and opened.size is not None:
                return cls(opened, opened.size)
            blob = await opened.verified()
            if blob.size is None:
                await blob.close()
                raise UpstreamFailed(f"{opened.tier} does not know the size of {digest}")
            return cls(opened, blob.size, blob)
        except BaseException:
            await opened.close()
            raise

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._whole.chunks() if self._whole is not None else self.opened.chunks():
                yield chunk
        except UpstreamFailed as error:
            if caused_by(error, CorruptBlob):
                raise CorruptBlob(error.detail) from error
            raise

    async def close(self) -> None:
        if self._whole is not None:
            await self._whole.close()
            self._whole = None
        await self.opened.close()
