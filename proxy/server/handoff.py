"""Lending a connection to aiohttp and taking it back (for server/fastpath.py).

The fast path hands a request it does not answer to aiohttp's RequestHandler on the same
connection, and stays the transport's protocol, forwarding the bytes. It takes the connection
back when the next request arrives and both of these hold:

- ``Framing``, an llhttp parser (httptools) fed the very bytes aiohttp's own llhttp parser was
  fed, is between two messages: aiohttp's parser then holds no partial request;
- aiohttp is idle (``aiohttp_idle``): its request loop waits for a next request, with nothing
  queued, nothing in progress, no body or upgrade being read, no flow control holding it, and
  the connection is to be kept alive.

Without it, one miss made a keep-alive connection aiohttp's for good: every later hit on it
cost an aiohttp request cycle. The idle test reads RequestHandler's private state (aiohttp 3.x);
an attribute this aiohttp lacks reads as busy, so the connection then simply stays aiohttp's.
"""

from __future__ import annotations

from typing import Any

import httptools


class Framing:
    """Where the requests in a byte stream begin and end, and nothing else: as aiohttp's
    ``handler`` sees them, if its parser is llhttp too (aiohttp's C extension). Otherwise
    (AIOHTTP_NO_EXTENSIONS, a platform without the wheel) the two could split a stream
    differently, so the connection stays aiohttp's."""

    def __init__(self, handler: Any) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._inside = False
        # an upgrade, bytes llhttp refuses, or another parser in aiohttp: the connection stays aiohttp's
        self.broken = type(getattr(handler, "_parser", None)).__module__ != "aiohttp._http_parser"

    def on_message_begin(self) -> None:
        self._inside = True

    def on_message_complete(self) -> None:
        self._inside = False

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.broken = True

    @property
    def between_messages(self) -> bool:
        return not self._inside and not self.broken


_BUSY = object()
# RequestHandler's state that must read so (the value it has when the handler is idle).
_IDLE_STATE: tuple[tuple[str, object], ...] = (
    ("_messages", False),  # a deque: empty
    ("_payload_parser", None),
    ("_upgraded", False),
    ("_message_tail", False),  # b"": empty
    ("_request_in_progress", False),
    ("_close", False),
    ("_force_close", False),
    ("_paused", False),
    ("_reading_paused", False),
    ("_buffer_paused", False),
)


def aiohttp_idle(handler: Any) -> bool:
    """Whether aiohttp's handler waits for a next request with nothing left to do."""
    waiter = getattr(handler, "_waiter", None)
    if waiter is None or waiter.done() or handler.transport is None:
        return False
    if getattr(handler, "_keepalive", False) is not True:  # its next answer closes the connection
        return False
    for name, idle in _IDLE_STATE:
        value = getattr(handler, name, _BUSY)
        if value is _BUSY or (value is not idle if idle is None else bool(value) != idle):
            return False
    return True


def quiet(handler: Any) -> None:
    """Stop aiohttp's keep-alive timer: the fast path times the connection's idleness while it
    holds it (aiohttp's would close a connection busy with hits), and aiohttp starts its own
    again after its next response."""
    timer = getattr(handler, "_keepalive_handle", None)
    if timer is not None:
        timer.cancel()
        handler._keepalive_handle = None


def rearm(handler: Any) -> None:
    """Start aiohttp's keep-alive timer again, as its connection_made does, when the fast path
    lends it a connection it took back (``quiet`` stopped the timer, and aiohttp starts it only
    after a response): a head that never completes is then closed as without the fast path."""
    if getattr(handler, "_keepalive_handle", None) is not None or not handler.keepalive_timeout > 0:
        return
    loop = handler._loop
    close_time = loop.time() + handler.keepalive_timeout
    handler._next_keepalive_close_time = close_time
    handler._keepalive_handle = loop.call_at(close_time, handler._process_keepalive)
