"""The fast path against aiohttp alone, fuzzed (hypothesis): random sequences of requests on one
keep-alive connection (hits, misses, 404s, ranges, bodies, chunked bodies, HTTP/1.0, closes,
garbage), sent one by one or pipelined, split at random points. The property: the same
answers, in the same order, with the connection closed at the same point, as the server without
the fast path gives. This drives the fast path's lending of a connection to aiohttp and its
taking it back (server/handoff.py) through orders no hand-written test lists."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import load_config
from proxy.server.app import create_app
from proxy.server.fastpath import FastPathRunner, make_runner
from proxy.server.workers import new_event_loop
from tests.conftest import make_blob, write_config
from tests.test_fastpath import Response, get, post_missing, read_response

EXAMPLES = 500
HOT, HOT_DIGEST = make_blob(3000, seed=21)
COLD = [make_blob(2000 + i, seed=40 + i) for i in range(40)]  # each fetched from the source once, then a hit
MALFORMED = b"GET /sha1/" + HOT_DIGEST.encode() + b" HTTP/1.1\r\nHo st: x\r\n\r\n"
# Requests after which the server closes the connection. (aiohttp's parser, given more bytes in
# the same read, fails the whole read with a 400: the valid request before is never answered.)
LAST = (
    get(f"/sha1/{HOT_DIGEST}", "Connection: close"),
    get(f"/sha1/{HOT_DIGEST}", version="1.0"),
    MALFORMED,  # 400
)

requests = st.one_of(
    st.just(get(f"/sha1/{HOT_DIGEST}")),
    st.just(get(f"/sha1/{HOT_DIGEST}", method="HEAD")),
    st.sampled_from(["bytes=0-9", "bytes=-5", "bytes=2999-", "bytes=0-1,5-6", "bytes=9000-"]).map(
        lambda span: get(f"/sha1/{HOT_DIGEST}", f"Range: {span}")
    ),
    st.just(get(f"/sha1/{HOT_DIGEST}", f'If-None-Match: "{HOT_DIGEST}"')),
    st.sampled_from(COLD).map(lambda blob: get(f"/sha1/{blob[1]}")),
    st.integers(0, 10**6).map(lambda n: get(f"/sha1/{n:040x}")),  # found nowhere: 404
    st.just(post_missing(HOT_DIGEST)),
    st.just(get(f"/sha1/{HOT_DIGEST}", "Content-Length: 5") + b"hello"),  # a GET with a body: aiohttp's
    st.just(get(f"/sha1/{HOT_DIGEST}", "Transfer-Encoding: chunked") + b"3;x=y\r\nabc\r\n0\r\n\r\n"),
    st.just(get("/healthz")),
    st.sampled_from(LAST),
)


class Servers:
    """Two servers on one loop in a thread: the fast path in front, and aiohttp alone."""

    def __init__(self, folder: Path, event_loop: str) -> None:
        self.loop = new_event_loop(event_loop)
        self.runners: list[web.AppRunner] = []
        self.ports: list[int] = []
        for fast_path in (True, False):
            home = folder / f"fast-{fast_path}"
            (home / "local").mkdir(parents=True)
            for data, digest in [(HOT, HOT_DIGEST), *COLD]:
                (home / "local" / digest).write_bytes(data)
            tiers = [
                {"name": "disk", "kind": "disk", "role": "cache", "path": str(home / "cache")},
                {"name": "local", "kind": "fs", "role": "source", "path": str(home / "local")},
            ]
            path = write_config(home / "config.toml", tiers, server={"fast_path": fast_path, "access_log": False})
            config = load_config(str(path), environ={})
            runner = make_runner(create_app(config), config)
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.runners.append(runner)
            self.ports.append(runner.addresses[0][1])
        assert isinstance(self.runners[0], FastPathRunner) and not isinstance(self.runners[1], FastPathRunner)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def servers(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Servers]:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    servers = Servers(tmp_path_factory.mktemp("fastpath-fuzz"), request.param)
    # The hot blob in memory on both: the fast path answers it from its first request.
    for port in servers.ports:
        servers.run(converse(port, [(get(f"/sha1/{HOT_DIGEST}"), True, 0)]))
    yield servers
    runner = servers.runners[0]
    assert isinstance(runner, FastPathRunner)
    hot = runner.hot
    print(f"fast path: {hot.answered} answered, {hot.taken_back} connections taken back")
    servers.close()
    assert hot.answered > 100 and hot.taken_back > 50, "the fuzz no longer drives the loan and return"


async def converse(port: int, steps: list[tuple[bytes, bool, int]]) -> tuple[list[Response], bool]:
    """Send each request (in two writes, split at its ``cut``), reading every answer due before
    the next whenever ``wait``; then the answers not yet read. Reading stops when the server
    closes; returns the answers and whether it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers: list[Response] = []
    due: list[str] = []  # the methods of the requests not yet answered

    async def read_due() -> bool:
        while due:
            try:
                status, headers, body = await asyncio.wait_for(read_response(reader, due[0]), 10)
            except asyncio.IncompleteReadError:
                return True
            due.pop(0)
            # the date and the request id differ per answer (a parser's 400 has no id)
            answers.append((status, {k: v for k, v in headers.items() if k not in ("date", "x-request-id")}, body))
        return False

    try:
        for raw, wait, cut in steps:
            # aiohttp alone drops the valid requests that share a read with a malformed one (its
            # parser fails the whole read) where the fast path answers them first: a difference
            # of timing, not of meaning. So garbage goes in once the answers before it are in.
            if raw.startswith(MALFORMED) and await read_due():
                return answers, True
            cut %= len(raw)
            for part in (raw[:cut], raw[cut:]):
                if part:
                    writer.write(part)
                    await writer.drain()
            due.append(raw.split(b" ", 1)[0].decode())
            if raw in LAST:  # the server closes after it: a client sends nothing more
                break
            if wait and await read_due():
                return answers, True
        if await read_due():
            return answers, True
        writer.write_eof()  # no more requests: a server that keeps the connection answers EOF with EOF
        return answers, await asyncio.wait_for(reader.read(1), 10) == b""
    except (ConnectionResetError, BrokenPipeError):
        return answers, True
    finally:
        writer.close()


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(requests, st.booleans(), st.integers(0, 200)), min_size=1, max_size=12))
def test_the_fast_path_answers_as_aiohttp_does(servers: Servers, steps: list[tuple[bytes, bool, int]]) -> None:
    fast, slow = (servers.run(converse(port, steps)) for port in servers.ports)
    assert fast == slow
