"""POST /bulk-data hands out presigned slots; in self mode this proxy also answers the slots'
POST (form), PUT and GET URLs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.blocking import run
from proxy.bulk import SelfBulkData, check_request, parse_encoding
from proxy.errors import BadRequest, Forbidden, NotFound
from proxy.server.bodies import read_json_object
from proxy.server.keys import SERVICE
from proxy.server.responses import SendfileResponse, etag_matches
from proxy.tier import CHUNK_SIZE, FileBlob

_MAX_FIELD = 8192


async def create_slots(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.access.check_upload(request.headers.get("Authorization"))
    example = '{"count": 1, "content_encoding": "gzip"}'
    body = await read_json_object(request, example) if request.can_read_body else {}
    count, encoding = check_request(body.get("count", 1), body.get("content_encoding", "identity"))
    slots = await service.bulk.slots(count, encoding, bool(body.get("accelerate", False)))
    return web.json_response([slot.as_json() for slot in slots])


def _self_mode(request: web.Request) -> SelfBulkData:
    bulk = request.app[SERVICE].bulk
    if not isinstance(bulk, SelfBulkData):
        raise NotFound("bulk data lives in the bucket named by uploads.bulk_data_tier")
    return bulk


async def put_object(request: web.Request) -> web.Response:
    """The slot's presigned PUT: the body comes with the slot's Content-Encoding."""
    bulk = _self_mode(request)
    encoding = parse_encoding(request.query.get("content-encoding", "identity"))
    bulk.signer.verify(
        bulk.upload_scope(request.path, encoding), request.query.get("expires"), request.query.get("sig")
    )
    sent = request.headers.get("Content-Encoding", "identity").lower()
    if sent != encoding:
        raise BadRequest(f"this slot takes {encoding} bodies, not {sent}")
    # aiohttp has decoded the body already; it is stored encoded again as the slot says.
    size = await bulk.store(request.match_info["name"], encoding, request.content.iter_chunked(CHUNK_SIZE), False)
    return web.json_response({"size": size}, status=201)


async def post_object(request: web.Request) -> web.Response:
    """The slot's presigned POST: a form with the slot's fields and then the file."""
    bulk = _self_mode(request)
    if request.content_type != "multipart/form-data":
        raise BadRequest(f"a presigned POST is a multipart/form-data form, not {request.content_type}")
    try:
        return await _store_form(request, bulk)
    except (KeyError, ValueError, HttpProcessingError) as error:  # no boundary, a torn body, bad part headers
        raise BadRequest(f"the form cannot be read: {error!s:.200}") from None


async def _store_form(request: web.Request, bulk: SelfBulkData) -> web.Response:
    form = await request.multipart()
    fields: dict[str, str] = {}
    async for part in form:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported")
        if part.filename is None:
            fields[part.name or ""] = await _field(part)
            continue
        encoding = parse_encoding(fields.get("content-encoding", "identity"))
        bulk.signer.verify(bulk.upload_scope(request.path, encoding), fields.get("expires"), fields.get("sig"))
        size = await bulk.store(request.match_info["name"], encoding, _part_chunks(part), True)
        return web.json_response({"size": size}, status=201)
    raise BadRequest("the form has no file part")


async def _field(part: BodyPartReader) -> str:
    """A form field's text; fields are short (names, signatures), so a long one is refused
    before it is held in memory."""
    text = b""
    while chunk := await part.read_chunk(_MAX_FIELD):
        text += chunk
        if len(text) > _MAX_FIELD:
            raise BadRequest(f"form field {(part.name or '')[:40]!r} is longer than {_MAX_FIELD} bytes")
    return text.decode()


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK_SIZE):
        yield chunk


async def get_object(request: web.Request) -> web.StreamResponse:
    """The slot's presigned GET: the stored bytes with their Content-Encoding."""
    bulk = _self_mode(request)
    bulk.signer.verify(request.path, request.query.get("expires"), request.query.get("sig"))
    try:
        file, encoding, size = await bulk.open(request.match_info["name"])
    except NotFound:
        raise
    except OSError as error:
        raise Forbidden(str(error)) from error
    stat = await run(os.fstat, file.fileno())
    # A slot can be uploaded again while its URLs live: a validator, and caches revalidate.
    headers = {
        "ETag": f'"{stat.st_mtime_ns:x}-{size:x}"',
        "Cache-Control": "private, no-cache",  # the URL is a capability: no shared cache keeps it
        "Vary": "Accept-Encoding",  # the bytes are sent as stored, Content-Encoding and all
    }
    if etag_matches(request.headers.get("If-None-Match"), headers["ETag"]):
        await run(file.close)
        return web.Response(status=304, headers=headers)
    response = SendfileResponse(FileBlob(file, size), 0, size)
    response.headers.update(headers)
    response.content_type = "application/octet-stream"
    if encoding != "identity":
        response.headers["Content-Encoding"] = encoding
    return response
