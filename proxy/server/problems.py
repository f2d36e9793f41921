"""Every error leaves as RFC 9457 problem details; nothing but a real bug becomes a 500."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from proxy.errors import ProxyError
from proxy.server.accesslog import printable
from proxy.server.departures import CLIENT_CLOSED, client_left

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
    except asyncio.CancelledError as error:
        if not client_left(request, error):
            raise  # a shutdown, not a departure
        # aiohttp cancels a handler whose client went away. Answer for the logs and metrics
        # (the access log gets its line when the send fails); the task itself goes on to end.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return web.Response(status=CLIENT_CLOSED)
    except ProxyError as error:
        return problem(error.status, error.type, error.title, error.detail, error.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {k: v for k, v in error.headers.items() if k.lower() in ("allow", "retry-after")}
        type_ = _HTTP_TYPES.get(error.status, "http-error")
        return problem(error.status, type_, error.reason, error.text or error.reason, headers)
    except (HttpProcessingError, RequestPayloadError) as error:
        # The body could not be read as sent: a broken Content-Encoding (gzip, br, deflate),
        # bad chunking. aiohttp decodes while it parses, so this surfaces at the first read.
        cause = error.__cause__ or error
        response = problem(400, "bad-request", "Bad request", f"the body could not be read: {type(cause).__name__}")
        response.force_close()  # the rest of the body cannot be parsed: this connection is done
        request.content.feed_eof()  # and nothing more will be read (aiohttp would try, and log a traceback)
        return response
    except Exception as error:
        if client_left(request, error):
            log.info("client left during %s %s", request.method, printable(request.path))
            return web.Response(status=CLIENT_CLOSED)  # nobody will read it; logs and metrics will
        log.exception("unexpected error handling %s %s", request.method, printable(request.path))
        return problem(500, "internal", "Internal error", "the error was logged")
