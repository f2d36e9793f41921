"""The tier protocol: what every storage kind implements, and the open-blob types it returns."""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import BinaryIO, ClassVar, Literal, Protocol

from proxy.digest import Digest
from proxy.errors import TierError

Role = Literal["cache", "source"]
CHUNK_SIZE = 1 << 20  # large reads amortise the executor hop and hashing call overhead


class Blob(ABC):
    """An open copy of a blob in one tier: its size if the tier knows it, and its bytes."""

    size: int | None

    @abstractmethod
    def chunks(self, start: int = 0) -> AsyncIterator[bytes]:
        """The bytes from ``start`` on, in chunks (decoded: never the at-rest encoding)."""

    async def close(self) -> None:  # noqa: B027 - most blobs hold nothing to release
        """Release what the blob holds open (connections, file descriptors)."""

    async def read(self) -> bytes:
        try:
            return b"".join([chunk async for chunk in self.chunks()])
        finally:
            await self.close()


class BytesBlob(Blob):
    """A whole blob in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    async def chunks(self, start: int = 0) -> AsyncIterator[bytes]:
        view = memoryview(self.data)
        for offset in range(start, len(view), CHUNK_SIZE):
            yield bytes(view[offset : offset + CHUNK_SIZE])

    async def read(self) -> bytes:
        return self.data


class FileBlob(Blob):
    """An open local file; the server can hand it to sendfile. Whether its bytes are verified is
    the tier's business (``Tier.trusted``), not this type's."""

    size: int

    def __init__(self, file: BinaryIO, size: int, *, check: Callable[[], asyncio.Future[None]] | None = None) -> None:
        self.file = file
        self.size = size
        # Starts checking the whole file's bytes (the disk cache's checksum) alongside a read;
        # the awaitable raises CorruptBlob on a mismatch. A reader awaits it before handing out
        # the last byte, so a client never gets a complete body of wrong bytes.
        self.check = check

    async def chunks(self, start: int = 0) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        fd = self.file.fileno()
        checked = self.check() if self.check is not None else None
        offset = start
        try:
            while offset < self.size:
                chunk = await loop.run_in_executor(None, os.pread, fd, min(CHUNK_SIZE, self.size - offset), offset)
                if not chunk:
                    raise OSError(f"{self.file.name}: ends at {offset} of {self.size} bytes")
                offset += len(chunk)
                if offset == self.size and checked is not None:
                    await checked
                yield chunk
        finally:
            if checked is not None and not checked.done():
                checked.add_done_callback(retrieve)  # the reader left: nobody will await it

    async def close(self) -> None:
        self.file.close()


class StreamBlob(Blob):
    """Bytes arriving from elsewhere (a bucket, an HTTP upstream, an API origin)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        size: int | None = None,
        close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._chunks = chunks
        self.size = size
        self._close = close

    async def chunks(self, start: int = 0) -> AsyncIterator[bytes]:
        skip = start
        async for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0

    async def close(self) -> None:
        if self._close is not None:
            await self._close()
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class Payload(Protocol):
    """A complete, verified blob to store: in memory (``data``) or in a local file (``path``)."""

    @property
    def size(self) -> int: ...
    @property
    def data(self) -> bytes | None: ...
    @property
    def path(self) -> str | None: ...
    @property
    def checksum(self) -> str | None:
        """The xxh3-64 of the file's bytes if already computed (the disk cache's entry checksum)."""
        ...

    def open(self) -> BinaryIO | None: ...


@dataclass(frozen=True)
class FilePayload:
    """A verified blob kept in a local file (e.g. waiting in the replication queue)."""

    path: str
    size: int
    data: None = None
    checksum: None = None

    def open(self) -> BinaryIO:
        return open(self.path, "rb")


@dataclass(frozen=True, slots=True)
class Usage:
    """How full a tier with a size limit is, from memory (never a database query)."""

    bytes: int
    limit: int
    entries: int
    evictions: int = 0


@dataclass(frozen=True, slots=True)
class Stat:
    """A tier's cheap answer to "do you have it?": yes, with the size when it knows it."""

    size: int | None = None


class Tier(ABC):
    """One place blobs can be: a disk cache, a bucket, a folder, another proxy, an origin.

    ``open`` and ``stat`` return None for "not here" and raise TierError when the tier fails.
    """

    name: str
    role: Role = "source"
    timeout: float = 10.0  # seconds for an answer, and for each next byte of a body
    min_rate: float = 64 << 10  # bytes/s a body must keep up (see proxy.store.pace); 0: no floor
    trusted: bool = False  # holds only bytes it verified itself, so hits skip re-hashing
    can_store: ClassVar[bool] = False  # put() works: it can be an upload target or a cache
    # Other machines read the same copies (a bucket, another casproxy): with coalesce.url, an
    # instance waits for another's fill and then reads the blob from such a cache tier (if it
    # can_store, so that the other's fill could write it there).
    shared: ClassVar[bool] = False
    # A private local folder the tier owns, where the store may keep its spool and its
    # cross-process locks (the disk cache's); None for tiers with no local state.
    state_dir: str | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections, create folders; called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what start() opened."""

    @abstractmethod
    async def open(self, digest: Digest) -> Blob | None:
        """Start reading the blob, or None if this tier does not have it."""

    def peek(self, digest: Digest) -> Blob | None:
        """A hit this tier can answer at once, from process memory (the hot path); else None."""
        return None

    async def stat(self, digest: Digest) -> Stat | None:
        """Cheap existence check; tiers without one open the blob and close it again."""
        blob = await self.open(digest)
        if blob is None:
            return None
        await blob.close()
        return Stat(blob.size)

    async def put(self, digest: Digest, payload: Payload) -> None:
        """Store a verified blob. Sources that cannot be written raise TierError."""
        raise TierError(f"{self.name}: this {type(self).__name__} cannot be written")

    async def put_noting_uploads(self, digest: Digest, payload: Payload, note: Callable[[str], None]) -> None:
        """put(), for a caller that cleans up after a crash: ``note(upload_id)`` is called, on a
        worker thread and before any of its parts is sent, for each multipart upload the tier
        begins (one a process killed mid-put would leave behind); ``abort_upload`` ends one.
        Tiers without such uploads simply put."""
        await self.put(digest, payload)

    async def abort_upload(self, digest: Digest, upload_id: str) -> None:  # noqa: B027 - optional hook
        """End an upload noted by ``put_noting_uploads`` and left unfinished; one that has already
        ended (completed or aborted) is no error."""

    async def delete(self, digest: Digest) -> bool:
        """Remove the blob; True if it was there."""
        raise TierError(f"{self.name}: this {type(self).__name__} cannot delete")

    async def make_room(self, size: int) -> bool:
        """Free ``size`` bytes in ``state_dir``'s filesystem for the store's spool, which is about
        to write them, keeping the tier's own floor (the disk cache evicts for its min_free);
        False if it cannot."""
        return True

    async def ready(self) -> bool:
        """Whether the tier can do its job now (a cache: be written); for /readyz."""
        return True

    def usage(self) -> Usage | None:
        """Bytes held against a size limit, for tiers that have one; from memory, cheap."""
        return None

    def describe(self) -> dict[str, object]:
        """State for /stats and the status page: from memory, never blocking (it runs on the loop)."""
        return {}


def retrieve(future: asyncio.Future[None]) -> None:
    """Mark a check nobody awaits as seen (its failure was logged and counted by the tier)."""
    if not future.cancelled():
        future.exception()
