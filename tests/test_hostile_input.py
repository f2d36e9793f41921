"""Hostile and broken requests (issue 11, SPEC 5): each is a 4xx problem+json, never a 500."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.preflight import preflight
from proxy.server.accesslog import AccessLogger, printable
from proxy.service import build_service
from proxy.tickets import Signer
from tests.conftest import ProxyFactory, make_blob, write_config

Client = TestClient[web.Request, web.Application]
SECRET = "0123456789abcdef0123456789abcdef"
UP = {"Authorization": "Bearer up"}
ADMIN = {"Authorization": "Bearer admin"}
DEEP = b"[" * 100_000 + b"]" * 100_000


def tiers(tmp_path: Path) -> list[dict[str, Any]]:
    (tmp_path / "local").mkdir(parents=True, exist_ok=True)
    return [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "local", "kind": "fs", "path": str(tmp_path / "local")},
    ]


async def open_proxy(make_proxy: ProxyFactory, tmp_path: Path, require_ticket: bool = False) -> Client:
    return await make_proxy(
        tiers(tmp_path),
        uploads={"targets": ["local"]},
        auth={
            "require_ticket": require_ticket,
            "upload_tokens": ["up"],
            "admin_tokens": ["admin"],
            "ticket_secret": SECRET,
        },
        server={"max_upload_size": "1 MiB"},
    )


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, tmp_path: Path) -> Client:
    return await open_proxy(make_proxy, tmp_path)


async def problem(response: ClientResponse, status: int, type_: str | None = None) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    if type_ is not None:
        assert body["type"] == type_
    return body


async def stored(proxy: Client, size: int = 1000) -> tuple[bytes, str]:
    data, digest = make_blob(size)
    assert (await proxy.put(f"/sha1/{digest}", data=data, headers=UP)).status == 201
    return data, digest


async def raw(proxy: Client, request: bytes) -> bytes:
    """Send bytes aiohttp's client would refuse to, and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


# -- numbers in headers and query strings ------------------------------------------------------


async def test_absurd_range_numbers_are_ignored(proxy: Client) -> None:
    data, digest = await stored(proxy)
    for header in (f"bytes=0-{'9' * 5000}", f"bytes={'9' * 5000}-", "bytes=-" + "9" * 5000, "bytes=\u0660-\u0663"):
        response = await proxy.get(f"/sha1/{digest}", headers={"Range": header})
        assert response.status == 200 and await response.read() == data
    response = await proxy.get(f"/sha1/{digest}", headers={"Range": "bytes=2-4"})
    assert response.status == 206 and await response.read() == data[2:5]


@pytest.mark.parametrize(
    "query",
    ["expires=" + "9" * 5000 + "&sig=" + "a" * 64, "expires=²&sig=" + "a" * 64, "expires=9999999999&sig=é", "sig=x"],
)
async def test_malformed_tickets_are_forbidden(make_proxy: ProxyFactory, tmp_path: Path, query: str) -> None:
    for require_ticket in (True, False):
        proxy = await open_proxy(make_proxy, tmp_path / str(require_ticket), require_ticket)
        _, digest = await stored(proxy)
        await problem(await proxy.get(f"/sha1/{digest}?{query}"), 403, "forbidden")


async def test_a_ticket_is_checked_even_when_not_required(proxy: Client) -> None:
    data, digest = await stored(proxy)
    signer = Signer(SECRET.encode(), "", 60)
    expired = int(time.time()) - 10
    sig = signer.signature(f"/sha1/{digest}", expired)
    await problem(await proxy.get(f"/sha1/{digest}?expires={expired}&sig={sig}"), 403, "ticket-expired")
    await problem(await proxy.get(f"/sha1/{digest}?expires={expired + 9999}&sig={sig}"), 403, "forbidden")
    assert await (await proxy.get(f"/sha1/{digest}")).read() == data  # no ticket: open


async def test_raw_bytes_in_authorization_are_a_bad_token(proxy: Client) -> None:
    data, digest = make_blob(10)
    head = f"PUT /sha1/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n".encode()
    answer = await raw(proxy, head + b"Authorization: Bearer \xff\xfe\r\n\r\n" + data)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"application/problem+json" in answer


# -- bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"this is not gzip"),
        ("br", b"\xff\xff not brotli at all"),
        ("deflate", b"\x00\x01\x02\x03"),
        ("gzip", gzip.compress(b"payload") + b"trailing garbage"),
    ],
)
async def test_undecodable_upload_bodies_are_400(proxy: Client, encoding: str, body: bytes) -> None:
    _, digest = make_blob(7)
    headers = {**UP, "Content-Encoding": encoding}
    for response in (
        await proxy.put(f"/sha1/{digest}", data=body, headers=headers),
        await proxy.post("/sha1", data=body, headers=headers),
    ):
        if encoding == "deflate":
            # aiohttp's parser refuses a deflate stream it cannot even start before any handler
            # runs: its own plain-text 400, out of the application's reach.
            assert response.status == 400
        else:
            await problem(response, 400)


@pytest.mark.parametrize(("path", "headers"), [("/sha1/missing", {}), ("/bulk-data", UP), ("/jobs", ADMIN)])
@pytest.mark.parametrize("body", [DEEP, b'{"count": ' + b"7" * 5000 + b"}", b"\xff\xfe", b"{"])
async def test_json_routes_refuse_what_they_cannot_read(
    proxy: Client, path: str, headers: dict[str, str], body: bytes
) -> None:
    await problem(await proxy.post(path, data=body, headers={**headers, "Content-Type": "application/json"}), 400)


async def test_bulk_data_slots_refuse_bad_bodies(proxy: Client) -> None:
    response = await proxy.post("/bulk-data", json={"count": 1, "content_encoding": "gzip"}, headers=UP)
    slot = (await response.json())[0]
    put, post = slot["presignedPut"], slot["presignedPost"]
    not_gzip = await proxy.session.put(put["url"], data=b"plain bytes", headers=json.loads(put["headers"]))
    await problem(not_gzip, 400)
    await problem(
        await proxy.session.post(post["url"], data=b"not a form", headers={"Content-Type": "text/plain"}), 400
    )
    broken = {"Content-Type": "multipart/form-data; boundary=x"}
    await problem(await proxy.session.post(post["url"], data=b"--x\r\nbroken", headers=broken), 400)


async def test_a_gzip_bomb_to_a_bulk_form_is_413_in_bounded_memory(proxy: Client) -> None:
    response = await proxy.post("/bulk-data", json={"count": 1, "content_encoding": "gzip"}, headers=UP)
    post = (await response.json())[0]["presignedPost"]
    bomb = gzip.compress(b"\0" * (64 << 20), 9)  # 64 MiB decoded; the limit is 1 MiB
    form = aiohttp.FormData(json.loads(post["fields"]))
    form.add_field("file", bomb, filename="bulk_data")
    await problem(await proxy.session.post(post["url"], data=form), 413, "too-large")
    small = gzip.compress(b"fine" * 100)
    form = aiohttp.FormData(json.loads(post["fields"]))
    form.add_field("file", small, filename="bulk_data")
    assert (await proxy.session.post(post["url"], data=form)).status == 201


async def test_a_gzip_bomb_put_is_413(proxy: Client) -> None:
    _, digest = make_blob(7)
    bomb = gzip.compress(b"\0" * (64 << 20), 9)
    headers = {**UP, "Content-Encoding": "gzip"}
    await problem(await proxy.put(f"/sha1/{digest}", data=bomb, headers=headers), 413, "too-large")


# -- security ----------------------------------------------------------------------------------


async def test_require_ticket_makes_blob_answers_private_and_probes_need_a_token(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await open_proxy(make_proxy, tmp_path, require_ticket=True)
    _, digest = await stored(proxy)
    for method in ("GET", "HEAD"):
        response = await proxy.request(method, f"/sha1/{digest}", headers=UP)
        assert response.status == 200 and response.headers["Cache-Control"].startswith("private")
    etag = {"If-None-Match": f'"{digest}"', **UP}
    assert (await proxy.get(f"/sha1/{digest}", headers=etag)).headers["Cache-Control"].startswith("private")
    await problem(await proxy.post("/sha1/missing", json={"hashes": [digest]}), 401, "unauthorized")
    await problem(
        await proxy.post("/sha1/missing", json={"hashes": [digest]}, headers={"Authorization": "Bearer nope"}),
        403,
    )
    assert (await proxy.post("/sha1/missing", json={"hashes": [digest]}, headers=UP)).status == 200


async def test_without_require_ticket_blobs_stay_public(proxy: Client) -> None:
    _, digest = await stored(proxy)
    assert (await proxy.get(f"/sha1/{digest}")).headers["Cache-Control"].startswith("public")


def test_http_tier_with_a_password_and_a_token_is_a_config_error(tmp_path: Path) -> None:
    tier = {"name": "up", "kind": "http", "url": "http://user:pw@example.test/sha1/{hash}", "token": "t"}
    config = load_config(str(write_config(tmp_path / "c.toml", [tier])), environ={})
    with pytest.raises(ConfigError, match=r"tier 'up'\.token"):
        build_service(config)
    with pytest.raises(ConfigError, match=r"tiers\[0\] \(up\)\.token"):
        preflight(config)  # what check-config runs


# -- Expect: 100-continue --------------------------------------------------------------------


async def expect(proxy: Client, head: str) -> bytes:
    """Send only the head of an upload and read what comes back before any body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(head.encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_expect_continue_comes_only_after_the_checks(proxy: Client) -> None:
    _, digest = make_blob(10)

    def head(path: str, auth: str, length: int, expectation: str = "100-continue") -> str:
        return f"PUT {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\nExpect: {expectation}\r\n\r\n"

    token = "Authorization: Bearer up\r\n"
    assert (await expect(proxy, head(f"/sha1/{digest}", token, 10))).startswith(b"HTTP/1.1 100 Continue")
    for request, status in [
        (head(f"/sha1/{digest}", "", 10), b"401"),
        (head(f"/sha1/{digest}", "Authorization: Bearer nope\r\n", 10), b"403"),
        (head("/sha1/not-a-digest", token, 10), b"400"),
        (head(f"/sha1/{digest}", token, 2 << 20), b"413"),
        (head(f"/sha1/{digest}", token, 10, "fly"), b"417"),
    ]:
        answer = await expect(proxy, request)
        assert answer.startswith(b"HTTP/1.1 " + status), answer
        assert b"100 Continue" not in answer and b"application/problem+json" in answer


# -- clients that leave, and logs ------------------------------------------------------------


def test_control_characters_are_escaped_for_logs() -> None:
    assert printable("/sha1/x\n1.2.3.4 GET /admin 200") == "/sha1/x\\n1.2.3.4 GET /admin 200"
    assert printable("/a\r\x1b[2J\x7f\u2028é") == "/a\\r\\x1b[2J\\x7f\\u2028é"


async def test_a_newline_in_the_path_does_not_forge_an_access_log_line(
    make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(str(write_config(tmp_path / "c.toml", tiers(tmp_path))), environ={})
    from aiohttp.test_utils import TestServer

    from proxy.server.app import create_app

    access = logging.getLogger("test.hostile.access")
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server(access_log_class=AccessLogger, access_log=access)
    try:
        with caplog.at_level(logging.INFO, logger="test.hostile.access"):
            async with TestClient(server) as client:
                await client.get("/sha1/%0a127.0.0.1%20GET%20/forged%20200")
        lines = [r.getMessage() for r in caplog.records if r.name == "test.hostile.access"]
        assert len(lines) == 1 and "\n" not in lines[0] and "\\n127.0.0.1" in lines[0]
    finally:
        await server.close()


async def leave_early(port: int, path: str) -> None:
    """GET, read the head and a little body, then go away like aria2c's spare connections."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await reader.readexactly(1000)
    writer.transport.abort()  # a reset, not a polite close


def requests_with(status: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"route": "/sha1/{hash}", "method": "GET", "status": status}
    return REGISTRY.get_sample_value("casproxy_http_requests_total", labels) or 0.0


async def poll(condition: Any, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_client_that_leaves_a_stream_is_499_not_500(
    make_proxy: ProxyFactory, upstream: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, digest = make_blob(8 << 20)

    async def slow(request: web.Request, up: Any) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(data), 1 << 16):  # more than socket buffers hold, a piece at a time
            await response.write(data[start : start + (1 << 16)])
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    up = await upstream(slow)
    proxy = await make_proxy([{"name": "up", "kind": "http", "url": up.url}], server={"stream_threshold": "64 KiB"})
    before_499, before_500 = requests_with("499"), requests_with("500")
    with caplog.at_level(logging.INFO):
        await leave_early(proxy.port or 0, f"/sha1/{digest}")
        await poll(lambda: requests_with("499") > before_499)
    assert requests_with("500") == before_500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_that_leaves_a_sendfile_is_logged_and_counted_499(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "local").mkdir()
    data, digest = make_blob(32 << 20)  # a disk hit, not in memory: sent with sendfile
    (tmp_path / "local" / digest).write_bytes(data)
    disk = {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")}
    local = {"name": "local", "kind": "fs", "path": str(tmp_path / "local")}
    config = load_config(str(write_config(tmp_path / "c.toml", [disk, local])), environ={})
    from aiohttp.test_utils import TestServer

    from proxy.server.app import create_app

    access = logging.getLogger("test.hostile.sendfile")
    server = TestServer(create_app(config), host="127.0.0.1")
    await server.start_server(access_log_class=AccessLogger, access_log=access)

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "test.hostile.sendfile"]

    # (The level first: aiohttp decides whether to log when a connection opens.)
    with caplog.at_level(logging.INFO, logger="test.hostile.sendfile"):
        async with TestClient(server) as client:
            async with client.get(f"/sha1/{digest}") as response:  # the fill: streamed, then cached
                assert (response.headers["X-Cache"], await response.read() == data) == ("MISS", True)
            before_200, before_499 = requests_with("200"), requests_with("499")
            await leave_early(server.port or 0, f"/sha1/{digest}")
            # Counted as logged, once the sendfile has ended: not at the handler's return.
            await poll(lambda: requests_with("499") == before_499 + 1)
            assert requests_with("200") == before_200

            async with client.get(f"/sha1/{digest}") as response:
                assert (response.status, response.headers["X-Cache"]) == (200, "HIT")
                assert await response.read() == data
            await poll(lambda: requests_with("200") == before_200 + 1)
            await poll(lambda: len(logged()) == 3)
    assert [line.split()[3] for line in logged()] == ["200", "499", "200"], logged()  # fill, left, hit
    assert requests_with("499") == before_499 + 1
