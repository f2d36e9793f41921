"""The hot-hit fast path over raw sockets: the same bytes as aiohttp's answers, and HTTP/1.1's
edges (pipelining mixed with requests it leaves to aiohttp, HTTP/1.0, Connection: close,
smuggling attempts, oversized heads) answered exactly as without it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from proxy.config import load_config
from proxy.server.fastpath import FastPathRunner
from proxy.server.handoff import aiohttp_idle
from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, ProxyServer, free_port, make_blob, write_config
from tests.processes import ProxyProcess, wait_until

Client = TestClient[web.Request, web.Application]
Response = tuple[int, dict[str, str], bytes]


async def start(make_proxy: ProxyFactory, tmp_path: Path, fast_path: bool) -> Client:
    (tmp_path / "blobs").mkdir(exist_ok=True)
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / f"cache-{fast_path}")},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]
    return await make_proxy(tiers, uploads={"targets": ["local"]}, server={"fast_path": fast_path})


async def warm(clients: tuple[Client, ...], tmp_path: Path, size: int, algorithm: str = "sha1") -> tuple[bytes, str]:
    """A blob the proxies now hold in memory: each fetched it once from the fs source."""
    data, digest = make_blob(size, algorithm=algorithm)
    (tmp_path / "blobs" / digest).write_bytes(data)
    for client in clients:
        response = await client.get(f"/{algorithm}/{digest}")
        assert response.status == 200 and await response.read() == data
        await client.app[STORE].wait_idle()
    return data, digest


def answered(client: Client) -> int:
    runner = client.server.runner
    return runner.hot.answered if isinstance(runner, FastPathRunner) else 0


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        assert headers.get("transfer-encoding") == "chunked", headers
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                break
            body = body[:-2]
        body = body[:-2]
    return status, headers, body


async def exchange(client: Client, raw: bytes, methods: list[str]) -> tuple[list[Response], bool]:
    """Send raw bytes in one write; read one response per method, in order; then whether the
    server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(raw)
        responses = [await asyncio.wait_for(read_response(reader, m), 10) for m in methods]
        closed = (
            await asyncio.wait_for(reader.read(1), 10) == b"" if "close" in raw.decode("latin-1").lower() else False
        )
        return responses, closed
    finally:
        writer.close()


def get(path: str, *headers: str, method: str = "GET", version: str = "1.1") -> bytes:
    return (
        f"{method} {path} HTTP/{version}\r\nHost: x\r\n{''.join(h + chr(13) + chr(10) for h in headers)}\r\n".encode()
    )


def post_missing(*digests: str) -> bytes:
    """``POST /sha1/missing`` asking after ``digests``: a request with a body, aiohttp's."""
    body = json.dumps({"hashes": list(digests)}).encode()
    head = get("/sha1/missing", "Content-Type: application/json", f"Content-Length: {len(body)}", method="POST")
    return head + body


def comparable(response: Response) -> Response:
    """Without what differs per answer: the date and the request id (each must be there)."""
    status, headers, body = response
    assert re.fullmatch(r"[0-9a-f]{16}", headers["x-request-id"]), headers
    return status, {k: v for k, v in headers.items() if k not in ("date", "x-request-id")}, body


@pytest.fixture
async def pair(make_proxy: ProxyFactory, tmp_path: Path) -> tuple[Client, Client]:
    return await start(make_proxy, tmp_path, True), await start(make_proxy, tmp_path, False)


@pytest.mark.parametrize(
    ("headers", "method"),
    [
        ((), "GET"),
        ((), "HEAD"),
        (("Range: bytes=0-9",), "GET"),
        (("Range: bytes=-5",), "GET"),
        (("Range: bytes=70000-",), "GET"),
        (("Range: bytes=0-1,5-6",), "GET"),  # several ranges: the whole blob
        (("Range: bytes=0-9",), "HEAD"),  # left to aiohttp
        (("Range: bytes=200000-",), "GET"),  # unsatisfiable: aiohttp's 416
        (('If-None-Match: "{d}"',), "GET"),
        (('If-None-Match: W/"{d}"',), "HEAD"),
        (("If-None-Match: *",), "GET"),
        (('If-None-Match: "other"',), "GET"),
        (('If-Match: "other"',), "GET"),  # left to aiohttp
        (("Connection: close",), "GET"),
        (("Accept: */*", "User-Agent: test"), "GET"),
    ],
)
async def test_same_answer_as_aiohttp(
    pair: tuple[Client, Client], tmp_path: Path, headers: tuple[str, ...], method: str
) -> None:
    fast, slow = pair
    data, digest = await warm(pair, tmp_path, 100_000)
    request = get(f"/sha1/{digest}", *(h.format(d=digest) for h in headers), method=method)
    before = answered(fast)
    (fast_answer,), _ = await exchange(fast, request, [method])
    (slow_answer,), _ = await exchange(slow, request, [method])
    assert comparable(fast_answer) == comparable(slow_answer)
    assert fast_answer[0] != 200 or method == "HEAD" or fast_answer[2] == data
    unsure = any(h.startswith(("If-Match", "Range: bytes=200000")) for h in headers) or (
        method == "HEAD" and any(h.startswith("Range") for h in headers)
    )
    assert answered(fast) == before + (0 if unsure else 1)


async def test_sha256_in_capitals(pair: tuple[Client, Client], tmp_path: Path) -> None:
    fast, _ = pair
    data, digest = await warm((fast,), tmp_path, 5000, "sha256")
    before = answered(fast)
    ((status, headers, body),), _ = await exchange(fast, get(f"/sha256/{digest.upper()}"), ["GET"])
    assert (status, body, headers["etag"]) == (200, data, f'"{digest}"')
    assert answered(fast) == before + 1


async def test_pipelined_requests_are_answered_in_order(pair: tuple[Client, Client], tmp_path: Path) -> None:
    """Hot hits, a body-carrying POST, a miss, a 404 and a HEAD in one packet: the fast path
    answers until the first request it leaves to aiohttp, which then answers the rest in order."""
    fast, slow = pair
    hot, hot_digest = await warm(pair, tmp_path, 3000)
    cold, cold_digest = make_blob(70_000)
    (tmp_path / "blobs" / cold_digest).write_bytes(cold)
    raw = (
        get(f"/sha1/{hot_digest}")
        + get(f"/sha1/{hot_digest}", "Range: bytes=1-2")
        + post_missing(make_blob(10)[1])
        + get(f"/sha1/{hot_digest}")
        + get(f"/sha1/{cold_digest}")
        + get(f"/sha1/{make_blob(11)[1]}")
        + get(f"/sha1/{hot_digest}", method="HEAD")
    )
    methods = ["GET", "GET", "POST", "GET", "GET", "GET", "HEAD"]
    before = answered(fast)
    for client in (fast, slow):
        responses, _ = await exchange(client, raw, methods)
        assert [r[0] for r in responses] == [200, 206, 200, 200, 200, 404, 200]
        assert responses[0][2] == hot and responses[1][2] == hot[1:3] and responses[3][2] == hot
        assert b"missing" in responses[2][2] and responses[4][2] == cold
        assert responses[6][1]["content-length"] == "3000"
    assert answered(fast) == before + 2  # the two before the POST


async def test_split_head_and_keep_alive(pair: tuple[Client, Client], tmp_path: Path) -> None:
    """A head that arrives a few bytes at a time, then more requests on the same connection."""
    fast, _ = pair
    data, digest = await warm(pair, tmp_path, 1000)
    request = get(f"/sha1/{digest}")
    before = answered(fast)
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
    try:
        for _ in range(3):
            for i in range(0, len(request), 7):
                writer.write(request[i : i + 7])
                await writer.drain()
            status, _, body = await asyncio.wait_for(read_response(reader), 10)
            assert (status, body) == (200, data)
    finally:
        writer.close()
    assert answered(fast) == before + 3


@pytest.mark.parametrize(
    "raw",
    [
        # HTTP/1.0: aiohttp's answer, then the connection closes
        "GET /sha1/{d} HTTP/1.0\r\n\r\n",
        # bare LF line ends
        "GET /sha1/{d} HTTP/1.1\nHost: x\n\n",
        # a query (tickets live there)
        "GET /sha1/{d}?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        # a repeated header read here
        "GET /sha1/{d} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\nConnection: close\r\n\r\n",
        # an Expect on a GET
        "GET /sha1/{d} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    ],
)
async def test_requests_it_is_unsure_of_get_aiohttps_answer(
    pair: tuple[Client, Client], tmp_path: Path, raw: str
) -> None:
    fast = pair[0]
    _, digest = await warm(pair, tmp_path, 500)
    before = answered(fast)
    answers = [await raw_answer(client, raw.format(d=digest).encode()) for client in pair]
    assert answers[0] == answers[1]
    assert answered(fast) == before


@pytest.mark.parametrize(
    "raw",
    [
        # CL+TE: a smuggling attempt is aiohttp's to refuse, whole
        "GET /sha1/{d} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        "GET /sha1/{d} HTTP/1.1\r\nHost: x\r\n\r\n",
        # a chunked body on a GET (aiohttp reads and ignores it)
        "GET /sha1/{d} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        # a head far over aiohttp's limits
        "GET /sha1/{d} HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * 20000 + "\r\n\r\n",
        # a request line far over them
        "GET /sha1/{d}" + "a" * 20000 + " HTTP/1.1\r\nHost: x\r\n\r\n",
        # garbage
        "GET /sha1/{d} HTTP/1.1\r\nHo st: x\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ],
)
async def test_malformed_and_smuggling_requests(pair: tuple[Client, Client], tmp_path: Path, raw: str) -> None:
    fast = pair[0]
    _, digest = await warm(pair, tmp_path, 500)
    before = answered(fast)
    answers = [await raw_answer(client, raw.format(d=digest).encode()) for client in pair]
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.")
    if "Content-Length: 4" in raw:  # RFC 9112 6.1: a request with both is refused, not guessed at
        assert answers[0][9:13] == b"400 "
    assert answered(fast) == before


async def raw_answer_until_closed(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def raw_answer(client: Client, raw: bytes) -> bytes:
    """Everything the server sends until it closes (or 2 s of silence), Date and X-Request-Id
    lines (per answer) removed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(raw)
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    lines = received.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.startswith((b"Date: ", b"X-Request-Id: ")))


async def test_hits_are_counted_and_logged(
    pair: tuple[Client, Client], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fast, _ = pair
    _, digest = await warm(pair, tmp_path, 2000)

    def count() -> float:
        labels = {"route": "/sha1/{hash}", "method": "GET", "status": "206"}
        return REGISTRY.get_sample_value("casproxy_http_requests_total", labels) or 0.0

    def timed() -> float:
        labels = {"route": "/sha1/{hash}", "method": "GET"}
        return REGISTRY.get_sample_value("casproxy_http_request_duration_seconds_count", labels) or 0.0

    requests, observations, before = count(), timed(), answered(fast)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        ((_, headers, _),), _ = await exchange(
            fast, get(f"/sha1/{digest}", "Range: bytes=0-99", "X-Request-Id: lb-7", "User-Agent: probe/1"), ["GET"]
        )
    assert answered(fast) == before + 1
    assert count() == requests + 1 and timed() == observations + 1
    assert headers["x-request-id"] == "lb-7"  # a sane incoming id is kept, as aiohttp's answers do
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(f"GET /sha1/{digest} 206 " in line and line.endswith('HIT disk lb-7 "probe/1"') for line in lines), lines


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_casproxy_serve_answers_pipelined_hits_and_misses(tmp_path: Path, event_loop: str) -> None:
    """The real start-up path (`casproxy serve`), on both event loops: uvloop's transports are
    not asyncio's classes, and set_protocol must hand the connection over on both."""
    (tmp_path / "blobs").mkdir()
    hot, hot_digest = make_blob(2000)
    cold, cold_digest = make_blob(3000)
    # Fetched, then sent from its file (checked and kept in memory), then a fast-path hit: a
    # large body goes out with its head in one writev, and what the socket does not take after.
    big, big_digest = make_blob(1536 << 10)
    for data, digest in ((hot, hot_digest), (cold, cold_digest), (big, big_digest)):
        (tmp_path / "blobs" / digest).write_bytes(data)
    port = free_port()
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]
    config = write_config(
        tmp_path / "config.toml",
        tiers,
        server={"host": "127.0.0.1", "port": port, "event_loop": event_loop},
        uploads={"targets": ["local"]},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_healthy(session, 30)
            async with session.get(f"{proxy.url}/sha1/{hot_digest}") as response:
                assert await response.read() == hot
        for _ in range(3):  # the second time both small ones are hits, the third time all
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                paths = (hot_digest, big_digest, cold_digest, big_digest, hot_digest)
                writer.write(b"".join(get(f"/sha1/{digest}") for digest in paths))
                bodies = [(await asyncio.wait_for(read_response(reader), 10))[2] for _ in paths]
            finally:
                writer.close()
            assert bodies == [hot, big, cold, big, hot]
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log.read_text()


async def keep_alive_server(tmp_path: Path, blobs: list[tuple[bytes, str]], fast_path: bool = True) -> ProxyServer:
    """A started server, as `casproxy serve` builds one, closing idle connections after 1 s; the
    blobs are in its fs source."""
    (tmp_path / "blobs").mkdir()
    for data, digest in blobs:
        (tmp_path / "blobs" / digest).write_bytes(data)
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]
    path = write_config(tmp_path / "c.toml", tiers, server={"fast_path": fast_path}, uploads={"targets": ["local"]})
    server = ProxyServer(load_config(str(path), environ={}), keepalive_timeout=1.0, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    return server


@pytest.mark.parametrize("fast_path", [True, False])
async def test_idle_keep_alive_connections_are_closed(tmp_path: Path, fast_path: bool) -> None:
    """After keepalive_timeout without a request the server closes, on both paths; a client
    that keeps asking is not cut off."""
    data, digest = make_blob(100)
    server = await keep_alive_server(tmp_path, [(data, digest)], fast_path)
    assert server.port is not None
    try:
        await raw_answer_until_closed(server.port, get(f"/sha1/{digest}", "Connection: close"))  # the miss
        await server.app[STORE].wait_idle()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(4):  # a request every 0.4 s keeps the connection for longer than the timeout
            writer.write(get(f"/sha1/{digest}"))
            assert (await asyncio.wait_for(read_response(reader), 10))[2] == data
            await asyncio.sleep(0.4)
        assert await asyncio.wait_for(reader.read(1), 10) == b""  # then closed, well within 10 s
        writer.close()
        runner = server.runner
        assert not fast_path or (isinstance(runner, FastPathRunner) and runner.hot.answered == 4)
    finally:
        await server.close()


async def test_pipelined_large_hits_to_a_slow_reader(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """Many pipelined 1 MiB hits, read slowly: the fast path stops reading requests while the
    client is behind (pause_writing) and answers the rest, in order, when it catches up; a miss
    at the end is still aiohttp's."""
    (tmp_path / "blobs").mkdir()
    tiers = [
        {
            "name": "disk",
            "kind": "disk",
            "role": "cache",
            "path": str(tmp_path / "cache"),
            "memory_item_limit": "2 MiB",
        },
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]
    fast = await make_proxy(tiers, uploads={"targets": ["local"]})
    blobs = [await warm((fast,), tmp_path, 1 << 20) for _ in range(2)]
    cold, cold_digest = make_blob(5000)
    (tmp_path / "blobs" / cold_digest).write_bytes(cold)
    order = [blobs[i % 2] for i in range(12)]
    before = answered(fast)
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port, limit=1 << 16)
    try:
        writer.write(b"".join(get(f"/sha1/{digest}") for _, digest in order) + get(f"/sha1/{cold_digest}"))
        for data, _ in order:
            await asyncio.sleep(0.02)  # let the server's buffer fill past its high-water mark
            assert (await asyncio.wait_for(read_response(reader), 10))[2] == data
        assert (await asyncio.wait_for(read_response(reader), 10))[2] == cold
    finally:
        writer.close()
    assert answered(fast) == before + 12


async def test_json_access_line(make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "blobs").mkdir()
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]
    client = await make_proxy(tiers, uploads={"targets": ["local"]}, server={"log_format": "json"})
    _, digest = await warm((client,), tmp_path, 300)
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        await exchange(client, get(f"/sha1/{digest}", method="HEAD"), ["HEAD"])
    fields = [getattr(r, "request", None) for r in caplog.records if r.name == "aiohttp.access"]
    assert answered(client) == 1
    assert {"method": "HEAD", "path": f"/sha1/{digest}", "status": 200, "cache": "HIT", "tier": "disk"}.items() <= (
        fields[-1] or {}
    ).items()


def taken_back(client: Client) -> int:
    runner = client.server.runner
    assert isinstance(runner, FastPathRunner)
    return runner.hot.taken_back


def aiohttp_settled(client: Client) -> bool:
    """Whether every connection aiohttp's handler met waits, idle, for a next request (the
    fast path takes such a connection back on its next bytes)."""
    runner = client.server.runner
    assert runner is not None
    inner = web.AppRunner.server.__get__(runner)
    return bool(inner.connections) and all(aiohttp_idle(handler) for handler in inner.connections)


async def test_a_connection_lent_to_aiohttp_comes_back_for_hits(pair: tuple[Client, Client], tmp_path: Path) -> None:
    """One keep-alive connection: a miss, a POST with a body and a 404 are aiohttp's; each hit
    after them is the fast path's again, with the same bytes as without it. A POST that follows
    one of aiohttp's answers is not taken back at all (it could not be a hit)."""
    fast, slow = pair
    hot, hot_digest = await warm(pair, tmp_path, 3000)
    cold, cold_digest = make_blob(70_000)
    (tmp_path / "blobs" / cold_digest).write_bytes(cold)
    missing = post_missing(make_blob(10)[1])
    steps: list[tuple[bytes, str, bool]] = [  # (request, method, answered by the fast path)
        (get(f"/sha1/{cold_digest}"), "GET", False),
        (get(f"/sha1/{hot_digest}"), "GET", True),
        (missing, "POST", False),
        (get(f"/sha1/{hot_digest}", "Range: bytes=1-2"), "GET", True),
        (get(f"/sha1/{make_blob(11)[1]}"), "GET", False),
        (missing, "POST", False),
        (get(f"/sha1/{hot_digest}", method="HEAD"), "HEAD", True),
    ]
    answers: dict[str, list[Response]] = {}
    for name, client in (("fast", fast), ("slow", slow)):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        answers[name] = []
        try:
            for index, (request, method, by_fast_path) in enumerate(steps):
                if name == "fast" and index:  # aiohttp may still be finishing its last answer
                    await wait_until(lambda: aiohttp_settled(fast), 10, "aiohttp to wait for a request")
                before, returns = answered(fast), taken_back(fast)
                writer.write(request)
                answers[name].append(comparable(await asyncio.wait_for(read_response(reader, method), 10)))
                if name == "fast":
                    assert answered(fast) == before + by_fast_path, request
                    assert taken_back(fast) == returns + by_fast_path, request
        finally:
            writer.close()
    assert answers["fast"] == answers["slow"]
    assert [status for status, _, _ in answers["fast"]] == [200, 200, 200, 206, 404, 200, 200]
    assert answers["fast"][0][2] == cold and answers["fast"][1][2] == hot


async def test_a_request_split_after_a_lent_one_stays_aiohttps(pair: tuple[Client, Client], tmp_path: Path) -> None:
    """A miss, then half of a hit's head in the same packet: aiohttp's parser holds that half,
    so the rest of it must go to aiohttp too (the fast path takes the connection back only
    between requests); the hit after it is the fast path's."""
    fast, _ = pair
    hot, hot_digest = await warm(pair, tmp_path, 2000)
    cold, cold_digest = make_blob(5000)
    (tmp_path / "blobs" / cold_digest).write_bytes(cold)
    hit = get(f"/sha1/{hot_digest}")
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
    try:
        before, returns = answered(fast), taken_back(fast)
        writer.write(get(f"/sha1/{cold_digest}") + hit[:10])
        assert (await asyncio.wait_for(read_response(reader), 10))[2] == cold
        await fast.app[STORE].wait_idle()
        writer.write(hit[10:])
        assert (await asyncio.wait_for(read_response(reader), 10))[2] == hot
        assert (answered(fast), taken_back(fast)) == (before, returns)  # aiohttp answered both
        writer.write(hit)
        assert (await asyncio.wait_for(read_response(reader), 10))[2] == hot
        assert (answered(fast), taken_back(fast)) == (before + 1, returns + 1)
    finally:
        writer.close()


async def test_a_connection_back_from_aiohttp_keeps_its_keep_alive(tmp_path: Path) -> None:
    """aiohttp's keep-alive timer, started after the miss it answered, must not close the
    connection the fast path then serves hits on; the fast path's own closes it when idle; and
    aiohttp's server forgets the connection when it ends."""
    hot, hot_digest = make_blob(100)
    cold, cold_digest = make_blob(200)
    server = await keep_alive_server(tmp_path, [(hot, hot_digest), (cold, cold_digest)])
    assert server.port is not None and isinstance(server.runner, FastPathRunner)
    aiohttp_server = web.AppRunner.server.__get__(server.runner)  # the web.Server behind the fast path
    try:
        await raw_answer_until_closed(server.port, get(f"/sha1/{hot_digest}", "Connection: close"))
        await server.app[STORE].wait_idle()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(get(f"/sha1/{cold_digest}"))  # aiohttp's
        assert (await asyncio.wait_for(read_response(reader), 10))[2] == cold
        for _ in range(4):  # hits every 0.4 s: past aiohttp's timer (1 s after the miss)
            await asyncio.sleep(0.4)
            writer.write(get(f"/sha1/{hot_digest}"))
            assert (await asyncio.wait_for(read_response(reader), 10))[2] == hot
        assert len(aiohttp_server.connections) == 1
        assert await asyncio.wait_for(reader.read(1), 10) == b""  # then closed, idle
        writer.close()
        assert (server.runner.hot.answered, server.runner.hot.taken_back) == (4, 1)
        await wait_until(lambda: not aiohttp_server.connections, 10, "aiohttp to forget the connection")
    finally:
        await server.close()


async def test_a_lent_head_with_a_body_does_not_skew_the_fast_paths_parser(
    pair: tuple[Client, Client], tmp_path: Path
) -> None:
    """A GET /sha1/... with a body is aiohttp's; the fast path's own parser was fed its head
    and so waits for the body. After take-back the next head must not be read as that body: here
    the first bytes of a valid request (its request line and Content-Length) would vanish into it,
    the rest parse as a hit, and the request's body be answered as one more request."""
    fast, slow = pair
    hot, hot_digest = await warm(pair, tmp_path, 2000)
    cold, cold_digest = make_blob(3000)
    (tmp_path / "blobs" / cold_digest).write_bytes(cold)
    smuggled = get(f"/sha1/{hot_digest}", method="HEAD")
    hidden = f"GET /sha1/{cold_digest} HTTP/1.1\r\nContent-Length: {len(smuggled)}\r\nX: ".encode()
    first = get(f"/sha1/{hot_digest}", f"Content-Length: {len(hidden)}") + b"x" * len(hidden)
    # One valid request: a GET of the cold blob with headers X and Host, and a body of len(smuggled)
    second = hidden + get(f"/sha1/{hot_digest}") + smuggled
    probe = get(f"/sha1/{make_blob(12)[1]}")  # a 404: the answer after the second one's
    for name, client in (("fast", fast), ("slow", slow)):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            writer.write(first)
            assert (await asyncio.wait_for(read_response(reader), 10))[2] == hot
            if name == "fast":
                await wait_until(lambda: aiohttp_settled(fast), 10, "aiohttp to wait for a request")
            writer.write(second + probe)
            status, _, body = await asyncio.wait_for(read_response(reader), 10)
            assert (status, len(body)) == (200, len(cold)), name  # not the hot blob's 2000 bytes
            assert body == cold
            assert (await asyncio.wait_for(read_response(reader), 10))[0] == 404, name  # not a HEAD's
        finally:
            writer.close()
        await client.app[STORE].wait_idle()
    assert taken_back(fast) == 1


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("stalled", ["POST /upload HTTP/1.1\r\nHost:", "GET /sha1/"])
async def test_a_stalled_head_after_a_lent_request_is_closed(tmp_path: Path, fast_path: bool, stalled: str) -> None:
    """After a request aiohttp answered, a client sends part of a head and nothing more: aiohttp
    closes such a connection after keepalive_timeout (its timer finds it waiting); so must the
    fast path, whether it lends the partial head to aiohttp or holds it itself."""
    cold, cold_digest = make_blob(200)
    server = await keep_alive_server(tmp_path, [(cold, cold_digest)], fast_path)
    assert server.port is not None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(get(f"/sha1/{cold_digest}"))  # aiohttp's (a miss)
            assert (await asyncio.wait_for(read_response(reader), 10))[2] == cold
            await server.app[STORE].wait_idle()
            writer.write(stalled.encode())
            assert await asyncio.wait_for(reader.read(1), 8) == b""  # closed, well after 1 s
        finally:
            writer.close()
    finally:
        await server.close()


def chunked_missing(body: str, split: int) -> tuple[bytes, bytes]:
    """A chunked POST /sha1/missing, cut into two packets at split."""
    raw = get("/sha1/missing", "Content-Type: application/json", "Transfer-Encoding: chunked", method="POST")
    raw += f"{len(body):x};ext=1\r\n{body}\r\n0\r\n\r\n".encode()
    return raw[:split], raw[split:]


@pytest.mark.parametrize("case", ["queue", "chunked"])
async def test_take_back_after_many_pipelined_and_split_bodies(
    pair: tuple[Client, Client], tmp_path: Path, case: str
) -> None:
    """40 pipelined 404s (past aiohttp's queue of 32), or a chunked body split across packets with
    a hit behind it in the second: the same answers, in order, with and without the fast path; the
    hit after them is the fast path's."""
    fast, slow = pair
    hot, hot_digest = await warm(pair, tmp_path, 2000)
    missing = '{"hashes": ["' + make_blob(10)[1] + '"]}'
    if case == "queue":
        packets = [b"".join(get(f"/sha1/{make_blob(20 + i)[1]}") for i in range(40))]
        methods = ["GET"] * 40
    else:
        head, rest = chunked_missing(missing, len(get("/sha1/missing")) + 40)
        packets = [head, rest + get(f"/sha1/{hot_digest}")]
        methods = ["POST", "GET"]
    answers = {}
    for name, client in (("fast", fast), ("slow", slow)):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        try:
            for packet in packets:
                writer.write(packet)
                await writer.drain()
                await asyncio.sleep(0.05)
            answers[name] = [comparable(await asyncio.wait_for(read_response(reader, m), 10)) for m in methods]
            if name == "fast":
                await wait_until(lambda: aiohttp_settled(fast), 10, "aiohttp to wait for a request")
                before = answered(fast)
            writer.write(get(f"/sha1/{hot_digest}"))
            answers[name].append(comparable(await asyncio.wait_for(read_response(reader), 10)))
        finally:
            writer.close()
    assert answers["fast"] == answers["slow"]
    assert answers["fast"][-1][2] == hot
    assert answered(fast) == before + 1


async def test_no_take_back_behind_a_parser_other_than_llhttp(
    pair: tuple[Client, Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS) may split a stream otherwise than
    llhttp: a connection lent to it stays its own, and every answer is still right."""
    import aiohttp.web_protocol
    from aiohttp.http_parser import HttpRequestParserPy

    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    fast, _ = pair
    hot, hot_digest = await warm(pair, tmp_path, 2000)
    reader, writer = await asyncio.open_connection("127.0.0.1", fast.port)
    try:
        before, returns = answered(fast), taken_back(fast)
        for path, want in ((f"/sha1/{make_blob(12)[1]}", 404), (f"/sha1/{hot_digest}", 200)):
            writer.write(get(path))
            status, _, body = await asyncio.wait_for(read_response(reader), 10)
            assert status == want and (status != 200 or body == hot)
        assert (answered(fast), taken_back(fast)) == (before, returns)
    finally:
        writer.close()


async def test_curl_reusing_one_connection_over_misses_and_hits(pair: tuple[Client, Client], tmp_path: Path) -> None:
    """A real client: one curl fetching a miss, a hit, a 404 and the hit again over one
    connection. Every body is right, curl connects once, and the hits after aiohttp's answers
    are the fast path's."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (scripts/test installs it with apt-get)")
    fast, _ = pair
    hot, hot_digest = await warm(pair, tmp_path, 4096)
    cold, cold_digest = make_blob(5000)
    (tmp_path / "blobs" / cold_digest).write_bytes(cold)
    digests = [cold_digest, hot_digest, make_blob(13)[1], hot_digest]
    command = [curl, "--silent", "--show-error", "--write-out", "%{http_code} %{num_connects}\\n"]
    for index, digest in enumerate(digests):
        command += ["--output", str(tmp_path / f"body-{index}"), f"http://127.0.0.1:{fast.port}/sha1/{digest}"]
    before, returns = answered(fast), taken_back(fast)
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert out.decode().split("\n")[:4] == ["200 1", "200 0", "404 0", "200 0"]  # one connection
    assert (tmp_path / "body-0").read_bytes() == cold and (tmp_path / "body-1").read_bytes() == hot
    assert (tmp_path / "body-3").read_bytes() == hot
    assert (answered(fast), taken_back(fast)) == (before + 2, returns + 2)
