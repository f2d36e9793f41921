"""State shared between proxy instances through a real Redis: the negative cache.

Two instances (each with its own disk cache, both in front of one shared folder and one counting
origin) behave as one: a miss seen by either is remembered for both, an upload to either clears
it for both, and a Redis that dies or hangs costs little and is used again once it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.errors import ConfigError
from proxy.store.negative import NegativeCache
from tests.conftest import ProxyFactory, Upstream, make_blob
from tests.redis_server import RedisServer

Client = TestClient[web.Request, web.Application]
UpstreamFactory = Callable[..., Awaitable[Upstream]]

# A request that pays for a sick Redis pays at most its 0.25 s backend timeout; tiers here wait
# 60 s. Two seconds tells "skipped the sick backend" from "waited on something" with room to spare.
FAST = 2.0


async def two_instances(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, redis: RedisServer, tmp_path: Path
) -> tuple[Client, Client, Upstream]:
    origin = await upstream()
    clients = []
    for name in ("a", "b"):
        tiers: list[dict[str, Any]] = [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / f"cache-{name}")},
            {"name": "local", "kind": "fs", "path": str(tmp_path / "shared")},  # where uploads land
            {"name": "origin", "kind": "http", "url": origin.url},
        ]
        clients.append(await make_proxy(tiers, negative_cache={"url": redis.url, "ttl": 30}))
    return clients[0], clients[1], origin


async def negative_hits(client: Client) -> int:
    stats = await (await client.get("/stats")).json()
    assert stats["negative_cache"]["url"].startswith("redis://")
    return int(stats["negative_cache"]["hits"])


async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
    began = time.monotonic()
    answer = await call
    return answer, time.monotonic() - began


async def status_of(client: Client, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    async with client.request(method, path, **kwargs) as response:
        return response.status, await response.read()


# -- sharing -------------------------------------------------------------------------------


async def test_a_miss_on_one_instance_is_a_negative_hit_on_the_other(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    a, b, origin = await two_instances(make_proxy, upstream, redis_server, tmp_path)
    missing, never_seen = make_blob(100)[1], make_blob(100)[1]

    assert (await a.get(f"/sha1/{missing}")).status == 404
    assert origin.requests == [missing]
    keys = redis_server.keys()
    assert list(keys) == [f"casproxy:absent:{missing}"]
    assert 25 < keys[f"casproxy:absent:{missing}"] <= 30  # negative_cache.ttl, in Redis

    assert (await b.get(f"/sha1/{missing}")).status == 404
    assert (await b.head(f"/sha1/{missing}")).status == 404
    assert origin.requests == [missing]  # b asked nobody: a's answer was shared
    assert await negative_hits(b) == 2
    assert await negative_hits(a) == 0

    # The control: what nobody has asked about yet, b does look up.
    assert (await b.get(f"/sha1/{never_seen}")).status == 404
    assert origin.requests == [missing, never_seen]


async def test_an_upload_to_one_instance_clears_the_entry_for_both(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    a, b, origin = await two_instances(make_proxy, upstream, redis_server, tmp_path)
    data, digest = make_blob(5000)
    assert (await a.get(f"/sha1/{digest}")).status == 404
    assert (await b.get(f"/sha1/{digest}")).status == 404  # remembered
    assert len(origin.requests) == 1

    assert (await b.put(f"/sha1/{digest}", data=data)).status == 201
    assert redis_server.keys() == {}
    for client in (a, b):
        assert await status_of(client, "GET", f"/sha1/{digest}") == (200, data)
    assert len(origin.requests) == 1  # found in the shared folder the upload went to


# -- a sick Redis --------------------------------------------------------------------------


async def test_killing_redis_costs_little_and_sharing_resumes_when_it_is_back(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    a, b, origin = await two_instances(make_proxy, upstream, redis_server, tmp_path)
    present, present_digest = make_blob(20_000)
    origin.blobs[present_digest] = present
    missing = make_blob(100)[1]
    assert (await a.get(f"/sha1/{missing}")).status == 404
    assert (await b.get(f"/sha1/{missing}")).status == 404
    assert await negative_hits(b) == 1

    redis_server.kill()
    began = time.monotonic()
    for round_ in range(3):
        for client in (a, b):
            upload, upload_digest = make_blob(3000)
            cases = [
                ("GET", present_digest, 200, present),
                ("GET", missing, 404, None),
                ("HEAD", missing, 404, b""),
                ("GET", make_blob(100)[1], 404, None),
                ("PUT", upload_digest, 201, None),
                ("GET", upload_digest, 200, upload),
            ]
            for method, digest, want, body in cases:
                kwargs = {"data": upload} if method == "PUT" else {}
                (status, received), took = await timed(status_of(client, method, f"/sha1/{digest}", **kwargs))
                assert status == want, (round_, method, digest, received[:200])
                if body is not None:
                    assert received == body
                assert took < FAST, f"{method} took {took:.2f}s with Redis down"
    assert time.monotonic() - began < 3 * FAST  # 36 requests: the dead backend is skipped, not retried each time
    readyz = await (await a.get("/readyz")).json()
    assert readyz["ready"] is True  # the negative cache is an optimisation: not a reason to leave rotation
    assert readyz["negative_cache"]["available"] is False

    await asyncio.to_thread(redis_server.start)  # empty, on the same port
    deadline = time.monotonic() + 15
    while True:  # each instance tries the backend again a couple of seconds after its last failure
        digest = make_blob(100)[1]
        assert (await a.get(f"/sha1/{digest}")).status == 404
        before = await negative_hits(b)
        assert (await b.get(f"/sha1/{digest}")).status == 404
        if await negative_hits(b) == before + 1:
            break
        assert time.monotonic() < deadline, "the instances never shared through the restarted Redis"
        await asyncio.sleep(0.2)
    assert origin.requests.count(digest) == 1
    assert f"casproxy:absent:{digest}" in redis_server.keys("casproxy:*")


async def test_an_upload_while_redis_hangs_is_cleared_for_everyone_once_it_answers(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    a, b, origin = await two_instances(make_proxy, upstream, redis_server, tmp_path)
    data, digest = make_blob(5000)
    assert (await a.get(f"/sha1/{digest}")).status == 404
    key = f"casproxy:absent:{digest}"
    assert key in redis_server.keys("casproxy:*")

    redis_server.pause()  # connections open, nothing answers: every call hits the timeout
    try:
        response, took = await timed(b.put(f"/sha1/{digest}", data=data))
        assert response.status == 201
        assert took < FAST
        (status, body), took = await timed(status_of(a, "GET", f"/sha1/{digest}"))
        assert (status, body) == (200, data)
        assert took < FAST
    finally:
        redis_server.resume()

    # b could not clear the entry while Redis hung; it keeps trying until it can, because a
    # would answer 404 from the entry (for its whole TTL) once it trusts Redis again.
    deadline = time.monotonic() + 15
    while key in redis_server.keys("casproxy:*"):
        assert time.monotonic() < deadline, "the clear was never sent again"
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.5)  # past the back-off: both instances read Redis again
    for client in (a, b):
        assert await status_of(client, "GET", f"/sha1/{digest}") == (200, data)
    assert origin.requests == [digest]


# -- the NegativeCache itself against Redis -----------------------------------------------


async def test_negative_cache_stores_plain_strings_with_their_ttl_in_redis(redis_server: RedisServer) -> None:
    cache = NegativeCache(redis_server.url, ttl=1)  # an int TTL, as the library API allows
    digest = make_blob(10)[1]
    try:
        assert await cache.contains(digest) is False
        await cache.add(digest)
        assert await cache.contains(digest) is True
        keys = redis_server.keys()
        assert 0 < keys[f"casproxy:absent:{digest}"] <= 1
        await asyncio.sleep(1.1)
        assert await cache.contains(digest) is False  # expired in Redis
        await cache.add(digest)
        await cache.discard(digest)
        assert await cache.contains(digest) is False
        assert (cache.hits, cache.failures) == (1, 0)
    finally:
        await cache.close()


async def test_negative_cache_without_redis_fails_fast_and_backs_off(redis_server: RedisServer) -> None:
    url = redis_server.url
    redis_server.kill()  # nothing listens on the port now
    cache = NegativeCache(url, ttl=30)
    digest = make_blob(10)[1]
    try:
        began = time.monotonic()
        for _ in range(100):
            assert await cache.contains(digest) is False
            await cache.add(digest)
        assert time.monotonic() - began < FAST
        assert cache.failures == 1  # one failed call; the rest left the backend alone
        assert cache.available is False
    finally:
        await cache.close()


def test_negative_cache_url_is_shown_without_its_password_and_checked() -> None:
    cache = NegativeCache("redis://:s3cret@127.0.0.1:6390/0", ttl=30)
    assert cache.url == "redis://:***@127.0.0.1:6390/0"
    assert cache.shared
    with pytest.raises(ConfigError, match=r"negative_cache\.url"):
        NegativeCache("nosuch://host/", ttl=30)
