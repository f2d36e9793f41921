"""Where a transfer writes to (export) or reads from (import): a bucket prefix, a folder, a tar
file, or a tar stream. ``parse_location`` names the kind; bucket.py and tarball.py hold the
bucket and archive kinds, this module the shared vocabulary and folders.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from proxy.blocking import run_on
from proxy.digest import Digest
from proxy.liveness import orphans, temp_prefix
from proxy.tier import FileBlob
from proxy.transfer.checkpoint import Checkpoint
from proxy.transfer.spec import UsageError

LocationKind = Literal["s3", "folder", "tar", "stream"]
SMALL = 1 << 20  # a blob this small is gathered in memory and written in one go
TEMP_PREFIX = ".casproxy-export-"  # then the writer's pid (proxy.liveness): a dead writer's files are removed
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".zip")


@dataclass(frozen=True)
class Location:
    kind: LocationKind
    text: str
    bucket: str = ""
    prefix: str = ""
    path: str = ""  # absolute, for folders and tar files

    @property
    def identity(self) -> str:
        """The same place however it was spelled (names the checkpoint)."""
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.prefix}"
        return self.path or self.text

    @property
    def resumable(self) -> bool:
        return self.kind != "stream"


def parse_location(text: str) -> Location:
    """``s3://bucket/prefix/``, ``-`` (a tar stream), ``FILE.tar``, or a folder."""
    if text == "-":
        return Location("stream", text)
    if "://" in text:
        parsed = urlparse(text)
        if parsed.scheme != "s3":
            raise UsageError(f"{text}: unsupported location; want s3://bucket/prefix/, a folder, FILE.tar or -")
        if not parsed.netloc:
            raise UsageError(f"{text}: no bucket; want s3://bucket/prefix/")
        prefix = parsed.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return Location("s3", text, bucket=parsed.netloc, prefix=prefix)
    if text.lower().endswith(_COMPRESSED):
        raise UsageError(f"{text}: compressed archives are not supported; use a plain .tar")
    path = os.path.abspath(text)
    if text.lower().endswith(".tar"):
        return Location("tar", text, path=path)
    return Location("folder", text, path=path)


class Meter(Protocol):
    """Told how the bytes of the blob being written are getting on."""

    def moved(self, size: int) -> None:
        """``size`` more bytes reached the target."""

    def reused(self, size: int) -> None:
        """``size`` bytes an earlier run sent already (parts of a resumed upload)."""


class SizedBlob(Protocol):
    """A blob read through the store: its size is known before the first byte is written."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The bytes; raises (CorruptBlob, UpstreamFailed) if they turn out bad at the end."""
        ...


class Target(ABC):
    """Where an export writes. ``has`` answers "skip it?", ``write`` stores one blob."""

    # Archives cannot take a member back once written: they want the blob verified whole first.
    verified_first = False

    async def start(self, expected: int | None) -> None:  # noqa: B027 - optional hook
        """Prepare (create the folder, scan the archive); ``expected`` items will be asked for."""

    @abstractmethod
    async def has(self, name: str) -> bool:
        """True if the target holds ``name`` already."""

    @abstractmethod
    async def write(self, name: str, blob: SizedBlob, checkpoint: Checkpoint, meter: Meter) -> None:
        """Store the blob under ``name``; it is durable at the target when this returns."""

    async def close(self, complete: bool) -> None:  # noqa: B027 - optional hook
        """Release what start() opened; ``complete``: every item was written."""


@dataclass(frozen=True)
class Entry:
    """One object of an import source. For sequential sources (tar streams) ``chunks`` must be
    consumed before asking for the next entry."""

    name: str  # relative to the source: a key after the prefix, a path in the folder or archive
    size: int | None
    chunks: Callable[[], AsyncIterator[bytes]]


class Source(ABC):
    """Where an import reads from."""

    sequential = False  # entries must be read in order, one at a time (an archive)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Check the source is there."""

    @abstractmethod
    def entries(self) -> AsyncIterator[Entry]:
        """Every object in the source."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what start() opened."""


class ByteBudget:
    """How many bytes of blob data may sit in memory at once; ``take`` waits (first come, first
    served) until they fit. A request larger than the whole budget is cut down to it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int) -> int:
        size = min(size, self.limit)
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return size
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((size, waiter))
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give(size)  # granted just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((size, waiter))
            raise
        return size

    def give(self, size: int) -> None:
        self.used -= size
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            size, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += size
                waiter.set_result(None)


async def collect(chunks: AsyncIterator[bytes], size: int) -> bytes:
    """All of a (small) blob's bytes; checks it has ``size`` of them."""
    data = b"".join([chunk async for chunk in chunks])
    if len(data) != size:
        raise OSError(f"read {len(data)} of {size} bytes")
    return data


# -- folders -------------------------------------------------------------------------------


class FolderTarget(Target):
    """``<folder>/<hash>``: each blob written to a temp file, fsynced, renamed into place."""

    def __init__(self, location: Location, executor: Executor) -> None:
        self.path = location.path
        self._executor = executor
        self._present: set[str] = set()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await run_on(self._executor, fn, *args)

    async def start(self, expected: int | None) -> None:
        self._present = await self._run(self._prepare)

    def _prepare(self) -> set[str]:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"{self.path} exists and is not a folder")
        os.makedirs(self.path, exist_ok=True)
        for orphan in orphans(self.path, TEMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(orphan)  # a killed export's partial file
        return {
            entry.name for entry in os.scandir(self.path) if entry.is_file() and not entry.name.startswith(TEMP_PREFIX)
        }

    async def has(self, name: str) -> bool:
        return name in self._present

    async def write(self, name: str, blob: SizedBlob, checkpoint: Checkpoint, meter: Meter) -> None:
        target = os.path.join(self.path, name)
        if blob.size <= SMALL:
            data = await collect(blob.chunks(), blob.size)
            await self._run(self._write_small, target, data)
            meter.moved(len(data))
            return
        fd, temp = await self._run(self._temp_file)
        try:
            written = 0
            async for chunk in blob.chunks():
                await self._run(_write_all, fd, chunk)
                written += len(chunk)
                meter.moved(len(chunk))
            if written != blob.size:
                raise OSError(f"read {written} of {blob.size} bytes")
            await self._run(self._commit, fd, temp, target)
        except BaseException:
            await self._run(self._discard, fd, temp)
            raise

    def _temp_file(self) -> tuple[int, str]:
        return tempfile.mkstemp(prefix=temp_prefix(TEMP_PREFIX), dir=self.path)

    def _write_small(self, target: str, data: bytes) -> None:
        fd, temp = self._temp_file()
        try:
            _write_all(fd, data)
            self._commit(fd, temp, target)
        except BaseException:
            self._discard(fd, temp)
            raise

    def _commit(self, fd: int, temp: str, target: str) -> None:
        os.fsync(fd)  # an export is a copy someone will rely on, not a cache
        os.close(fd)
        os.chmod(temp, 0o644)
        os.replace(temp, target)

    @staticmethod
    def _discard(fd: int, temp: str) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)


class FolderSource(Source):
    """Every file under a folder (flat or sharded); hidden casproxy temp files are left out."""

    def __init__(self, location: Location, executor: Executor) -> None:
        self.path = location.path
        self._executor = executor

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await run_on(self._executor, fn, *args)

    async def start(self) -> None:
        if not await self._run(os.path.isdir, self.path):
            raise UsageError(f"{self.path}: no such folder")

    async def entries(self) -> AsyncIterator[Entry]:
        walk = os.walk(self.path)
        while True:
            batch: list[tuple[str, int]] | None = await self._run(self._next_folder, walk)
            if batch is None:
                return
            for relative, size in batch:
                yield Entry(relative, size, functools.partial(self._read, os.path.join(self.path, relative)))

    def _next_folder(self, walk: Any) -> list[tuple[str, int]] | None:
        try:
            folder, dirs, files = next(walk)
        except StopIteration:
            return None
        dirs.sort()
        found = []
        for name in sorted(files):
            if name.startswith(".casproxy-"):
                continue
            full = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):  # removed while we walked
                found.append((os.path.relpath(full, self.path), os.stat(full).st_size))
        return found

    async def _read(self, path: str) -> AsyncIterator[bytes]:
        file = await self._run(open, path, "rb")
        blob = FileBlob(file, os.fstat(file.fileno()).st_size)
        try:
            async for chunk in blob.chunks():
                yield chunk
        finally:
            await blob.close()


def digest_in(name: str) -> Digest:
    """The digest a source object is named by: the last part of its path (flat or sharded)."""
    return Digest.parse(name.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1])


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
