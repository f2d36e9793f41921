"""Every error leaves as RFC 9457 problem details; nothing but a real bug becomes a 500."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.errors import ProxyError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# aiohttp's own HTTP errors (unknown route, wrong method, unreadable body) by status
_HTTP_TYPES = {400: "bad-request", 404: "not-found", 405: "method-not-allowed", 413: "too-large"}


def problem(status: int, type_: str, title: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": type_, "title": title, "status": status, "detail": detail}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProxyError as error:
        return problem(error.status, error.type, error.title, error.detail, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {k: v for k, v in error.headers.items() if k.lower() in ("allow", "retry-after")}
        type_ = _HTTP_TYPES.get(error.status, "http-error")
        return problem(error.status, type_, error.reason, error.text or error.reason, headers)
    except Exception:
        log.exception("unexpected error handling %s %s", request.method, request.path)
        return problem(500, "internal", "Internal error", "the error was logged")
