"""Hot hits below aiohttp: a protocol in front of aiohttp's own, per connection.

A GET or HEAD of a blob held in process memory (``Composite.peek``) is answered here from
prebuilt header bytes and the blob's bytes: a few microseconds of Python instead of an aiohttp
request cycle. Every other request, and every one this module is unsure of, goes to aiohttp on
the same connection: from that request on, aiohttp's RequestHandler gets the bytes not yet
answered (this protocol forwards them), until it has answered them and waits for more; then the
next request is this module's again (server/handoff.py). Responses so stay in order under
pipelining, and everything this module does not implement (bodies, chunked requests,
HTTP/1.0, Expect, tickets, requests with an Origin, If-Match, errors, smuggling attempts) keeps
aiohttp's answer.

A request is answered here only if all of these hold: its head ends in CRLF CRLF within
MAX_HEAD bytes; httptools parses it as one complete HTTP/1.1 message without a body; it is GET
or HEAD of exactly ``/sha1/<40 hex>`` or ``/sha256/<64 hex>`` (no query: tickets live there);
no header in UNSURE is present and none is repeated (two Ranges, two Hosts: ambiguous); no
Range on HEAD; a Range is one satisfiable ``bytes=`` range or absent; the blob is in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler

from proxy.config import Config
from proxy.digest import Digest
from proxy.errors import RangeNotSatisfiable
from proxy.server.accesslog import AccessLog, new_request_id
from proxy.server.blobs import CACHE_CONTROL
from proxy.server.cors import CORS
from proxy.server.handoff import Framing, aiohttp_idle, quiet, rearm
from proxy.server.keys import STORE
from proxy.server.metrics import count_request
from proxy.server.responses import etag_matches, parse_range
from proxy.store.composite import Composite

MAX_HEAD = 8190  # aiohttp's own limit for a request line and each header: longer heads are its to refuse
_SMALL_BODY = 64 << 10  # below this, head and body go out as one buffer (one send, one small copy)
_BLOB = re.compile(rb"/(sha1)/([0-9a-fA-F]{40})|/(sha256)/([0-9a-fA-F]{64})")
_PREFIXES = (b"GET /sha", b"HEAD /sha")
# Headers that change what a GET means, or that this module does not implement: aiohttp's to answer.
UNSURE = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"origin",  # CORS: Access-Control-* headers and refusals are server/cors.py's
        b"authorization",  # may carry a token a ticket check would read
        b"if-match",
        b"if-range",
        b"if-modified-since",
        b"if-unmodified-since",
    }
)
_HEAD_CACHE_ENTRIES = 4096


class HotHits:
    """What every connection of one server shares: the store, prebuilt header bytes and the
    access log."""

    def __init__(
        self, store: Composite, access_log: logging.Logger | None, json_log: bool, *, cors: bool = False
    ) -> None:
        self.store = store
        self.access_log = None if access_log is None else AccessLog.of(access_log, json_format=json_log)
        # With [cors] on, every blob answer says it depends on Origin (as server/cors.py adds on
        # aiohttp's path); a request that carries an Origin is aiohttp's, for the other headers.
        self._vary = b"Vary: Origin\r\n" if cors else b""
        self._heads: dict[tuple[str, str, bool, int], bytes] = {}
        self._second = 0
        self._tail = b""
        self.answered = 0  # requests answered here, not by aiohttp (tests read it)
        self.taken_back = 0  # times a connection lent to aiohttp came back (tests read it)
        self.connections: set[FastPath] = set()  # not lent to aiohttp now: closed here at shutdown

    def head(self, digest: str, tier: str, hit: bool, length: int) -> bytes:
        """Every 200 header a blob carries (as blobs.py sends them) but the per-second Date."""
        key = (digest, tier, hit, length)
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= _HEAD_CACHE_ENTRIES:
                self._heads.clear()  # cheaper than an LRU; refilling costs one format per blob
            head = self._heads[key] = (
                f'ETag: "{digest}"\r\nCache-Control: {CACHE_CONTROL}\r\nAccept-Ranges: bytes\r\n'
                f"Content-Type: application/octet-stream\r\nX-Cache: {'HIT' if hit else 'MISS'}\r\n"
                f"X-Cache-Tier: {tier}\r\nContent-Length: {length}\r\n"
            ).encode("latin-1")
        return head

    def tail(self) -> bytes:
        """Date, Server and Vary, the end of every head; Date changes once a second."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
            self._tail = f"Date: {date}\r\nServer: {SERVER_SOFTWARE}\r\n".encode("latin-1") + self._vary
        return self._tail


class HeadParser:
    """One request head at a time, parsed by httptools into the fields the fast path reads."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.repeated = False
        self.complete = False
        self.keep_alive = False
        self.version = ""
        self.method = b""

    def parse(self, head: bytes) -> bool:
        """Whether ``head`` is one complete HTTP/1.1 request without a body, no header repeated."""
        self.url = b""
        self.headers = {}
        self.repeated = self.complete = False
        try:
            self.parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return False
        return self.complete and not self.repeated and self.version == "1.1"

    # -- httptools callbacks ---------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in self.headers:
            self.repeated = True
        self.headers[name] = value

    def on_headers_complete(self) -> None:
        # llhttp resets these when the message ends: read them while they describe this one
        self.keep_alive = self.parser.should_keep_alive()
        self.version = self.parser.get_http_version()
        self.method = self.parser.get_method()

    def on_message_complete(self) -> None:
        self.complete = True


class FastPath(HeadParser, asyncio.Protocol):
    """One connection: answers hot hits, and lends the connection to aiohttp's RequestHandler
    for the requests it leaves to aiohttp, until aiohttp is done with them."""

    def __init__(self, handler: RequestHandler, hot: HotHits) -> None:
        super().__init__()
        self.handler = handler
        self.hot = hot
        self.transport: asyncio.Transport | None = None
        self.remote = "-"
        self.buffer = b""
        self.writing_paused = False
        self.closing = False
        self.lent = False  # aiohttp's for now: the bytes go to it
        self.framing: Framing | None = None  # the bytes aiohttp was given, from the first loan
        self.last_request = 0.0  # loop time of the last bytes received
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass asyncio's
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (list, tuple)) and peer:
            self.remote = str(peer[0])
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as aiohttp does: no Nagle delay
        # aiohttp's handler meets the connection only at hand-off: its keep-alive timer counts
        # from connection_made and knows nothing of the requests answered here.
        self.hot.connections.add(self)
        loop = asyncio.get_running_loop()
        self.last_request = loop.time()
        # One timer per keep-alive period, not one per request: it rechecks the last request's time.
        self.idle_timer = loop.call_later(self.handler.keepalive_timeout, self._close_if_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._stop_idle_timer()
        self.hot.connections.discard(self)
        if self.framing is not None:  # aiohttp met the connection: its handler ends with it
            self.handler.connection_lost(exc)

    def close(self) -> None:
        """Close at shutdown (what is written is sent first)."""
        if self.transport is not None and not self.closing:
            self.closing = True
            self.transport.close()

    def _close_if_idle(self) -> None:
        """Close a keep-alive connection idle for aiohttp's keepalive_timeout, as aiohttp would."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        idle = loop.time() - self.last_request
        timeout = self.handler.keepalive_timeout
        # A buffer here is part of a head (requests that wait for the client to read wait behind
        # a write buffer): a client that sends no more of it is closed, as aiohttp does.
        if idle >= timeout and not self.transport.get_write_buffer_size():
            self.closing = True
            self.transport.close()
        else:
            self.idle_timer = loop.call_later(max(timeout - idle, 0.05), self._close_if_idle)

    def _stop_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def eof_received(self) -> None:
        return None  # the transport closes once what was written is sent

    def pause_writing(self) -> None:
        if self.lent:
            self.handler.pause_writing()
            return
        # The client reads slower than hits are answered: read no more requests until it catches up.
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.lent:
            self.handler.resume_writing()
            return
        self.writing_paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()
            if self.buffer:
                self.data_received(b"")

    def data_received(self, data: bytes) -> None:
        # Taken back only for a request that may be a hot hit: an upload or a POST stays lent.
        if self.lent and not (_may_be_fast(data) and self._take_back()):
            self._lend(data)
            return
        if data:
            self.last_request = asyncio.get_running_loop().time()
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        offset = 0
        while not self.closing:
            if self.writing_paused:
                self.buffer = data[offset:]
                return
            end = data.find(b"\r\n\r\n", offset)
            if end < 0:
                rest = data[offset:]
                if len(rest) > MAX_HEAD or b"\n\n" in rest or not _may_be_fast(rest):
                    self._hand_off(rest)
                else:
                    self.buffer = rest
                return
            end += 4
            if end - offset > MAX_HEAD or not self._answer(data[offset:end]):
                self._hand_off(data[offset:])
                return
            offset = end
            if offset == len(data):
                return

    # -- the fast path ---------------------------------------------------------------------

    def _hand_off(self, data: bytes) -> None:
        """aiohttp answers on this connection, starting with ``data``, until _take_back."""
        assert self.transport is not None
        self.lent = True
        self._stop_idle_timer()  # aiohttp's own keep-alive timer takes over
        self.hot.connections.discard(self)  # aiohttp's server closes it at shutdown
        if self.framing is None:
            self.framing = Framing(self.handler)
            self.handler.connection_made(self.transport)  # its request loop, for the connection's life
        else:
            rearm(self.handler)  # taken back before: quiet stopped aiohttp's timer
        self._lend(data)

    def _lend(self, data: bytes) -> None:
        assert self.framing is not None
        self.framing.feed(data)
        self.handler.data_received(data)

    def _take_back(self) -> bool:
        """Whether the next request is this module's again: aiohttp has answered every request
        it was given and holds no part of another (server/handoff.py)."""
        assert self.framing is not None
        if self.closing or not self.framing.between_messages or not aiohttp_idle(self.handler):
            return False
        quiet(self.handler)
        self.lent = False
        # This module's parser was fed the head of the first request lent, and no more of it: one
        # with a body leaves it inside that body, where the next head would go.
        self.parser = httptools.HttpRequestParser(self)
        self.hot.connections.add(self)
        self.hot.taken_back += 1
        self.idle_timer = asyncio.get_running_loop().call_later(self.handler.keepalive_timeout, self._close_if_idle)
        return True

    def _answer(self, head: bytes) -> bool:
        """Answer one request head if it is a hot hit this module is sure of; False leaves it
        (and everything after it) to aiohttp."""
        started = time.perf_counter()
        if not head.startswith(_PREFIXES) or b"\n\n" in head or not self.parse(head):
            return False
        headers = self.headers
        if not UNSURE.isdisjoint(headers):
            return False
        match = _BLOB.fullmatch(self.url)
        if match is None:
            return False
        method = self.method.decode("ascii")
        ranged = b"range" in headers
        if ranged and method == "HEAD":
            return False  # SPEC 5.1: Range is ignored on HEAD; aiohttp's handler owns that answer
        algorithm = "sha1" if match.group(1) else "sha256"
        digest = Digest((match.group(2) or match.group(4)).decode("ascii").lower())
        etag = f'"{digest}"'
        if_none_match = headers.get(b"if-none-match")
        if if_none_match is not None and not etag_matches(if_none_match.decode("latin-1"), etag):
            if_none_match = None
        found = self.hot.store.peek(digest)
        if found is None:
            return False
        tier, data = found
        hit = tier.role == "cache"
        size = len(data)
        body: bytes | memoryview = data
        if if_none_match is not None:
            # Content-addressed: a client holding this ETag holds exactly these bytes.
            status = 304
            first = b"HTTP/1.1 304 Not Modified\r\n"
            head_bytes = f"ETag: {etag}\r\nCache-Control: {CACHE_CONTROL}\r\n".encode("latin-1")
            body = b""
        elif ranged:
            try:
                span = parse_range(headers[b"range"].decode("latin-1"), size)
            except RangeNotSatisfiable:
                return False  # aiohttp answers the 416 problem (the hit is counted twice)
            if span is None:
                status, first = 200, b"HTTP/1.1 200 OK\r\n"
                head_bytes = self.hot.head(digest, tier.name, hit, size)
            else:
                start, end = span
                status, first = 206, b"HTTP/1.1 206 Partial Content\r\n"
                head_bytes = self.hot.head(digest, tier.name, hit, end - start) + (
                    f"Content-Range: bytes {start}-{end - 1}/{size}\r\n".encode("latin-1")
                )
                body = memoryview(data)[start:end]
        else:
            status, first = 200, b"HTTP/1.1 200 OK\r\n"
            head_bytes = self.hot.head(digest, tier.name, hit, size)
        keep_alive = self.keep_alive
        request_id = new_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        head_bytes += f"X-Request-Id: {request_id}\r\n".encode("latin-1")  # as accesslog.send_request_id
        response = first + head_bytes + self.hot.tail() + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
        if method == "HEAD":
            body = b""
        assert self.transport is not None
        _send(self.transport, response, body)
        if not keep_alive:
            self.closing = True
            self.transport.close()  # after the buffered response is sent
        seconds = time.perf_counter() - started
        self.hot.answered += 1
        count_request(f"/{algorithm}/{{hash}}", method, status, seconds)  # as metrics_middleware does
        access_log = self.hot.access_log
        if access_log is not None and access_log.logger.isEnabledFor(logging.INFO):  # cached by logging
            access_log.write(
                self.remote,
                method,
                self.url.decode("ascii"),
                status,
                len(response) + len(body),  # as aiohttp counts: head and body
                seconds,
                "HIT" if hit else "MISS",
                tier.name,
                request_id,
                headers.get(b"user-agent", b"-").decode("latin-1"),
            )
        return True


def _send(transport: asyncio.Transport, head: bytes, body: bytes | memoryview) -> None:
    if len(body) <= _SMALL_BODY:
        transport.write(head + body if body else head)
        return
    view = memoryview(body)
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.get_write_buffer_size():
        # Head and body in one writev, no copy: not a lone head segment the client must take
        # first (asyncio's writelines would join them, a copy of the whole body). The socket is
        # non-blocking: what it does not take now goes to the transport, after it, in order.
        try:
            sent = os.writev(sock.fileno(), [head, view])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the connection is gone: the transport reports it on its next write
            sent = 0
        if sent < len(head):
            transport.write(head[sent:])
            transport.write(view)
        elif sent < len(head) + len(view):
            transport.write(view[sent - len(head) :])
        return
    # A memoryview: what the socket does not take at once is copied once into the transport's
    # buffer, not sliced into a new bytes first.
    transport.write(head)
    transport.write(view)


def _may_be_fast(start: bytes) -> bool:
    """Whether an incomplete head could still be one this module answers."""
    return any(prefix.startswith(start[: len(prefix)]) for prefix in _PREFIXES)


def protocol_factory(server: web.Server, hot: HotHits) -> Callable[[], asyncio.Protocol]:
    """What ``loop.create_server`` calls per connection: aiohttp's handler behind a FastPath."""

    def make() -> asyncio.Protocol:
        return FastPath(server(), hot)

    return make


def make_runner(app: web.Application, config: Config, **kwargs: Any) -> web.AppRunner:
    """The runner for ``app``: with the fast path in front unless config turns it off, or unless
    every read needs a ticket (then no read is one this module may answer)."""
    if not config.server.fast_path or config.auth.require_ticket:
        return web.AppRunner(app, **kwargs)
    return FastPathRunner(
        app, app[STORE], json_log=config.server.log_format == "json", cors=app[CORS].enabled, **kwargs
    )


class FastPathRunner(web.AppRunner):
    """An AppRunner whose sites put a FastPath in front of each connection's RequestHandler.
    Sites hand ``runner.server`` to ``loop.create_server`` as the protocol factory."""

    def __init__(
        self, app: web.Application, store: Composite, *, json_log: bool = False, cors: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        access_log = kwargs.get("access_log", logging.getLogger("aiohttp.access"))
        self.hot = HotHits(store, access_log, json_log, cors=cors)

    async def shutdown(self) -> None:
        await super().shutdown()
        for connection in list(self.hot.connections):  # aiohttp's server closes only its own
            connection.close()

    @property
    def server(self) -> Any:  # a protocol factory in the place of web.Server: all sites use it so
        inner = super().server
        return None if inner is None else protocol_factory(inner, self.hot)
