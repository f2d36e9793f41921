"""HTTP tiers in front of small aiohttp upstreams that lie, fail, hang, reset, or are slow:
the proxy must never hand out wrong bytes as complete, must name what failed, and must fetch
each blob once however many clients ask."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, Upstream, make_blob

Client = TestClient[web.Request, web.Application]
UpstreamFactory = Callable[..., Awaitable[Upstream]]
Handler = Callable[[web.Request, Upstream], Awaitable[web.StreamResponse]]

STREAMING = {"stream_threshold": 65536}  # small, so a test blob of a few hundred KiB streams


def disk(tmp_path: Path) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")}


def http(name: str, up: Upstream, **options: Any) -> dict[str, Any]:
    return {"name": name, "kind": "http", "url": template(up), **options}


def template(up: Upstream) -> str:
    # conftest builds up.url with yarl, which percent-encodes the braces of {hash}.
    return up.url


async def start(make_proxy: ProxyFactory, tiers: list[dict[str, Any]], **sections: dict[str, Any]) -> Client:
    # These configs have no "local" tier for the default upload target: use the first tier.
    return await make_proxy(tiers, uploads={"targets": [tiers[0]["name"]]}, **sections)


def corrupting(data: bytes) -> Handler:
    """Serve ``data`` with its last byte flipped whatever is asked: same length, wrong hash."""
    bad = data[:-1] + bytes([data[-1] ^ 0xFF])

    async def handler(request: web.Request, up: Upstream) -> web.StreamResponse:
        return web.Response(body=bad)

    return handler


async def failing(request: web.Request, up: Upstream) -> web.StreamResponse:
    return web.Response(status=500, text="boom")


def resetting(data: bytes) -> Handler:
    """Promise the whole blob, send half, then drop the connection."""

    async def handler(request: web.Request, up: Upstream) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        assert request.transport is not None
        request.transport.abort()
        return response

    return handler


async def drain(response: aiohttp.ClientResponse, into: bytearray) -> None:
    async for chunk in response.content.iter_any():
        into += chunk


async def problem_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    return body


# -- corrupt bytes -------------------------------------------------------------------------


async def test_corrupt_upstream_is_skipped_for_the_next(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(150_000)
    liar = await upstream(corrupting(data))
    good = await upstream()
    good.blobs[digest] = data
    client = await start(make_proxy, [disk(tmp_path), http("liar", liar), http("good", good)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "good"
    await client.app[STORE].wait_idle()
    stats = client.app[STORE].snapshot()["tiers"]
    assert (stats["liar"]["corrupt"], stats["good"]["corrupt"]) == (1, 0)
    assert (liar.requests, good.requests) == ([digest], [digest])


async def test_corrupt_only_tier_is_502_never_wrong_bytes(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(150_000)
    liar = await upstream(corrupting(data))
    client = await start(make_proxy, [disk(tmp_path), http("liar", liar)])

    for attempt in (1, 2):  # the bad copy was not cached either
        response = await client.get(f"/sha1/{digest}")
        assert response.status == 502
        problem = await problem_of(response)
        assert problem["type"] == "upstream-failed"
        assert "liar" in problem["detail"]
        assert len(liar.requests) == attempt
    assert client.app[STORE].snapshot()["tiers"]["disk"]["entries"] == 0


# -- 5xx, hangs, resets --------------------------------------------------------------------


async def test_500_is_502_naming_the_tier(make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path) -> None:
    up = await upstream(failing)
    digest = make_blob(100)[1]
    client = await start(make_proxy, [disk(tmp_path), http("flaky-origin", up)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 502
    assert int(response.headers["Retry-After"]) > 0
    problem = await problem_of(response)
    assert (problem["type"], problem["status"]) == ("upstream-failed", 502)
    assert "flaky-origin" in problem["detail"]
    assert "500" in problem["detail"]
    assert up.requests == [digest]


async def test_hanging_upstream_times_out_and_next_tier_serves(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(40_000)
    release = asyncio.Event()

    async def hang(request: web.Request, up: Upstream) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=data)

    slow = await upstream(hang)
    good = await upstream()
    good.blobs[digest] = data
    try:
        only = await start(make_proxy, [disk(tmp_path / "a"), http("slow", slow, timeout=0.5)])
        began = time.monotonic()
        response = await only.get(f"/sha1/{digest}")
        assert response.status == 502
        assert time.monotonic() - began < 3.0  # the tier's timeout, not the upstream's whim
        problem = await problem_of(response)
        assert "slow" in problem["detail"]
        assert response.headers["Retry-After"]

        both = await start(make_proxy, [disk(tmp_path / "b"), http("slow", slow, timeout=0.5), http("good", good)])
        began = time.monotonic()
        response = await both.get(f"/sha1/{digest}")
        assert response.status == 200
        assert await response.read() == data
        assert response.headers["X-Cache-Tier"] == "good"
        assert time.monotonic() - began < 3.0
        assert len(slow.requests) == 2
    finally:
        release.set()


async def test_hang_mid_body_is_an_idle_timeout(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(40_000)
    release = asyncio.Event()

    async def stall(request: web.Request, up: Upstream) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[:1000])
        await release.wait()
        return response

    slow = await upstream(stall)
    good = await upstream()
    good.blobs[digest] = data
    try:
        client = await start(make_proxy, [disk(tmp_path), http("slow", slow, timeout=0.5), http("good", good)])
        began = time.monotonic()
        response = await client.get(f"/sha1/{digest}")
        assert response.status == 200
        assert await response.read() == data
        assert response.headers["X-Cache-Tier"] == "good"
        assert time.monotonic() - began < 3.0
    finally:
        release.set()


async def test_reset_mid_body_falls_through_to_next_tier(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(60_000)
    broken = await upstream(resetting(data))
    good = await upstream()
    good.blobs[digest] = data
    client = await start(make_proxy, [disk(tmp_path), http("broken", broken), http("good", good)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "good"
    assert broken.requests == [digest]
    await client.app[STORE].wait_idle()
    assert client.app[STORE].snapshot()["tiers"]["broken"]["errors"] == 1


async def test_reset_mid_body_with_no_other_tier_is_502(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(60_000)
    broken = await upstream(resetting(data))
    client = await start(make_proxy, [disk(tmp_path), http("broken", broken)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 502
    problem = await problem_of(response)
    assert problem["type"] == "upstream-failed"
    assert "broken" in problem["detail"]


# -- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
async def test_streamed_blob_corrupt_at_the_end_is_cut_off_and_not_cached(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path, sized: bool
) -> None:
    data, digest = make_blob(3 << 20)
    bad = data[:-1] + bytes([data[-1] ^ 0xFF])  # only the last byte is wrong
    mode = {"serve": "corrupt"}

    async def handler(request: web.Request, up: Upstream) -> web.StreamResponse:
        if mode["serve"] == "nothing":
            raise web.HTTPNotFound()
        response = web.StreamResponse()
        if sized:
            response.content_length = len(bad)
        else:
            response.enable_chunked_encoding()  # the proxy cannot know the size up front
        await response.prepare(request)
        for offset in range(0, len(bad), 256 << 10):
            await response.write(bad[offset : offset + (256 << 10)])
            await asyncio.sleep(0.005)  # arrive in pieces, so the proxy streams before it knows
        await response.write_eof()
        return response

    up = await upstream(handler)
    client = await start(make_proxy, [disk(tmp_path), http("origin", up)], server=STREAMING)

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200  # streaming started before the digest could be checked
    if sized:
        assert response.headers["Content-Length"] == str(len(data))
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):  # cut off: short, or chunked never terminated
        await drain(response, received)
    if sized:
        assert len(received) < len(data)

    await client.app[STORE].wait_idle()
    assert client.app[STORE].snapshot()["tiers"]["origin"]["corrupt"] == 1
    mode["serve"] = "nothing"
    response = await client.get(f"/sha1/{digest}")
    assert response.status == 404  # not a disk HIT: the corrupt copy was never cached
    assert response.headers.get("X-Cache") != "HIT"


async def test_streamed_blob_good_is_complete_and_cached(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    # The control for the test above: the same path with good bytes completes and caches.
    data, digest = make_blob(3 << 20)
    up = await upstream()
    up.blobs[digest] = data
    client = await start(make_proxy, [disk(tmp_path), http("origin", up)], server=STREAMING)

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache"] == "MISS"
    await client.app[STORE].wait_idle()
    response = await client.get(f"/sha1/{digest}")
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "disk")
    assert len(up.requests) == 1


async def test_client_leaving_a_streamed_response_does_not_stop_the_fill(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(3 << 20)

    async def trickle(request: web.Request, up: Upstream) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(data)
        await response.prepare(request)
        for offset in range(0, len(data), 256 << 10):
            await response.write(data[offset : offset + (256 << 10)])
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    up = await upstream(trickle)
    client = await start(make_proxy, [disk(tmp_path), http("origin", up)], server=STREAMING)

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    await response.content.readexactly(100_000)  # part of it, then hang up
    response.close()

    await client.app[STORE].wait_idle()
    response = await client.get(f"/sha1/{digest}")
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "disk")
    assert len(up.requests) == 1


# -- coalescing, disconnects, negative cache ----------------------------------------------


@pytest.mark.parametrize(
    ("size", "server"),
    [(500_000, {}), (2 << 20, STREAMING)],
    ids=["verified-first", "streamed"],
)
async def test_concurrent_requests_coalesce_into_one_fetch(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path, size: int, server: dict[str, Any]
) -> None:
    data, digest = make_blob(size)

    async def slow(request: web.Request, up: Upstream) -> web.StreamResponse:
        await asyncio.sleep(0.3)  # long enough for all 50 to arrive while it is in flight
        return web.Response(body=data)

    up = await upstream(slow)
    client = await start(make_proxy, [disk(tmp_path), http("origin", up)], server=server)

    async def fetch() -> tuple[int, bytes]:
        async with client.get(f"/sha1/{digest}") as response:
            return response.status, await response.read()

    results = await asyncio.gather(*(fetch() for _ in range(50)))
    assert len(up.requests) == 1
    assert client.app[STORE].snapshot()["coalesced"] == 49
    assert all(status == 200 for status, _ in results)
    assert sum(body == data for _, body in results) == 50


async def test_client_disconnect_does_not_cancel_the_fill(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(200_000)
    asked = asyncio.Event()

    async def slow(request: web.Request, up: Upstream) -> web.StreamResponse:
        asked.set()
        await asyncio.sleep(0.3)
        return web.Response(body=data)

    up = await upstream(slow)
    # TestServer cancels handlers whose client went away, so a fill tied to one would die.
    client = await start(make_proxy, [disk(tmp_path), http("origin", up)])

    task = asyncio.create_task(client.get(f"/sha1/{digest}"))
    await asyncio.wait_for(asked.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    deadline = time.monotonic() + 5
    while True:
        response = await client.get(f"/sha1/{digest}")
        assert response.status == 200
        assert await response.read() == data
        if response.headers["X-Cache"] == "HIT":
            break
        assert time.monotonic() < deadline, "the fill never reached the disk cache"
        await asyncio.sleep(0.05)
    assert response.headers["X-Cache-Tier"] == "disk"
    assert len(up.requests) == 1


async def test_found_nowhere_is_404_and_remembered(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    up = await upstream()  # serves up.blobs: empty, so 404
    digest = make_blob(100)[1]
    client = await start(make_proxy, [disk(tmp_path), http("origin", up)], negative_cache={"ttl": 1})

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 404
    assert (await problem_of(response))["type"] == "not-found"
    assert len(up.requests) == 1

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 404
    assert len(up.requests) == 1  # answered from the negative cache
    response = await client.head(f"/sha1/{digest}")
    assert response.status == 404
    assert len(up.requests) == 1

    await asyncio.sleep(1.2)  # after the TTL the tiers are asked again
    response = await client.get(f"/sha1/{digest}")
    assert response.status == 404
    assert len(up.requests) == 2
