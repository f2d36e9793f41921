"""Requests aiohttp's parser refuses, answered as problem+json with their RFC 9110 status.

aiohttp answers an over-long request line or header field with a text/plain 400 and logs it
at ERROR with a traceback. A client's mistake is neither: a URL past ``MAX_URL`` is 414, a
header field past ``MAX_FIELD`` (or too many headers) is 431, anything else unparseable 400.
aiohttp has no public hook for this answer (it bypasses the application and its middleware),
so the server that the application makes is given a request handler that gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.server.problems import problem

log = logging.getLogger(__name__)

# Different limits tell the two LineTooLong apart: aiohttp raises it for both.
MAX_URL = 8192  # the request line (most proxies and browsers stop near here)
MAX_FIELD = 16384  # one header field, name and value (a long Authorization still fits)


def _answer(exc: BaseException | None) -> web.Response:
    if isinstance(exc, LineTooLong) and len(exc.args) > 1 and exc.args[1] == MAX_URL:
        return problem(414, "uri-too-long", "URI too long", f"the request line is over {MAX_URL} bytes")
    if isinstance(exc, LineTooLong):
        detail = f"a header field is over {MAX_FIELD} bytes"
        return problem(431, "header-too-large", "Request header fields too large", detail)
    if isinstance(exc, HttpProcessingError) and "too many headers" in str(exc.message).lower():
        return problem(431, "header-too-large", "Request header fields too large", "too many header fields")
    detail = exc.message if isinstance(exc, HttpProcessingError) and exc.message else "the request cannot be parsed"
    return problem(400, "bad-request", "Bad request", str(detail)[:200])


class _RequestHandler(RequestHandler):
    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if status != 400 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        response = _answer(exc)
        # The client's mistake: one line, no traceback, and none of its bytes (they could forge lines).
        log.info("refused an unparseable request from %s: %d %s", request.remote, response.status, type(exc).__name__)
        response.force_close()  # the rest of the stream cannot be trusted
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


def answer_parse_errors(app: web.Application) -> None:
    """Make ``app``'s servers (AppRunner, TestServer) answer unparseable requests as problems."""
    make_handler: Callable[..., web.Server] = app._make_handler

    def make(**kwargs: Any) -> web.Server:
        server = make_handler(**{"max_line_size": MAX_URL, "max_field_size": MAX_FIELD, **kwargs})
        server.__class__ = _Server  # the same server; only the handler it makes differs
        return server

    app._make_handler = make  # type: ignore[method-assign]
