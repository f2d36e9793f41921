"""A small fault proxy for tests: an aiohttp app in front of an S3 server (moto) that passes
requests on, except the GETs of chosen keys, which it trickles or never answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer


async def trickle(response: web.StreamResponse, data: bytes) -> None:
    """One byte every 50 ms, as long as the reader stays."""
    for byte in data:
        await response.write(bytes([byte]))
        await asyncio.sleep(0.05)


class FaultProxy:
    """Trickles the GETs of ``trickled`` keys; holds those of ``hung`` keys, the PUTs of
    ``hung_puts`` keys, and while ``hang_completions`` is set every CompleteMultipartUpload,
    without a byte of answer until the client goes away; and passes the rest."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.trickled: set[str] = set()  # keys
        self.trickling = 0  # trickles under way
        self.abandoned = 0  # trickles whose reader went away
        self.hung: set[str] = set()  # keys
        self.hanging = 0  # GETs of hung keys, ever
        self.hangs_dropped = 0  # ... whose client went away
        self.hung_puts: set[str] = set()  # keys
        self.hang_completions = False
        self.app = web.Application(client_max_size=64 << 20)  # multipart parts are 16 MiB
        self.app.router.add_route("*", "/{path:.*}", self.forward)
        self.session: aiohttp.ClientSession | None = None

    async def forward(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        key = request.path.split("/", 2)[-1]
        completion = request.method == "POST" and "uploadId" in request.query
        held = (request.method == "GET" and key in self.hung) or (request.method == "PUT" and key in self.hung_puts)
        if held or (completion and self.hang_completions):
            return await self.hang(request)
        # (Expect is not signed: boto3's "100-continue" was answered here, not to be asked again.)
        passed_on = ("host", "content-length", "expect")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in passed_on}
        body = await request.read()
        url = self.endpoint + request.path_qs
        async with self.session.request(request.method, url, headers=headers, data=body) as upstream:
            data = await upstream.read()
            framing = ("transfer-encoding", "content-length")
            passed = {k: v for k, v in upstream.headers.items() if k.lower() not in framing}
            if request.method != "GET" or key not in self.trickled:
                return web.Response(status=upstream.status, headers=passed, body=data)
            response = web.StreamResponse(status=upstream.status, headers=passed)
            response.content_length = len(data)
            await response.prepare(request)
            self.trickling += 1
            try:
                await trickle(response, data)
            except (ConnectionError, asyncio.CancelledError):
                self.abandoned += 1
                raise
            return response

    async def hang(self, request: web.Request) -> web.StreamResponse:
        self.hanging += 1
        try:
            await asyncio.Event().wait()  # until the client goes away, which cancels this
        finally:
            self.hangs_dropped += 1
        raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def fault_proxy_before(endpoint: str) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A FaultProxy in front of ``endpoint``, and its own URL."""
    proxy = FaultProxy(endpoint)
    async with aiohttp.ClientSession(auto_decompress=False) as proxy.session:
        server = TestServer(proxy.app, host="127.0.0.1")
        await server.start_server()  # (test servers cancel the handler of a client that leaves)
        try:
            yield proxy, f"http://127.0.0.1:{server.port}"
        finally:
            await server.close()
