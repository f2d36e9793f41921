"""GET/HEAD/POST missing over real HTTP: headers, ranges, conditional requests, errors."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, make_blob, on_both_paths

Client = TestClient[web.Request, web.Application]


def tiers(tmp_path: Path, **disk: Any) -> list[dict[str, Any]]:
    (tmp_path / "blobs").mkdir(exist_ok=True)
    return [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache"), **disk},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]


make_proxy = on_both_paths()  # every test here runs with the fast path and without


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, tmp_path: Path) -> Client:
    return await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]}, server={"stream_threshold": 65536})


def put_file(tmp_path: Path, size: int, algorithm: str = "sha1") -> tuple[bytes, str]:
    data, digest = make_blob(size, algorithm=algorithm)
    (tmp_path / "blobs" / digest).write_bytes(data)
    return data, digest


async def problem(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["type"] == type_ and body["status"] == status and body["title"] and body["detail"]
    return body


@pytest.mark.parametrize("size", [0, 1, 5000, 65536, 300_000])
async def test_miss_then_hit_with_every_header(proxy: Client, tmp_path: Path, size: int) -> None:
    data, digest = put_file(tmp_path, size)
    for expected_cache, tier in (("MISS", "local"), ("HIT", "disk")):
        response = await proxy.get(f"/sha1/{digest}")
        assert response.status == 200
        assert await response.read() == data
        headers = response.headers
        assert headers["ETag"] == f'"{digest}"'
        assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert headers["Accept-Ranges"] == "bytes"
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["Content-Length"] == str(size)
        assert (headers["X-Cache"], headers["X-Cache-Tier"]) == (expected_cache, tier)
        await proxy.app[STORE].wait_idle()


async def test_sha256_route_and_case_insensitive_names(proxy: Client, tmp_path: Path) -> None:
    data, digest = put_file(tmp_path, 1000, "sha256")
    response = await proxy.get(f"/sha256/{digest.upper()}")
    assert response.status == 200 and await response.read() == data
    await problem(await proxy.get(f"/sha1/{digest}"), 400, "bad-digest")  # a sha256 is no sha1


async def test_large_blob_streams_on_a_miss(proxy: Client, tmp_path: Path) -> None:
    data, digest = put_file(tmp_path, 3_000_000)  # above this proxy's 64 KiB stream threshold
    response = await proxy.get(f"/sha1/{digest}")
    assert response.headers["X-Cache"] == "MISS" and response.headers["Content-Length"] == str(len(data))
    assert hashlib.sha1(await response.read()).hexdigest() == digest
    await proxy.app[STORE].wait_idle()
    response = await proxy.get(f"/sha1/{digest}")
    assert response.headers["X-Cache"] == "HIT" and await response.read() == data


@pytest.mark.parametrize("warm", [False, True])
async def test_head_has_get_headers_and_no_body(proxy: Client, tmp_path: Path, warm: bool) -> None:
    data, digest = put_file(tmp_path, 123_456)
    if warm:
        await (await proxy.get(f"/sha1/{digest}")).read()
        await proxy.app[STORE].wait_idle()
    response = await proxy.head(f"/sha1/{digest}")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["ETag"] == f'"{digest}"'
    assert response.headers["X-Cache"] == ("HIT" if warm else "MISS")
    assert await response.read() == b""
    assert (await proxy.head(f"/sha1/{make_blob(5)[1]}")).status == 404


@pytest.mark.parametrize(
    ("header", "status", "span"),
    [
        ("bytes=0-9", 206, (0, 10)),
        ("bytes=100-", 206, (100, 1000)),
        ("bytes=-50", 206, (950, 1000)),
        ("bytes=990-5000", 206, (990, 1000)),
        ("bytes=0-1,5-6", 200, (0, 1000)),  # several ranges: the whole blob is a valid answer
        ("items=0-5", 200, (0, 1000)),
    ],
)
@pytest.mark.parametrize("warm", [False, True])
async def test_single_ranges(
    proxy: Client, tmp_path: Path, header: str, status: int, span: tuple[int, int], warm: bool
) -> None:
    data, digest = put_file(tmp_path, 1000)
    if warm:
        await (await proxy.get(f"/sha1/{digest}")).read()
        await proxy.app[STORE].wait_idle()
    response = await proxy.get(f"/sha1/{digest}", headers={"Range": header})
    assert response.status == status
    assert await response.read() == data[span[0] : span[1]]
    if status == 206:
        assert response.headers["Content-Range"] == f"bytes {span[0]}-{span[1] - 1}/1000"


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0", "bytes=20-10"])
async def test_unsatisfiable_range_is_416(proxy: Client, tmp_path: Path, header: str) -> None:
    _, digest = put_file(tmp_path, 1000)
    response = await proxy.get(f"/sha1/{digest}", headers={"Range": header})
    await problem(response, 416, "range-not-satisfiable")
    assert response.headers["Content-Range"] == "bytes */1000"


async def test_range_of_a_large_blob_on_a_miss_and_a_hit(proxy: Client, tmp_path: Path) -> None:
    data, digest = put_file(tmp_path, 2_000_000)
    for _ in range(2):
        response = await proxy.get(f"/sha1/{digest}", headers={"Range": "bytes=1500000-1500099"})
        assert response.status == 206 and await response.read() == data[1_500_000:1_500_100]
        await proxy.app[STORE].wait_idle()


@pytest.mark.parametrize("etag", ['"{d}"', 'W/"{d}"', '"other", "{d}"', "*"])
async def test_if_none_match_is_304(proxy: Client, tmp_path: Path, etag: str) -> None:
    _, digest = put_file(tmp_path, 100)
    response = await proxy.get(f"/sha1/{digest}", headers={"If-None-Match": etag.format(d=digest)})
    assert response.status == 304 and await response.read() == b""
    assert response.headers["ETag"] == f'"{digest}"'


async def test_if_none_match_other_etag_is_200(proxy: Client, tmp_path: Path) -> None:
    data, digest = put_file(tmp_path, 100)
    response = await proxy.get(f"/sha1/{digest}", headers={"If-None-Match": '"abc"'})
    assert response.status == 200 and await response.read() == data


@pytest.mark.parametrize(
    "path",
    [
        "/sha1/zz",
        "/sha1/" + "g" * 40,
        "/sha1/" + "a" * 41,
        "/sha1/..%2F..%2Fetc%2Fpasswd",
        "/sha1/%2e%2e/%2e%2e/etc/passwd",
        "/sha1/a/b",
        "/sha256/" + "a" * 40,
        "/sha1/%00" + "a" * 39,
    ],
)
async def test_bad_names_and_traversal_are_400(proxy: Client, path: str) -> None:
    response = await proxy.get(URL(path, encoded=True))
    await problem(response, 400, "bad-digest")


async def test_raw_dot_dot_path_never_reaches_a_file(proxy: Client, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("TOP-SECRET-CONTENT")
    reader, writer = await asyncio.open_connection(proxy.server.host, proxy.server.port)
    writer.write(b"GET /sha1/../../secret HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.split(b" ")[1] in (b"400", b"404") and b"TOP-SECRET-CONTENT" not in answer


async def test_not_found_anywhere_is_404(proxy: Client) -> None:
    await problem(await proxy.get(f"/sha1/{make_blob(10)[1]}"), 404, "not-found")
    await problem(await proxy.get("/nothing-here"), 404, "not-found")


async def test_source_failure_is_502_with_retry_after(proxy: Client, tmp_path: Path) -> None:
    _, digest = put_file(tmp_path, 10)
    shutil.rmtree(tmp_path / "blobs")
    (tmp_path / "blobs").write_text("not a folder")  # every open now fails with NotADirectoryError
    response = await proxy.get(f"/sha1/{digest}")
    body = await problem(response, 502, "upstream-failed")
    assert "local" in body["detail"] and int(response.headers["Retry-After"]) > 0


async def test_post_missing(proxy: Client, tmp_path: Path) -> None:
    _, here = put_file(tmp_path, 10)
    gone = make_blob(10)[1]
    response = await proxy.post("/sha1/missing", json={"hashes": [here, gone.upper()]})
    assert response.status == 200 and await response.json() == {"missing": [gone]}
    await problem(await proxy.post("/sha1/missing", json={"hashes": ["nope"]}), 400, "bad-digest")
    await problem(await proxy.post("/sha1/missing", data=b"{not json"), 400, "bad-request")
    await problem(await proxy.post("/sha1/missing", json={"hash": []}), 400, "bad-request")
    await problem(await proxy.post("/sha1/missing", json={"hashes": [gone] * 10_001}), 400, "bad-request")


async def test_operations_routes(proxy: Client, tmp_path: Path) -> None:
    assert (await proxy.get("/healthz")).status == 200
    ready = await proxy.get("/readyz")
    assert ready.status == 200 and (await ready.json())["tiers"]["disk"]["writable"] is True
    data, digest = put_file(tmp_path, 10)
    await (await proxy.get(f"/sha1/{digest}")).read()
    await proxy.app[STORE].wait_idle()
    stats = await (await proxy.get("/stats")).json()
    assert stats["tiers"]["local"]["hits"] == 1 and stats["tiers"]["local"]["bytes"] == len(data)
    assert stats["tiers"]["disk"]["entries"] == 1 and stats["tiers"]["disk"]["size_limit"] > 0
    spec = await (await proxy.get("/openapi.json")).json()
    assert {"/sha1/{hash}", "/sha256/{hash}", "/sha1/missing", "/healthz", "/readyz", "/stats"} <= set(spec["paths"])


async def test_readyz_is_503_when_the_cache_cannot_be_written(proxy: Client, tmp_path: Path) -> None:
    spool = tmp_path / "cache" / "spool"
    shutil.rmtree(spool)
    spool.write_text("a file where the spool folder should be")
    response = await proxy.get("/readyz")
    assert response.status == 503 and (await response.json())["tiers"]["disk"]["writable"] is False
