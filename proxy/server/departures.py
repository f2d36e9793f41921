"""Clients that leave before their answer is sent: a client event, logged and counted as 499
(nginx's "client closed request"), never a 500 with a traceback. Downloaders that open several
connections and drop the spare ones (aria2c) do this all day."""

from __future__ import annotations

import asyncio

from aiohttp import web

CLIENT_CLOSED = 499
_LEFT = web.RequestKey("client_left", bool)


def client_left(request: web.BaseRequest, error: BaseException) -> bool:
    """Whether ``error`` means this request's client went away (and if so, remember it): a
    failed write to it, or aiohttp cancelling the handler because the connection was lost.

    The error alone is not enough: a tier's refused connection is a ConnectionError too, and a
    shutdown cancels handlers too. The client's own transport being gone tells them apart."""
    transport = request.transport
    gone = transport is None or transport.is_closing()
    if gone and isinstance(error, ConnectionError | asyncio.CancelledError):
        mark_left(request)
    return _LEFT in request


def mark_left(request: web.BaseRequest) -> None:
    """Remember that this request's client went away: for an error that can only be its own
    (a failed write to its connection)."""
    request[_LEFT] = True


def status_of(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The status to log: the one sent, or 499 when the client did not stay for it."""
    return CLIENT_CLOSED if _LEFT in request else response.status
