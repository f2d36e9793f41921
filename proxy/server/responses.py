"""Ways of sending a blob's bytes, and the RFC 9110 request headers that shape them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

from aiohttp import web

from proxy.errors import CorruptBlob, RangeNotSatisfiable
from proxy.numbers import decimal
from proxy.server.departures import client_left, mark_left, status_of
from proxy.tier import FileBlob, retrieve

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single byte range (RFC 9110 14.1.2) as [start, end); None means the whole blob.

    Multiple ranges and malformed headers are ignored (a 200 is a valid answer to them);
    a well-formed range that the blob cannot satisfy raises RangeNotSatisfiable."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None
    # Numbers too long to be an offset make the header malformed, and so ignored, like others.
    first, last = decimal(match.group(1) or "0"), decimal(match.group(2) or str(size))
    if first is None or last is None:
        return None
    if match.group(1) == "":  # bytes=-n: the last n bytes
        if last == 0:
            raise RangeNotSatisfiable("the range is empty", headers={"Content-Range": f"bytes */{size}"})
        return max(0, size - last), size
    if first >= size or last < first:
        raise RangeNotSatisfiable(
            f"the range starts past the blob's {size} bytes or ends before it starts",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return first, min(size, last + 1)


def etag_matches(header: str | None, etag: str, *, weak: bool = True) -> bool:
    """Whether an If-None-Match (weak comparison, RFC 9110 13.1.2) or If-Match (strong,
    13.1.1) list names this ETag or is *."""
    if not header:
        return False
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or (candidate.removeprefix("W/") if weak else candidate) == etag:
            return True
    return False


def range_header(request: web.BaseRequest, etag: str) -> str | None:
    """The Range to honour, if any. HEAD ignores Range (SPEC 5.1: its headers are the whole
    blob's), and an If-Range that is not this ETag (strong comparison; a date never matches,
    since no Last-Modified is sent) asks for the whole blob (RFC 9110 13.1.5)."""
    header = request.headers.get("Range")
    if not header or request.method == "HEAD":
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        return None
    return header


class SendfileResponse(web.StreamResponse):
    """Sends part of an already open file with the kernel's sendfile (no copies through
    Python); unlike FileResponse it takes an open file, so eviction cannot race it."""

    def __init__(self, blob: FileBlob, start: int, end: int, *, status: int = 200) -> None:
        super().__init__(status=status)
        self._file: BinaryIO = blob.file
        self._blob = blob
        self._offset = start
        self._count = end - start
        self._sent = 0  # bytes the kernel sent: aiohttp's own count never sees them
        self.content_length = self._count
        # Told the status to count once the body is sent or the client left (the metrics
        # middleware's): the sending happens after the handler has returned.
        self.when_sent: Callable[[int], None] | None = None

    @property
    def body_length(self) -> int:
        """Headers and body as sent, as for any other response (the access log's bytes)."""
        return super().body_length + self._sent

    async def prepare(self, request: web.BaseRequest) -> web.StreamResponse | None:  # type: ignore[override]
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD" and self._count:
                transport = request.transport
                if transport is None:
                    raise ConnectionResetError("connection lost")
                try:
                    await self._send(transport)
                except CorruptBlob as error:  # the disk copy failed its check: no last byte
                    transport.abort()
                    raise ConnectionResetError(str(error)) from error
            await super().write_eof()
        except ConnectionError as error:
            # Every write here is to the client's own connection: it left (sendfile meets the
            # reset before the transport is closing). The access log and the metrics say 499.
            if not isinstance(error.__cause__, CorruptBlob):  # that cut is ours, not the client's
                mark_left(request)
            raise
        except asyncio.CancelledError as error:
            client_left(request, error)  # aiohttp's, when the connection is lost; or a shutdown
            raise
        finally:
            self._file.close()
            if self.when_sent is not None:
                self.when_sent(status_of(request, self))
        return writer  # type: ignore[return-value]

    async def _send(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        if type(loop) not in _WITHOUT_SENDFILE:
            try:
                await self._sendfile(loop, transport)
                return
            except NotImplementedError:  # uvloop: remembered, so a check is not started twice
                _WITHOUT_SENDFILE.add(type(loop))
        async for chunk in self._blob.chunks(self._offset):  # copy through Python
            await self.write(chunk[: self._count])
            self._count -= len(chunk)
            if self._count <= 0:
                break

    async def _sendfile(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        start = self._file.tell()
        try:
            await self._sendfile_checked(loop, transport)
        finally:
            # loop.sendfile leaves the file at the end of what it sent, also when cut short: the
            # bytes aiohttp's own count (body_length) never sees.
            end = self._file.tell()
            self._sent = end - self._offset if end != start else 0

    async def _sendfile_checked(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        """All but the last byte while the file's check (if it has one) runs; the last byte
        only once the check passed (SPEC 4: never a complete body of wrong bytes)."""
        if self._blob.check is None:
            await loop.sendfile(transport, self._file, self._offset, self._count)
            return
        checked = self._blob.check()
        try:
            if self._count > 1:  # a count of 0 would mean "to the end of the file"
                await loop.sendfile(transport, self._file, self._offset, self._count - 1)
            await checked
            await loop.sendfile(transport, self._file, self._offset + self._count - 1, 1)
        finally:
            if not checked.done():
                checked.add_done_callback(retrieve)


_WITHOUT_SENDFILE: set[type[asyncio.AbstractEventLoop]] = set()  # event loop kinds (uvloop)


async def send_stream(
    request: web.BaseRequest, response: web.StreamResponse, chunks: AsyncIterator[bytes]
) -> web.StreamResponse:
    """Send chunks as they come; if the source fails, cut the connection so the client
    sees an incomplete body instead of a complete wrong one."""
    await response.prepare(request)
    try:
        async for chunk in chunks:
            await response.write(chunk)
    except Exception:
        if request.transport is not None:
            request.transport.abort()
        raise
    await response.write_eof()
    return response
