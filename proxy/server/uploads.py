"""PUT/POST of blobs (answered with tickets) and DELETE from the caches."""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ProxyError, TooLarge
from proxy.server.blobs import algorithm_of, requested_digest
from proxy.server.keys import SERVICE
from proxy.server.problems import problem
from proxy.service import Service
from proxy.tier import CHUNK_SIZE
from proxy.uploads import Stored


def _check_declared_size(request: web.Request, service: Service) -> None:
    limit = service.config.server.max_upload_size
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body is {request.content_length} bytes; server.max_upload_size is {limit}")


def _ticket_response(service: Service, stored: Stored) -> web.Response:
    ticket = service.signer.ticket(stored.digest, stored.size)
    return web.json_response(ticket.as_json(), status=201 if stored.created else 200)


def _check_before_body(request: web.Request) -> None:
    """Everything an upload can be refused for before its body is read."""
    service = request.app[SERVICE]
    digest = requested_digest(request) if "hash" in request.match_info else None
    if digest is not None and "sig" in request.query:  # a signed upload URL, as Git LFS upload actions hand out
        service.access.check_signed_upload(f"/{digest.algorithm}/{digest}", request.query)
    else:
        service.access.check_upload(request.headers.get("Authorization"))
    _check_declared_size(request, service)


async def expect_upload(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` (RFC 9110 10.1.1): say "continue" only to an upload we would
    take, so a client with a bad token, name or size learns it before sending the body."""
    if request.version < (1, 1):
        return None  # HTTP/1.0 has no interim responses; the handler answers
    if request.headers.get("Expect", "").lower() != "100-continue":
        return problem(417, "expectation-failed", "Expectation failed", "only Expect: 100-continue is understood")
    try:
        _check_before_body(request)
    except ProxyError as error:
        # Returned as is: aiohttp runs this hook before the middlewares.
        return problem(error.status, error.type, error.title, error.detail, error.headers)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


async def put_blob(request: web.Request) -> web.Response:
    """PUT /sha1/{hash}: the (decoded) body must hash to the name; nothing is stored otherwise."""
    service = request.app[SERVICE]
    _check_before_body(request)
    digest = requested_digest(request)
    stored = await service.uploader.receive(request.content.iter_chunked(CHUNK_SIZE), digest)
    return _ticket_response(service, stored)


async def post_blob(request: web.Request) -> web.Response:
    """POST /sha1: the server names the blob by hashing it."""
    service = request.app[SERVICE]
    _check_before_body(request)
    stored = await service.uploader.receive(request.content.iter_chunked(CHUNK_SIZE), algorithm=algorithm_of(request))
    return _ticket_response(service, stored)


async def delete_blob(request: web.Request) -> web.Response:
    """DELETE /sha1/{hash} (admin): drop it from the cache tiers; sources keep it."""
    service = request.app[SERVICE]
    service.access.check_admin(request.headers.get("Authorization"))
    await service.store.delete(requested_digest(request))
    return web.Response(status=204)
