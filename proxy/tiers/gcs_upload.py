"""GCS's resumable upload protocol for one object, as the gcs tier uses it for large blobs.

The blob is read (and encoded) in pieces of UPLOAD_CHUNK bytes while the previous piece is on the
wire, so memory stays at two pieces whatever the blob's size. GCS may keep fewer bytes of a piece
than it was sent (its 308 says how many), and after a failed PUT it is asked what it kept: the
upload goes on from there instead of starting over.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import BinaryIO
from urllib.parse import quote

import aiohttp

from proxy.blocking import run
from proxy.encoding import Encoding, encoder
from proxy.errors import TierError
from proxy.tier import CHUNK_SIZE, Payload
from proxy.tiers.bucket import SIZE_METADATA

# A resumable upload sends its bytes in pieces of this size (GCS wants multiples of 256 KiB);
# a blob no larger is sent in one multipart request instead.
UPLOAD_CHUNK = 8 << 20
CONTENT_TYPE = "application/octet-stream"
_RESUME_ATTEMPTS = 4  # per piece: after a failed PUT, ask GCS what it kept and go on from there
_RESUME_TRANSIENT = {408, 429, 500, 502, 503, 504}

Auth = Callable[[], Awaitable[dict[str, str]]]


class ResumableUpload:
    """Uploads into one bucket through ``session``, authorised by ``auth`` (headers per request).
    ``name`` is the tier's, for errors."""

    def __init__(
        self, session: aiohttp.ClientSession, auth: Auth, api_root: str, bucket: str, name: str, encoding: Encoding
    ) -> None:
        self.session = session
        self._auth = auth
        self.api_root = api_root
        self.bucket = bucket
        self.name = name
        self.encoding = encoding

    async def send(self, key: str, payload: Payload) -> None:
        """Store ``payload`` as ``key``, encoding as it reads; the encoded size need not be
        known up front."""
        source: BinaryIO = await run(_open_payload, payload)
        try:
            uri = await self._begin_upload(key, payload.size)
            reader = _Pieces(source, self.encoding, UPLOAD_CHUNK)
            offset = 0
            piece = await run(reader.read)
            while True:
                # Read the next piece while this one is on the wire. A short piece is the last one;
                # a full one at the very end is followed by an empty PUT that names the total.
                last = len(piece) < UPLOAD_CHUNK
                following = None if last else asyncio.ensure_future(run(reader.read))
                try:
                    await self._send_piece(uri, piece, offset, last)
                except BaseException:
                    if following is not None:
                        await asyncio.wait([following])  # the read holds the file: let it end before close
                    raise
                if following is None:
                    return
                offset += len(piece)
                piece = await following
        finally:
            await run(source.close)

    async def _begin_upload(self, key: str, size: int) -> str:
        headers = {**await self._auth(), "X-Upload-Content-Type": CONTENT_TYPE}
        body = {"name": key, "contentType": CONTENT_TYPE, "metadata": {SIZE_METADATA: str(size)}}
        url = f"{self.api_root}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"
        async with self.session.post(url, params={"uploadType": "resumable"}, json=body, headers=headers) as response:
            if response.status != 200 or "Location" not in response.headers:
                text = await error_text(response)
                raise TierError(f"{self.name}: could not start an upload: {response.status} {text}")
            return response.headers["Location"]

    async def _send_piece(self, uri: str, piece: bytes | bytearray, offset: int, last: bool) -> None:
        """PUT bytes [offset, offset+len(piece)) of the upload; GCS may keep fewer than it was
        sent (its 308 says how many), and a failed PUT resumes from what it kept."""
        end = offset + len(piece)
        total = str(end) if last else "*"
        sent, failures = offset, 0
        while True:
            rest = memoryview(piece)[sent - offset :]
            span = f"bytes {sent}-{end - 1}/{total}" if rest else f"bytes */{total}"
            headers = {
                **await self._auth(),
                "Content-Range": span,
                "Content-Type": CONTENT_TYPE,
                "Content-Length": str(len(rest)),  # so aiohttp sends the slices below unchunked
            }
            try:
                async with self.session.put(
                    uri, data=_slices(rest), headers=headers, allow_redirects=False
                ) as response:
                    status, persisted = response.status, _persisted(response.headers)
                    text = "" if status in (200, 201, 308) else await error_text(response)
            except (aiohttp.ClientError, TimeoutError) as error:
                status, persisted, text = 0, None, say(error)
            if status in (200, 201):
                if last:
                    return
                raise TierError(f"{self.name}: upload finished before its last piece")
            if status == 308 and persisted is not None:
                if persisted < offset:
                    raise TierError(
                        f"{self.name}: GCS lost bytes {persisted}-{offset - 1} of an upload it had confirmed"
                    )
                sent = persisted
                if sent >= end and not last:
                    return
                continue  # kept less than it was sent (or the empty final PUT is due): send the rest
            if status != 0 and status not in _RESUME_TRANSIENT:
                raise TierError(f"{self.name}: upload piece at {sent} answered {status}: {text}")
            failures += 1
            if failures >= _RESUME_ATTEMPTS:
                raise TierError(f"{self.name}: upload piece at {sent} failed {failures} times: {status or text}")
            await asyncio.sleep(0.25 * 2**failures)
            sent = await self._upload_offset(uri, total, offset)

    async def _upload_offset(self, uri: str, total: str, floor: int) -> int:
        """How much of an interrupted upload GCS kept. Pieces before this one were kept for
        sure, and the ones after are not read yet: it must lie in this piece."""
        headers = {**await self._auth(), "Content-Range": f"bytes */{total}"}
        try:
            async with self.session.put(uri, data=b"", headers=headers, allow_redirects=False) as response:
                persisted = _persisted(response.headers) if response.status == 308 else None
        except (aiohttp.ClientError, TimeoutError):
            return floor  # not even that answered: send the whole piece again
        if persisted is None or persisted < floor:
            return floor
        return persisted


class _Pieces:
    """A payload's bytes, encoded as they are read, in pieces of exactly ``size`` bytes (the
    last one shorter). Each piece is filled in place, so it costs its size once, not twice."""

    def __init__(self, source: BinaryIO, encoding: Encoding, size: int) -> None:
        self._source = source
        self._comp = encoder(encoding)
        self._size = size
        self._carry = b""  # read (and encoded) but not yet in a piece
        self._done = False

    def read(self) -> bytearray:
        piece = bytearray(self._size)
        filled = 0
        while filled < self._size:
            if not self._carry:
                if self._done:
                    break
                raw = self._source.read(CHUNK_SIZE)
                self._done = not raw
                if self._comp is None:
                    self._carry = raw
                else:
                    self._carry = self._comp.compress(raw) if raw else self._comp.flush()
                continue
            take = min(len(self._carry), self._size - filled)
            piece[filled : filled + take] = memoryview(self._carry)[:take]
            self._carry = self._carry[take:]
            filled += take
        del piece[filled:]
        return piece


def say(error: BaseException) -> str:
    """An error for logs and 502 details: str(), never repr(), whose aiohttp form carries the
    request's headers (the bearer token with them)."""
    return str(error) or type(error).__name__


def _open_payload(payload: Payload) -> BinaryIO:
    source = payload.open()
    return source if source is not None else io.BytesIO(payload.data or b"")


async def _slices(view: memoryview) -> AsyncIterator[memoryview]:
    """A piece as aiohttp sends it: in slices of the piece's own memory, no copy."""
    for start in range(0, len(view), CHUNK_SIZE):
        yield view[start : start + CHUNK_SIZE]


def _persisted(headers: Mapping[str, str]) -> int | None:
    """The byte count a 308 says GCS kept: ``Range: bytes=0-N`` -> N+1; no Range -> 0."""
    text = headers.get("Range")
    if text is None:
        return 0
    _, _, last = text.partition("-")
    return int(last) + 1 if last.strip().isdigit() else None


async def error_text(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.content.read(300)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    finally:
        response.release()
    return body.decode(errors="replace").strip() or (response.reason or "")
