"""GET and HEAD of blobs, and the bulk existence check: parse, ask the store, send."""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.digest import Algorithm, Digest
from proxy.errors import BadRequest, NotFound, PreconditionFailed
from proxy.server.bodies import read_json_object
from proxy.server.keys import CONFIG, SERVICE, STORE
from proxy.server.responses import SendfileResponse, etag_matches, parse_range, range_header, send_stream
from proxy.store.composite import Composite
from proxy.store.fills import Uncacheable
from proxy.store.opened import Opened
from proxy.tier import Blob, BytesBlob, FileBlob

MAX_MISSING_QUERY = 10_000
_MISSING_CONCURRENCY = 32
_MISSING_EXAMPLE = '{"hashes": ["<hex digest>", ...]}'
CACHE_CONTROL = "public, max-age=31536000, immutable"  # a name never changes its bytes
# With auth.require_ticket every blob answer needed a ticket or token: a shared cache in front
# must not hand it to others (browsers and private caches may still keep it).
PRIVATE_CACHE_CONTROL = "private, max-age=31536000, immutable"


async def keep_private(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook under require_ticket: one place for every blob answer
    (200, 206, 304, HEAD, streamed)."""
    if response.headers.get("Cache-Control") == CACHE_CONTROL:
        response.headers["Cache-Control"] = PRIVATE_CACHE_CONTROL


def requested_digest(request: web.Request) -> Digest:
    return Digest.parse(request.match_info["hash"], algorithm_of(request))


def algorithm_of(request: web.Request) -> Algorithm:
    # Routes are registered per algorithm under /sha1 and /sha256 (see app.py).
    return "sha256" if request.path.startswith("/sha256") else "sha1"


def _headers(digest: Digest, tier: str, hit: bool) -> dict[str, str]:
    return {
        "ETag": f'"{digest}"',
        "Cache-Control": CACHE_CONTROL,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "X-Cache": "HIT" if hit else "MISS",
        "X-Cache-Tier": tier,
    }


async def get_blob(request: web.Request) -> web.StreamResponse:
    digest = requested_digest(request)
    # Tickets sign the canonical path, whatever case the client wrote the name in.
    request.app[SERVICE].access.check_read(
        f"/{digest.algorithm}/{digest}", request.query, request.headers.get("Authorization")
    )
    etag = f'"{digest}"'
    store = request.app[STORE]
    if_match = request.headers.get("If-Match")
    if if_match is not None and not etag_matches(if_match, etag, weak=False):
        raise PreconditionFailed(f"If-Match {if_match[:80]!r} does not name {etag}")
    if etag_matches(request.headers.get("If-None-Match"), etag):
        # Content-addressed: a client holding this ETag holds exactly these bytes, as long as
        # the blob exists at all (RFC 9110 13.1.2: no current representation, no 304).
        if not await store.contains(digest):
            raise NotFound(f"{digest} is in no tier")
        return web.Response(status=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})
    try:
        return await _read(request, store, digest)
    except NotFound:
        if if_match is None:
            raise
        raise PreconditionFailed(f"If-Match {if_match[:80]!r}: {digest} is in no tier") from None


async def _read(request: web.Request, store: Composite, digest: Digest) -> web.StreamResponse:
    """GET or HEAD once the preconditions hold."""
    if request.method == "HEAD":
        response = await _head(request, store, digest)
        if response is not None:
            return response
    opened = await store.open(digest)
    try:
        # Up to stream_threshold a blob is verified before the first byte; a larger one still
        # arriving is streamed as it comes, and the connection is cut if it fails.
        threshold = request.app[CONFIG].server.stream_threshold
        ranged = range_header(request, f'"{digest}"') is not None
        if not ranged and request.method == "GET" and await opened.streams_past(threshold):
            response = web.StreamResponse(headers=_headers(digest, opened.tier, opened.hit))
            if opened.size is not None:
                response.content_length = opened.size
            return await send_stream(request, response, opened.chunks())
        try:
            blob = await opened.verified()
        except Uncacheable:
            return await _pass_through(request, opened, digest)
        headers = _headers(digest, opened.tier, opened.hit)
    finally:
        await opened.close()
    return await _send_blob(request, blob, headers)


async def _pass_through(request: web.Request, opened: Opened, digest: Digest) -> web.StreamResponse:
    """A blob this machine cannot hold whole (its disk and spool memory are full), passed through
    from its tier instead of a 507 (SPEC 4). The last byte waits for the whole blob to verify, so
    a bad copy is a cut connection (SPEC 5.1); a range is cut from the stream. Without a known
    size, a Range is ignored: a whole 200 answers it (RFC 9110 14.2)."""
    response = web.StreamResponse(headers=_headers(digest, opened.tier, opened.hit))
    size = opened.size
    start, end = 0, size
    span = None if size is None else parse_range(range_header(request, f'"{digest}"'), size)
    if span is not None:
        start, end = span
        response.set_status(206)
        response.headers["Content-Range"] = f"bytes {start}-{span[1] - 1}/{size}"
    if end is not None:
        response.content_length = end - start
    if request.method == "HEAD":
        await response.prepare(request)
        await response.write_eof()
        return response
    return await send_stream(request, response, opened.chunks(start, end))


async def _head(request: web.Request, store: Composite, digest: Digest) -> web.StreamResponse | None:
    """Answer HEAD from a tier's cheap existence check; None when it cannot tell the size."""
    tier, stat = await store.stat(digest)
    if stat.size is None:
        return None
    response = web.StreamResponse(headers=_headers(digest, tier.name, tier.role == "cache"))
    response.content_length = stat.size  # HEAD ignores Range: these are the whole blob's headers
    await response.prepare(request)
    await response.write_eof()
    return response


async def _send_blob(request: web.Request, blob: Blob, headers: dict[str, str]) -> web.StreamResponse:
    """A verified blob that is whole: from memory, or a file for sendfile (which closes it)."""
    assert blob.size is not None
    try:
        span = parse_range(range_header(request, headers["ETag"]), blob.size)
    except Exception:
        await blob.close()  # a 416: the response will not own the open file
        raise
    if isinstance(blob, BytesBlob):
        start, end = span or (0, blob.size)
        response: web.StreamResponse = web.Response(body=blob.data[start:end] if span else blob.data, headers=headers)
        if span is not None:
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        return response
    assert isinstance(blob, FileBlob)
    start, end = span or (0, blob.size)
    response = SendfileResponse(blob, start, end, status=206 if span else 200)
    response.headers.update(headers)
    if span is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
    return response


async def post_missing(request: web.Request) -> web.Response:
    """{"hashes": [...]} -> {"missing": [...]}: which of them no tier has."""
    algorithm = algorithm_of(request)
    request.app[SERVICE].access.check_probe(request.headers.get("Authorization"))
    body = await read_json_object(request, _MISSING_EXAMPLE)
    hashes = body.get("hashes")
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
        raise BadRequest(f"want a JSON body {_MISSING_EXAMPLE}")
    if len(hashes) > MAX_MISSING_QUERY:
        raise BadRequest(f"at most {MAX_MISSING_QUERY} hashes per request, got {len(hashes)}")
    digests = [Digest.parse(h, algorithm) for h in hashes]
    store = request.app[STORE]
    limit = asyncio.Semaphore(_MISSING_CONCURRENCY)

    async def missing(digest: Digest) -> bool:
        async with limit:
            return not await store.contains(digest)

    flags = await asyncio.gather(*(missing(d) for d in digests))
    return web.json_response({"missing": [d for d, gone in zip(digests, flags, strict=True) if gone]})
