"""Chained proxies: a sidecar casproxy (disk cache + an http tier) in front of a regional
casproxy (a folder of blobs), both real servers. The sidecar verifies everything the regional
sends and believes nothing it says about itself."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import load_config, redacted
from proxy.server.app import create_app
from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, Upstream, free_port, make_blob, write_config

Client = TestClient[web.Request, web.Application]
UpstreamFactory = Callable[..., Awaitable[Upstream]]
TOKEN = "regional-upload-token-5f2c"


class Regional:
    """A casproxy serving a folder; counts what its folder was asked for."""

    def __init__(self, client: Client, folder: Path) -> None:
        self.client = client
        self.folder = folder

    @property
    def url(self) -> str:
        assert self.client.server.port is not None
        return f"http://127.0.0.1:{self.client.server.port}/{{algorithm}}/{{hash}}"

    def put(self, data: bytes, algorithm: str = "sha1") -> str:
        digest = hashlib.new(algorithm, data).hexdigest()
        (self.folder / digest).write_bytes(data)
        return digest

    def lookups(self) -> tuple[int, int]:
        """(hits, misses) of the regional's folder: one per GET that reached it."""
        tier = self.client.app[STORE].snapshot()["tiers"]["blobs"]
        return tier["hits"], tier["misses"]


async def regional(make_proxy: ProxyFactory, tmp_path: Path, **sections: dict[str, Any]) -> Regional:
    folder = tmp_path / "regional-blobs"
    client = await make_proxy([{"name": "blobs", "kind": "fs", "path": str(folder)}], **sections)
    return Regional(client, folder)


def disk(tmp_path: Path) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "sidecar-cache")}


def chained(name: str, url: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "kind": "http", "url": url, **options}


async def sidecar(make_proxy: ProxyFactory, tiers: list[dict[str, Any]]) -> Client:
    return await make_proxy(tiers, uploads={"targets": ["disk"]})


async def problem_of(response: Any) -> dict[str, Any]:
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    return body


# -- reading through the chain -------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
async def test_sidecar_serves_from_the_regional_then_from_its_own_cache(
    make_proxy: ProxyFactory, tmp_path: Path, algorithm: str
) -> None:
    up = await regional(make_proxy, tmp_path)
    data = make_blob(70_000)[0]
    digest = up.put(data, algorithm)
    client = await sidecar(make_proxy, [disk(tmp_path), chained("regional", up.url)])

    response = await client.get(f"/{algorithm}/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("MISS", "regional")
    assert up.lookups() == (1, 0)

    await client.app[STORE].wait_idle()
    for method in ("GET", "HEAD"):
        response = await client.request(method, f"/{algorithm}/{digest}")
        assert response.status == 200
        assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "disk")
        assert int(response.headers["Content-Length"]) == len(data)
        if method == "GET":
            assert await response.read() == data
    assert up.lookups() == (1, 0)  # the second read never reached the regional


async def test_head_through_the_chain_asks_the_regional_and_caches_nothing(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    up = await regional(make_proxy, tmp_path)
    data = make_blob(12_345)[0]
    digest = up.put(data)
    client = await sidecar(make_proxy, [disk(tmp_path), chained("regional", up.url)])

    response = await client.head(f"/sha1/{digest}")
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == len(data)
    assert response.headers["X-Cache-Tier"] == "regional"
    assert await response.read() == b""
    missing = make_blob(10)[1]
    assert (await client.head(f"/sha1/{missing}")).status == 404
    assert client.app[STORE].snapshot()["tiers"]["disk"]["entries"] == 0


async def test_not_found_at_the_regional_is_404_at_the_sidecar_and_remembered(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    up = await regional(make_proxy, tmp_path)
    client = await sidecar(make_proxy, [disk(tmp_path), chained("regional", up.url)])
    missing = make_blob(10)[1]

    for _ in range(2):
        response = await client.get(f"/sha1/{missing}")
        assert response.status == 404  # "not here", not a failing tier (502)
        assert (await problem_of(response))["type"] == "not-found"
    assert up.lookups() == (0, 1)  # the sidecar's negative cache answered the second time


# -- a lying regional ----------------------------------------------------------------------


def lying_casproxy(data: bytes) -> Callable[[web.Request, Upstream], Awaitable[web.StreamResponse]]:
    """Looks like a casproxy with the blob in its disk cache; sends bytes one bit off."""
    bad = bytes([data[0] ^ 0x01]) + data[1:]

    async def handler(request: web.Request, up: Upstream) -> web.StreamResponse:
        digest = request.match_info["hash"]
        headers = {"X-Cache": "HIT", "X-Cache-Tier": "disk", "ETag": f'"{digest}"', "Cache-Control": "immutable"}
        return web.Response(body=b"" if request.method == "HEAD" else bad, headers=headers)

    return handler


async def test_corrupt_bytes_from_a_regional_that_claims_a_hit_are_never_served_or_cached(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(50_000)
    liar = await upstream(lying_casproxy(data))
    client = await sidecar(make_proxy, [disk(tmp_path), chained("liar", liar.url)])

    for attempt in (1, 2):
        response = await client.get(f"/sha1/{digest}")
        assert response.status == 502
        problem = await problem_of(response)
        assert problem["type"] == "upstream-failed"
        assert "liar" in problem["detail"]
        assert len(liar.requests) == attempt  # nothing was cached, so it is asked again
    store = client.app[STORE]
    await store.wait_idle()
    assert store.snapshot()["tiers"]["disk"]["entries"] == 0
    assert store.snapshot()["tiers"]["liar"]["corrupt"] == 2


async def test_a_lying_regional_is_skipped_for_an_honest_one(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    honest = await regional(make_proxy, tmp_path)
    data = make_blob(50_000)[0]
    digest = honest.put(data)
    liar = await upstream(lying_casproxy(data))
    client = await sidecar(make_proxy, [disk(tmp_path), chained("liar", liar.url), chained("honest", honest.url)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    # The sidecar's own verdict: fetched (MISS) from the tier that sent good bytes; the liar's
    # "X-Cache: HIT" decided nothing.
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("MISS", "honest")
    await client.app[STORE].wait_idle()
    response = await client.get(f"/sha1/{digest}")
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "disk"
    assert (len(liar.requests), honest.lookups()) == (1, (1, 0))


# -- a regional that wants a token ---------------------------------------------------------


@contextlib.asynccontextmanager
async def running(config_path: Path, environ: dict[str, str]) -> AsyncIterator[Client]:
    """Like make_proxy, but with an environment for env: references."""
    config = load_config(str(config_path), environ=environ)
    client = TestClient(TestServer(create_app(config), host="127.0.0.1", port=config.server.port))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def test_a_regional_requiring_tickets_is_read_with_a_token_that_never_shows(
    make_proxy: ProxyFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = await regional(make_proxy, tmp_path, auth={"require_ticket": True, "upload_tokens": [TOKEN]})
    data = make_blob(30_000)[0]
    digest = up.put(data)
    refused = (await up.client.get(f"/sha1/{digest}")).status
    assert refused in (401, 403)  # the regional really requires a ticket or a token

    anonymous = await sidecar(make_proxy, [disk(tmp_path / "a"), chained("regional", up.url)])
    response = await anonymous.get(f"/sha1/{digest}")
    assert response.status == 502  # the regional refused: a failing tier, not "not found"
    assert f"answered {refused}" in (await problem_of(response))["detail"]

    wrong = await sidecar(make_proxy, [disk(tmp_path / "w"), chained("regional", up.url, token="not-" + TOKEN)])
    assert (await wrong.get(f"/sha1/{digest}")).status == 502

    path = write_config(
        tmp_path / "sidecar.toml",
        [disk(tmp_path / "t"), chained("regional", up.url, token="env:REGIONAL_TOKEN")],
        server={"port": free_port()},
        uploads={"targets": ["disk"]},
    )
    environ = {"REGIONAL_TOKEN": TOKEN}
    with caplog.at_level(logging.DEBUG):
        async with running(path, environ) as client:
            for method in ("HEAD", "GET"):
                response = await client.request(method, f"/sha1/{digest}")
                assert response.status == 200, method
                assert response.headers["X-Cache-Tier"] == "regional"
            assert await response.read() == data
            stats = await (await client.get("/stats")).text()
            readyz = await (await client.get("/readyz")).text()
    assert up.lookups() == (1, 0)
    shown = json.dumps(redacted(load_config(str(path), environ=environ)))
    for text in (caplog.text, stats, readyz, shown):
        assert TOKEN not in text
    assert '"token": "***"' in shown


async def test_extra_headers_are_sent_to_the_upstream(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(1000)

    async def wants_key(request: web.Request, up: Upstream) -> web.StreamResponse:
        if request.headers.get("X-Api-Key") != "k-123":
            raise web.HTTPForbidden()
        return web.Response(body=data)

    cdn = await upstream(wants_key)
    client = await sidecar(make_proxy, [disk(tmp_path), chained("cdn", cdn.url, headers={"X-Api-Key": "k-123"})])
    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data


async def test_an_upstream_error_never_carries_the_token_into_logs_or_problems(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def loop(request: web.Request, up: Upstream) -> web.StreamResponse:
        raise web.HTTPFound(request.path)  # aiohttp gives up with TooManyRedirects, a response error

    looping = await upstream(loop)
    client = await sidecar(make_proxy, [disk(tmp_path), chained("looping", looping.url, token=TOKEN)])
    with caplog.at_level(logging.DEBUG):
        response = await client.get(f"/sha1/{make_blob(10)[1]}")
        assert response.status == 502
        detail = (await problem_of(response))["detail"]
    assert "TooManyRedirects" in detail
    assert len(looping.requests) > 1
    assert TOKEN not in detail
    assert TOKEN not in caplog.text
