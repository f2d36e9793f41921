"""The answer to ``Composite.open``: one type, whether the blob was found whole in a trusted
tier or is still arriving in a fill, so callers never branch on where it came from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from proxy.digest import Digest
from proxy.store.fills import Fill, Uncacheable
from proxy.tier import Blob


class Opened(ABC):
    """An open blob. Close it when done: it holds a file, a connection or a place in a fill."""

    def __init__(self, digest: Digest, tier: str, hit: bool) -> None:
        self.digest = digest
        self.tier = tier  # the name of the tier that had it (once verified: whose copy verified)
        self.hit = hit  # from a cache tier (X-Cache: HIT) rather than fetched from a source

    @property
    @abstractmethod
    def size(self) -> int | None:
        """The size in bytes, if known before the bytes are."""

    @abstractmethod
    async def verified(self) -> Blob:
        """The whole blob once verified: in memory (BytesBlob) or a local file (FileBlob, for
        sendfile). The caller owns it: close it, or hand it to what closes it. Raises NotFound
        or UpstreamFailed when no tier had a good copy, and Uncacheable when this machine can
        hold it neither on disk nor in memory: ``chunks`` then passes it through."""

    @abstractmethod
    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) as they arrive. The last byte is held back until the blob is
        verified; a copy that turns out bad raises UpstreamFailed: discard what was received."""

    @abstractmethod
    async def streams_past(self, threshold: int) -> bool:
        """True if the blob is still arriving and is larger than ``threshold`` bytes (waiting,
        when its size is unknown, until it proves so): worth sending before it is verified."""

    @abstractmethod
    async def close(self) -> None: ...

    async def read(self) -> bytes:
        """All the bytes, verified."""
        try:
            blob = await self.verified()
        except Uncacheable:  # the caller wants them in memory anyway; the last chunk is verified
            return b"".join([chunk async for chunk in self.chunks()])
        return await blob.read()

    async def __aenter__(self) -> Opened:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Found(Opened):
    """A blob a trusted tier holds whole, verified when it was stored."""

    def __init__(self, digest: Digest, tier: str, hit: bool, blob: Blob) -> None:
        super().__init__(digest, tier, hit)
        self._blob: Blob | None = blob
        self._size = blob.size

    @property
    def size(self) -> int | None:
        return self._size

    async def verified(self) -> Blob:
        blob, self._blob = self._blob, None  # handed over: the caller closes it now
        if blob is None:
            raise RuntimeError("the blob was handed over already")
        return blob

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if self._blob is None:
            raise RuntimeError("the blob was handed over already")
        offset = start
        async for chunk in self._blob.chunks(start):
            if end is not None and offset + len(chunk) >= end:
                yield chunk[: end - offset]
                return
            offset += len(chunk)
            yield chunk

    async def streams_past(self, threshold: int) -> bool:
        return False

    async def close(self) -> None:
        if self._blob is not None:
            blob, self._blob = self._blob, None
            await blob.close()


class Arriving(Opened):
    """A blob a fill is receiving from a tier, hashed as it arrives."""

    def __init__(self, digest: Digest, tier: str, hit: bool, fill: Fill) -> None:
        super().__init__(digest, tier, hit)
        self._fill: Fill | None = fill  # attached: see Fill

    @property
    def fill(self) -> Fill:
        if self._fill is None:
            raise RuntimeError("the blob is closed")
        return self._fill

    @property
    def size(self) -> int | None:
        return self.fill.expected_size

    async def verified(self) -> Blob:
        fill = self.fill
        spool = await fill.verified_spool()
        if fill.tier is not None:  # a corrupt first copy may have been replaced by another tier's
            self.tier, self.hit = fill.tier.name, fill.tier.role == "cache"
        try:
            return spool.blob()
        finally:
            spool.release()  # the blob's own handle keeps the bytes readable

    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        return self.fill.follow(start, end)

    async def streams_past(self, threshold: int) -> bool:
        fill = self.fill
        if fill.expected_size is not None:
            return fill.expected_size > threshold
        spool = fill.spool
        assert spool is not None  # an attached request keeps it
        await spool.wait_for_size(threshold + 1)
        return spool.size > threshold and spool.failed is None and not spool.verified

    async def close(self) -> None:
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill.detach()
