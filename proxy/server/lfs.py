"""Git LFS batch API with the basic transfer adapter (SPEC 5.3a), so the stock git-lfs client
pushes and pulls through casproxy: downloads are tickets for /sha256/<oid>, uploads are signed
PUT URLs through the normal verified upload path (the oid is the SHA-256 of the bytes).

https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.digest import Digest
from proxy.errors import BadDigest, BadRequest, NotFound, ProxyError, Unauthorized
from proxy.server.keys import SERVICE, STORE

MEDIA_TYPE = "application/vnd.git-lfs+json"
DOCS = "https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md"
MAX_OBJECTS = 1000  # git-lfs asks for 100 at a time
_CONCURRENCY = 32


def lfs_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """The LFS error shape (not problem+json: the git-lfs client prints ``message``)."""
    body = {"message": message, "documentation_url": DOCS}
    return web.Response(status=status, text=json.dumps(body), content_type=MEDIA_TYPE, headers=headers)


def authorization(request: web.Request) -> str | None:
    """The bearer token as an Authorization header, whether it came as one or as HTTP Basic's
    password (what git credential helpers send; the user name is ignored)."""
    header = request.headers.get("Authorization")
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return header
    try:
        _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
        return None
    return f"Bearer {password}" if password else None


async def batch(request: web.Request) -> web.Response:
    try:
        return await _batch(request)
    except Unauthorized as error:
        return lfs_error(401, error.detail, {"LFS-Authenticate": 'Basic realm="casproxy"'})
    except ProxyError as error:
        return lfs_error(error.status, error.detail, error.headers)


async def _batch(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"body is not JSON: {error}") from None
    if not isinstance(body, dict) or body.get("operation") not in ("download", "upload"):
        raise BadRequest('want {"operation": "download" | "upload", "objects": [{"oid": ..., "size": ...}]}')
    operation: str = body["operation"]
    objects = body.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise BadRequest('"objects" must be a list of {"oid": ..., "size": ...}')
    if len(objects) > MAX_OBJECTS:
        raise BadRequest(f"at most {MAX_OBJECTS} objects per batch, got {len(objects)}")
    if body.get("hash_algo", "sha256") != "sha256":
        raise BadRequest("only hash_algo sha256 is supported")
    if "basic" not in body.get("transfers", ["basic"]):
        raise BadRequest("only the basic transfer adapter is supported")
    auth = authorization(request)
    if operation == "upload":
        service.access.check_upload(auth)
    elif service.access.require_ticket:
        service.access.check_token(auth)
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def answer(item: dict[str, Any]) -> dict[str, Any]:
        async with limit:
            return await _object(request, operation, item)

    answers = await asyncio.gather(*(answer(item) for item in objects))
    return web.Response(
        text=json.dumps({"transfer": "basic", "objects": answers, "hash_algo": "sha256"}), content_type=MEDIA_TYPE
    )


async def _object(request: web.Request, operation: str, item: dict[str, Any]) -> dict[str, Any]:
    oid, size = item.get("oid"), item.get("size")
    answer: dict[str, Any] = {"oid": oid, "size": size}
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return {**answer, "error": {"code": 422, "message": "size must be a whole number of bytes"}}
    try:
        digest = Digest.parse(oid if isinstance(oid, str) else "", "sha256")
    except BadDigest:
        return {**answer, "error": {"code": 422, "message": "oid must be 64 hex digits (sha256)"}}
    service = request.app[SERVICE]
    try:
        _, stat = await request.app[STORE].stat(digest)
    except NotFound:
        if operation == "download":
            return {**answer, "error": {"code": 404, "message": "object does not exist"}}
        url, expires = service.access.signed_upload_url(f"/sha256/{digest}")
        return {**answer, "authenticated": True, "actions": {"upload": _action(url, expires)}}
    if stat.size is not None and stat.size != size:
        return {**answer, "error": {"code": 422, "message": f"the stored object has {stat.size} bytes, not {size}"}}
    if operation == "upload":
        return answer  # already stored: no action
    ticket = service.signer.ticket(digest, size)
    return {**answer, "authenticated": True, "actions": {"download": _action(ticket.ticket, ticket.expires)}}


def _action(href: str, expires: int) -> dict[str, Any]:
    # expires_at in RFC 3339, which the client reads to fetch a fresh action before it runs out
    return {"href": href, "expires_at": datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
