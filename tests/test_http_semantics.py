"""RFC 9110 semantics of the blob routes, and browsers: CORS and the cross-site write refusal.

Every test reaches the proxy through ``client`` over real HTTP, so a different front (a fast
path for hot hits) can be put under the same tests by parametrising that one fixture."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.server.fastpath import FastPathRunner
from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, make_blob, on_both_paths, write_config

Client = TestClient[web.Request, web.Application]
APP = "http://app.example"


make_proxy = on_both_paths()  # every test here runs with the fast path and without


@pytest.fixture
async def client(make_proxy: ProxyFactory, tmp_path: Path) -> Client:
    (tmp_path / "blobs").mkdir()
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]
    return await make_proxy(tiers, uploads={"targets": ["local"]}, cors={"allow_origins": [APP], "max_age": "5m"})


def stored(tmp_path: Path, size: int = 1000) -> tuple[bytes, str]:
    data, digest = make_blob(size)
    (tmp_path / "blobs" / digest).write_bytes(data)
    return data, digest


async def problem(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status
    return body


@pytest.mark.parametrize("method", ["TRACE", "PATCH", "OPTIONS", "POST"])
async def test_a_method_the_blob_route_does_not_serve_is_405_with_allow(
    client: Client, tmp_path: Path, method: str
) -> None:
    _, digest = stored(tmp_path)
    response = await client.request(method, f"/sha1/{digest}")
    await problem(response, 405)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "PUT", "DELETE"}
    # a name that is no digest stays a 400
    await problem(await client.request(method, "/sha1/nope"), 400)
    if method != "POST":
        response = await client.request(method, "/sha1/missing")
        await problem(response, 405)
        assert response.headers["Allow"] == "POST"


async def test_if_match(client: Client, tmp_path: Path) -> None:
    data, digest = stored(tmp_path)
    await problem(await client.get(f"/sha1/{digest}", headers={"If-Match": '"0000"'}), 412)
    await problem(await client.get(f"/sha1/{digest}", headers={"If-Match": f'W/"{digest}"'}), 412)  # strong
    for header in (f'"{digest}"', "*", f'"x", "{digest}"'):
        response = await client.get(f"/sha1/{digest}", headers={"If-Match": header})
        assert response.status == 200 and await response.read() == data
    _, absent = make_blob(10)
    await problem(await client.get(f"/sha1/{absent}", headers={"If-Match": "*"}), 412)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_if_none_match_is_304_only_for_a_blob_that_exists(client: Client, tmp_path: Path, method: str) -> None:
    _, digest = stored(tmp_path)
    for header in ("*", f'"{digest}"', f'W/"{digest}"'):
        response = await client.request(method, f"/sha1/{digest}", headers={"If-None-Match": header})
        assert response.status == 304
        assert response.headers["ETag"] == f'"{digest}"'
    _, absent = make_blob(10)
    for header in ("*", f'"{absent}"'):
        response = await client.request(method, f"/sha1/{absent}", headers={"If-None-Match": header})
        assert response.status == 404


@pytest.mark.parametrize("size", [1000, 300_000])  # from memory and from a file
async def test_if_range_that_is_not_the_etag_gives_the_whole_blob(client: Client, tmp_path: Path, size: int) -> None:
    data, digest = stored(tmp_path, size)
    for _ in range(2):  # the miss (a fill) and the hit
        stale = await client.get(f"/sha1/{digest}", headers={"Range": "bytes=10-19", "If-Range": '"other"'})
        assert stale.status == 200 and await stale.read() == data
        dated = {"Range": "bytes=10-19", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}
        response = await client.get(f"/sha1/{digest}", headers=dated)
        assert response.status == 200 and await response.read() == data
        current = await client.get(f"/sha1/{digest}", headers={"Range": "bytes=10-19", "If-Range": f'"{digest}"'})
        assert current.status == 206 and await current.read() == data[10:20]


async def test_head_ignores_range(client: Client, tmp_path: Path) -> None:
    _, digest = stored(tmp_path, 5000)
    for _ in range(2):
        response = await client.head(f"/sha1/{digest}", headers={"Range": "bytes=0-9"})
        assert response.status == 200
        assert response.headers["Content-Length"] == "5000"
        assert "Content-Range" not in response.headers
        await client.get(f"/sha1/{digest}")  # now a cache hit


async def raw_request(client: Client, request: bytes) -> tuple[int, dict[str, str], bytes]:
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        body = await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /sha1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    ],
)
async def test_unparseable_requests_get_problems_and_no_traceback(
    client: Client, request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    got, headers, body = await raw_request(client, request_bytes)
    assert got == status
    assert headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["status"] == status
    assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info]
    # the limits leave room for what real clients send
    assert (await client.get("/healthz", headers={"X-Long": "c" * 12000})).status == 200


async def test_bulk_data_get_of_gzip_at_rest_is_cacheable_and_sized_alike(client: Client) -> None:
    data, _ = make_blob(50_000)
    body = gzip.compress(data)
    sizes = []
    for how in ("post", "put"):
        slot = (await (await client.post("/bulk-data", json={"content_encoding": "gzip"})).json())[0]
        if how == "post":
            form = aiohttp.FormData(json.loads(slot["presignedPost"]["fields"]))
            form.add_field("file", body, filename="bulk_data")
            response = await client.session.post(slot["presignedPost"]["url"], data=form)
        else:
            headers = json.loads(slot["presignedPut"]["headers"])
            response = await client.session.put(slot["presignedPut"]["url"], data=body, headers=headers)
        assert response.status == 201, await response.text()
        sizes.append((await response.json())["size"])
        got = await client.session.get(slot["presignedGet"], auto_decompress=False)
        assert got.status == 200 and gzip.decompress(await got.read()) == data  # as stored: gzip
        assert got.headers["Content-Encoding"] == "gzip"
        assert "Accept-Encoding" in got.headers["Vary"]
        assert got.headers["ETag"] and got.headers["Cache-Control"]
        again = await client.session.get(
            slot["presignedGet"], headers={"If-None-Match": got.headers["ETag"]}, auto_decompress=False
        )
        assert again.status == 304
    assert sizes[0] == sizes[1]


# --- browsers ---------------------------------------------------------------------------


async def test_preflight_and_cors_headers_for_an_allowed_origin(client: Client, tmp_path: Path) -> None:
    data, digest = stored(tmp_path)
    for path, method in ((f"/sha1/{digest}", "GET"), (f"/sha1/{digest}", "PUT"), ("/sha1/missing", "POST")):
        ask = {"Origin": APP, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": "range"}
        response = await client.options(path, headers=ask)
        assert response.status == 204
        assert method in response.headers["Access-Control-Allow-Methods"]
        assert "Range" in response.headers["Access-Control-Allow-Headers"]
        assert response.headers["Access-Control-Allow-Origin"] == APP
        assert response.headers["Access-Control-Max-Age"] == "300"
    response = await client.get(f"/sha1/{digest}", headers={"Origin": APP})
    assert response.status == 200 and await response.read() == data
    assert response.headers["Access-Control-Allow-Origin"] == APP
    exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"ETag", "Content-Length", "Content-Range", "X-Cache", "X-Cache-Tier"} <= exposed
    missing = await client.get(f"/sha1/{make_blob(5)[1]}", headers={"Origin": APP})  # errors are readable too
    assert missing.status == 404 and missing.headers["Access-Control-Allow-Origin"] == APP
    other = await client.get(f"/sha1/{digest}", headers={"Origin": "http://evil.example"})
    assert other.status == 200 and "Access-Control-Allow-Origin" not in other.headers
    plain = await client.get(f"/sha1/{digest}")  # a shared cache must not give this to a page
    assert "Origin" in plain.headers.getall("Vary") and "Access-Control-Allow-Origin" not in plain.headers


@pytest.mark.parametrize(
    ("method", "condition"),
    [("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=2-9"}), ("GET", {"If-None-Match": "*"})],
    ids=["get", "head", "range", "304"],
)
async def test_a_hot_hit_without_origin_says_it_varies_by_origin(
    client: Client, tmp_path: Path, method: str, condition: dict[str, str]
) -> None:
    """On a fresh connection, so that a hot hit goes to the fast path where there is one."""
    data, digest = stored(tmp_path)
    warm = await client.get(f"/sha1/{digest}")
    assert warm.status == 200 and await warm.read() == data
    await client.app[STORE].wait_idle()
    runner = client.server.runner
    answered = runner.hot.answered if isinstance(runner, FastPathRunner) else 0
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, client.make_url(f"/sha1/{digest}"), headers=condition) as response,
    ):
        assert response.status in (200, 206, 304)
        assert "Origin" in response.headers.getall("Vary")
        assert "Access-Control-Allow-Origin" not in response.headers
    assert not isinstance(runner, FastPathRunner) or runner.hot.answered == answered + 1


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    ],
)
async def test_a_cross_site_write_is_refused_and_stores_nothing(
    client: Client, tmp_path: Path, headers: dict[str, str]
) -> None:
    data, digest = make_blob(100)
    plain = {"Content-Type": "text/plain", **headers}
    body = await problem(await client.post("/sha1", data=data, headers=plain), 403)
    assert "allow_origins" in body["detail"]
    await problem(await client.put(f"/sha1/{digest}", data=data, headers=plain), 403)
    await problem(await client.post("/bulk-data", json={}, headers=headers), 403)
    assert not (tmp_path / "blobs" / digest).exists()
    assert (await client.get(f"/sha1/{digest}")).status == 404
    # the same write from the allowed origin, from this server's own pages, or from curl
    for allowed in ({"Origin": APP}, {"Origin": str(client.make_url("")).rstrip("/")}, {}):
        response = await client.post("/sha1", data=data, headers=allowed)
        assert response.status in (200, 201), await response.text()


async def test_any_origin_may_read_but_not_write(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    tiers = [{"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")}]
    client = await make_proxy(tiers, cors={"allow_origins": ["*"]})
    data, digest = stored(tmp_path)
    somewhere = {"Origin": "http://somewhere.example"}
    response = await client.get(f"/sha1/{digest}", headers=somewhere)
    assert response.status == 200 and response.headers["Access-Control-Allow-Origin"] == "*"
    ask = {**somewhere, "Access-Control-Request-Method": "GET"}
    assert (await client.options(f"/sha1/{digest}", headers=ask)).status == 204
    ask = {**somewhere, "Access-Control-Request-Method": "PUT"}
    await problem(await client.options(f"/sha1/{digest}", headers=ask), 403)
    await problem(await client.put(f"/sha1/{digest}", data=data, headers=somewhere), 403)


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/path", "ftp://x"])
def test_an_allowed_origin_that_is_no_origin_is_a_config_error(tmp_path: Path, origin: str) -> None:
    path = write_config(tmp_path / "c.toml", [], cors={"allow_origins": ["https://ok.example", origin]})
    with pytest.raises(ConfigError, match=r"cors\.allow_origins\[1\]"):
        load_config(str(path), environ={})
