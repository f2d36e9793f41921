"""Tar archives: member name = hash. A ``.tar`` file is resumable (the members already in it are
skipped; a member cut short by a kill is cut off and written again); ``-`` is a stream on
stdout/stdin, which cannot be resumed.

Members are written one at a time (an archive is sequential) from blobs the store has verified
whole, so a member, once started, is only ever cut short by a local write error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tarfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, BinaryIO

from proxy.blocking import run_on
from proxy.tier import CHUNK_SIZE
from proxy.transfer.checkpoint import Checkpoint
from proxy.transfer.locations import SMALL, Entry, Location, Meter, SizedBlob, Source, Target, collect
from proxy.transfer.spec import TransferError, UsageError

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


def member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = int(time.time())
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class TarTarget(Target):
    """Appends members to a ``.tar`` file, or writes them to a stream (``-``)."""

    verified_first = True

    def __init__(self, location: Location, stream: BinaryIO | None = None) -> None:
        self.location = location
        self._stream = stream if location.kind == "stream" else None
        # One thread, first in first out: a write abandoned by a cancelled task still runs
        # before whatever is written (or cut off) next.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tar-writer")
        self._fd: int | None = None
        self._offset = 0
        self._present: set[str] = set()
        self._lock = asyncio.Lock()
        self._broken: str | None = None  # a stream holding a partial member: it cannot go on

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await run_on(self._executor, fn, *args)

    async def start(self, expected: int | None) -> None:
        if self._stream is None:
            self._fd, self._offset, self._present = await self._run(self._open_file)

    def _open_file(self) -> tuple[int, int, set[str]]:
        path = self.location.path
        if os.path.isdir(path):
            raise UsageError(f"{path} is a folder, not a tar file")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            end, names = scan_archive(path, os.fstat(fd).st_size)
            os.ftruncate(fd, end)  # drop the end-of-archive blocks, or a member cut short
        except BaseException:
            os.close(fd)
            raise
        return fd, end, names

    async def has(self, name: str) -> bool:
        return name in self._present

    async def write(self, name: str, blob: SizedBlob, checkpoint: Checkpoint, meter: Meter) -> None:
        header = member_header(name, blob.size)
        small = blob.size <= SMALL
        data = await collect(blob.chunks(), blob.size) if small else b""
        async with self._lock:
            if self._broken is not None:
                raise TransferError(self._broken)
            start = self._offset
            try:
                if small:
                    await self._write(header + data + padding(blob.size))
                    meter.moved(blob.size)
                else:
                    await self._write(header)
                    written = 0
                    async for chunk in blob.chunks():
                        await self._write(chunk)
                        written += len(chunk)
                        meter.moved(len(chunk))
                    if written != blob.size:
                        raise OSError(f"read {written} of {blob.size} bytes")
                    await self._write(padding(blob.size))
            except BaseException as error:
                self._undo(start, error)
                if isinstance(error, OSError) and self._broken is not None:
                    raise TransferError(self._broken) from error
                raise
            self._present.add(name)

    async def _write(self, data: bytes) -> None:
        offset = self._offset
        self._offset += len(data)
        await self._run(self._write_at, data, offset)

    def _write_at(self, data: bytes, offset: int) -> None:
        if self._stream is not None:
            self._stream.write(data)
            return
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def _undo(self, start: int, error: BaseException) -> None:
        """Forget a member that was not written whole."""
        if self._stream is not None:
            if self._offset > start:
                self._broken = f"the tar stream holds a partial member and cannot go on ({error!r})"
            return
        self._offset = start
        if self._fd is not None:
            self._executor.submit(os.ftruncate, self._fd, start)  # after any write still queued

    async def close(self, complete: bool) -> None:
        try:
            if self._stream is not None:
                # A stream cut short gets no end-of-archive, so whoever reads it sees it is incomplete.
                if complete and self._broken is None:
                    await self._run(self._finish_stream)
            elif self._fd is not None:
                # A paused archive is still a valid one; a rerun cuts the end blocks off again.
                await self._run(self._finish_file, self._fd, self._offset)
                self._fd = None
        finally:
            self._executor.shutdown(wait=False)

    def _finish_stream(self) -> None:
        assert self._stream is not None
        self._stream.write(END_OF_ARCHIVE)
        self._stream.flush()

    @staticmethod
    def _finish_file(fd: int, offset: int) -> None:
        try:
            os.pwrite(fd, END_OF_ARCHIVE, offset)
            os.ftruncate(fd, offset + len(END_OF_ARCHIVE))
            os.fsync(fd)
        finally:
            os.close(fd)


def scan_archive(path: str, size: int) -> tuple[int, set[str]]:
    """Where the last whole member of an archive ends, and the names of its regular files."""
    names: set[str] = set()
    if size == 0:
        return 0, names
    end = 0
    try:
        with tarfile.open(path, "r:") as archive:
            members = iter(archive)
            while True:
                try:
                    info = next(members)
                except StopIteration:
                    break
                except (tarfile.ReadError, EOFError):
                    break  # a header cut short
                data = info.size if info.isreg() else 0
                if info.offset_data + data > size:
                    break  # a member cut short
                end = info.offset_data + data + (-data % BLOCK)
                if info.isreg():
                    names.add(info.name)
    except tarfile.ReadError as error:
        raise UsageError(f"{path} exists and is not a tar archive ({error}); not touching it") from None
    return end, names


class TarSource(Source):
    """The regular files of an archive, in order; a file is seekable, a stream is read once."""

    sequential = True

    def __init__(self, location: Location, stream: BinaryIO | None = None) -> None:
        self.location = location
        self._stream = stream
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tar-reader")  # tarfile is not thread-safe
        self._archive: tarfile.TarFile | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await run_on(self._executor, fn, *args)

    async def start(self) -> None:
        self._archive = await self._run(self._open)

    def _open(self) -> tarfile.TarFile:
        try:
            if self.location.kind == "stream":
                assert self._stream is not None
                # Unbuffered: tarfile then waits for the bytes it needs, not for a full 10 KiB
                # record, so a member is stored as soon as it has arrived.
                return tarfile.open(fileobj=getattr(self._stream, "raw", self._stream), mode="r|")
            if not os.path.isfile(self.location.path):
                raise UsageError(f"{self.location.path}: no such file")
            return tarfile.open(self.location.path, "r:")
        except tarfile.ReadError as error:
            raise UsageError(f"{self.location.text}: not a tar archive ({error})") from None

    async def entries(self) -> AsyncIterator[Entry]:
        archive = self._archive
        assert archive is not None
        while True:
            try:
                info = await self._run(archive.next)
            except (tarfile.ReadError, EOFError) as error:
                raise TransferError(f"{self.location.text}: archive is damaged or cut short ({error})") from None
            if info is None:
                return
            if not info.isreg():
                continue
            file = await self._run(archive.extractfile, info)
            yield Entry(info.name, info.size, functools.partial(self._read, file))

    async def _read(self, file: IO[bytes]) -> AsyncIterator[bytes]:
        while chunk := await self._run(file.read, CHUNK_SIZE):
            yield chunk

    async def close(self) -> None:
        archive, self._archive = self._archive, None
        # A stream is left as it is: its reader thread may be blocked on a pipe that never
        # delivers again, and closing would wait behind it.
        if archive is not None and self.location.kind != "stream":
            with contextlib.suppress(Exception):
                await self._run(archive.close)
        self._executor.shutdown(wait=False)
