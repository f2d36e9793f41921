"""Tiers that trickle, raise, lie or never end: the walk goes on to the next tier, the failure
is charged to the tier that failed, and what it held (a thread, a connection, spool bytes) is
released. Real parts: moto behind a small fault proxy, aiohttp upstreams, fs folders."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.digest import Digest
from proxy.server.keys import STORE
from proxy.store import pace
from proxy.store.negative import NegativeCache
from proxy.store.walk import CorruptCopies
from proxy.tiers.api import APIOrigin
from tests.conftest import Bucket, ProxyFactory, Upstream, free_port, make_blob, spool_files, write_config
from tests.faults import FaultProxy, fault_proxy_before, trickle
from tests.processes import ProxyProcess, wait_until

Client = TestClient[web.Request, web.Application]
UpstreamFactory = Callable[..., Awaitable[Upstream]]

# A trickle is judged over windows this long here (10 s in production), at this floor.
WINDOW = 0.5
FAST_FAIL = {"timeout": 3, "min_rate": "8 KiB"}


@pytest.fixture(autouse=True)
def short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pace, "RATE_WINDOW", WINDOW)


def disk(tmp_path: Path) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")}


def folder(name: str, path: Path) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    return {"name": name, "kind": "fs", "path": str(path)}


def http(name: str, up: Upstream, **options: Any) -> dict[str, Any]:
    return {"name": name, "kind": "http", "url": up.url, **options}


async def start(make_proxy: ProxyFactory, tiers: list[dict[str, Any]], **sections: dict[str, Any]) -> Client:
    return await make_proxy(tiers, uploads={"targets": [tiers[-1]["name"]]}, **sections)


def trickling(data: bytes) -> Callable[[web.Request, Upstream], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request, up: Upstream) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = len(data)
        await response.prepare(request)
        await trickle(response, data)
        return response

    return handler


def tier_stats(client: Client) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = client.app[STORE].snapshot()["tiers"]
    return stats


# -- 1. trickles -----------------------------------------------------------------------------


async def test_a_trickling_http_tier_is_left_for_the_next_within_its_window(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(300)
    slow = await upstream(trickling(data))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / digest).write_bytes(data)
    client = await start(make_proxy, [http("slow", slow, **FAST_FAIL), folder("local", tmp_path / "local")])

    async with asyncio.timeout(3 + WINDOW + 10):
        response = await client.get(f"/sha1/{digest}")
        assert response.status == 200
        assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "local"
    stats = tier_stats(client)
    assert (stats["slow"]["errors"], stats["local"]["hits"]) == (1, 1)


@pytest.fixture
async def fault_proxy(s3_endpoint: str) -> AsyncIterator[tuple[FaultProxy, str]]:
    async with fault_proxy_before(s3_endpoint) as proxy:
        yield proxy


async def test_trickling_objects_release_the_buckets_threads_and_a_healthy_object_still_answers(
    make_proxy: ProxyFactory,
    bucket: Bucket,
    fault_proxy: tuple[FaultProxy, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Windows long enough for a healthy read that waits behind the trickles' reads on a loaded box.
    monkeypatch.setattr(pace, "RATE_WINDOW", 2.0)
    faults, endpoint = fault_proxy
    slow = [make_blob(2000) for _ in range(10)]
    healthy, healthy_digest = make_blob(5000)
    (tmp_path / "local").mkdir()
    for data, digest in slow:
        bucket.put(digest, data)
        faults.trickled.add(digest)
        (tmp_path / "local" / digest).write_bytes(data)
    bucket.put(healthy_digest, healthy)
    s3 = {**bucket.tier("s3", max_connections=8), **FAST_FAIL, "endpoint_url": endpoint}
    client = await start(make_proxy, [s3, folder("local", tmp_path / "local")])

    async def get(digest: str) -> tuple[int, bytes, str]:
        async with client.get(f"/sha1/{digest}") as response:
            return response.status, await response.read(), response.headers.get("X-Cache-Tier", "")

    async with asyncio.timeout(3 + 2.0 + 10):
        stuck = [asyncio.ensure_future(get(digest)) for _, digest in slow]
        await asyncio.sleep(0)  # the trickles ask first
        assert await get(healthy_digest) == (200, healthy, "s3")
        answers = await asyncio.gather(*stuck)
    assert answers == [(200, data, "local") for data, _ in slow]
    assert tier_stats(client)["s3"]["errors"] == 10
    # Each trickle's connection was dropped, not read to its end.
    await wait_until(lambda: faults.abandoned == 10, 10, "the trickled connections to be dropped")


# -- 4. a tier that raises anything ------------------------------------------------------------


class Broken(APIOrigin):
    """An origin with a bug: every call raises something that is not a TierError."""

    async def fetch(self, digest: Digest) -> bytes | None:
        raise RuntimeError("a bug in the origin")

    async def exists(self, digest: Digest) -> bool:
        raise KeyError(digest)


async def test_a_tier_that_raises_anything_is_a_failing_tier_and_the_walk_goes_on(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(1000)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / digest).write_bytes(data)
    broken = {"name": "broken", "kind": "api", "class": "tests.test_faults:Broken"}
    client = await start(make_proxy, [broken, folder("local", tmp_path / "local")])

    head = await client.head(f"/sha1/{digest}")
    assert (head.status, head.headers["X-Cache-Tier"]) == (200, "local")
    missing = await client.post("/sha1/missing", json={"hashes": [digest]})
    assert (missing.status, await missing.json()) == (200, {"missing": []})
    response = await client.get(f"/sha1/{digest}")
    assert (response.status, await response.read()) == (200, data)
    assert tier_stats(client)["broken"]["errors"] == 3


# -- 5. a corrupt copy is remembered -------------------------------------------------------------


async def test_a_copy_found_corrupt_is_no_longer_counted_by_head_and_missing(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(1000)
    (tmp_path / "rotten").mkdir()
    (tmp_path / "rotten" / digest).write_bytes(data[:-1] + b"?")

    async def yes_to_anything(request: web.Request, up: Upstream) -> web.StreamResponse:
        return web.Response(body=b"not the blob")

    liar = await upstream(yes_to_anything)
    client = await start(
        make_proxy, [folder("rotten", tmp_path / "rotten"), http("liar", liar), folder("uploads", tmp_path / "up")]
    )
    assert (await client.head(f"/sha1/{digest}")).status == 200  # not known to be bad yet

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 502
    assert (await client.head(f"/sha1/{digest}")).status == 404
    missing = await client.post("/sha1/missing", json={"hashes": [digest]})
    assert await missing.json() == {"missing": [digest]}
    # The client uploads the good copy, which is then served.
    assert (await client.put(f"/sha1/{digest}", data=data)).status == 201
    response = await client.get(f"/sha1/{digest}")
    assert (response.status, await response.read()) == (200, data)
    stats = tier_stats(client)
    assert (stats["rotten"]["corrupt"], stats["liar"]["corrupt"]) == (2, 2)  # a GET asks again


# -- 8. server.max_blob_size -------------------------------------------------------------------


async def endless(request: web.Request, up: Upstream) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    block = bytes(64 << 10)
    while True:
        await response.write(block)


async def announced_too_large(request: web.Request, up: Upstream) -> web.StreamResponse:
    """Says 2 MiB up front, then sends nothing: refused on its word, not waited on."""
    response = web.StreamResponse()
    response.content_length = 2 << 20
    await response.prepare(request)
    await asyncio.Event().wait()
    return response


def gzip_bomb(request: web.Request, up: Upstream) -> Awaitable[web.StreamResponse]:
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB

    async def answer() -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})

    return answer()


@pytest.mark.parametrize(
    "handler", [endless, gzip_bomb, announced_too_large], ids=["endless", "gzip-bomb", "announced"]
)
async def test_a_fill_growing_past_max_blob_size_is_abandoned_and_charged_to_its_tier(
    make_proxy: ProxyFactory,
    upstream: UpstreamFactory,
    tmp_path: Path,
    handler: Callable[[web.Request, Upstream], Awaitable[web.StreamResponse]],
) -> None:
    assert len(gzip.compress(bytes(64 << 20), compresslevel=9)) < 128 << 10
    digest = Digest(zlib.crc32(b"x").to_bytes(4, "big").hex() * 5)
    up = await upstream(handler)
    tiers = [disk(tmp_path), http("up", up), folder("local", tmp_path / "local")]
    client = await start(make_proxy, tiers, server={"max_blob_size": "1 MiB"})
    response = await client.get(f"/sha1/{digest}")
    assert response.status == 502
    assert "max_blob_size" in (await response.json(content_type=None))["detail"]
    assert tier_stats(client)["up"]["errors"] == 1
    await client.app[STORE].wait_idle()
    assert spool_files(tmp_path / "cache") == []


async def test_a_server_with_a_stuck_fill_stops_on_sigterm_within_seconds(
    bucket: Bucket, fault_proxy: tuple[FaultProxy, str], tmp_path: Path
) -> None:
    faults, endpoint = fault_proxy
    data, digest = make_blob(100_000)
    bucket.put(digest, data)
    faults.trickled.add(digest)
    port = free_port()
    s3 = {**bucket.tier("s3"), "endpoint_url": endpoint, "min_rate": "1 B"}  # a trickle it waits on
    config = write_config(tmp_path / "config.toml", [disk(tmp_path), s3], server={"port": port})
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_healthy(session, 30)
            reading = asyncio.ensure_future(session.get(f"{proxy.url}/sha1/{digest}"))
            await wait_until(lambda: faults.trickling > 0, 30, "the fill to be trickled")
            assert proxy.process is not None
            proxy.process.terminate()
            began = asyncio.get_running_loop().time()
            await asyncio.to_thread(proxy.process.wait, 20)
            assert asyncio.get_running_loop().time() - began < 8, proxy.log.read_text()
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
    finally:
        proxy.stop()


# -- 7. orphans ----------------------------------------------------------------------------------

_WRITER = """
import asyncio, sys
from proxy.digest import Digest
from proxy.tier import FilePayload
from proxy.tiers.fs import FsTier

# The payload is a FIFO nobody writes to: the put blocks with its temp file open, until killed.
asyncio.run(FsTier(sys.argv[1]).put(Digest("0" * 40), FilePayload(sys.argv[2], 1 << 20)))
"""


async def test_temp_files_of_a_writer_killed_mid_put_are_gone_after_the_next_start(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    fifo = tmp_path / "body"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    writer = await asyncio.create_subprocess_exec(sys.executable, "-c", _WRITER, str(blobs), str(fifo), env=env)
    try:
        await wait_until(lambda: any(blobs.iterdir()), 30, "the writer's temp file")
    finally:
        writer.kill()
        await writer.wait()
    [orphan] = list(blobs.iterdir())
    assert orphan.name.startswith(f".casproxy-tmp-{writer.pid}-")
    alive = blobs / f".casproxy-tmp-{os.getpid()}-abc"  # a live writer's (this process): kept
    alive.write_bytes(b"in progress")

    port = free_port()
    config = write_config(tmp_path / "config.toml", [folder("local", blobs)], server={"port": port})
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_healthy(session, 30)
    finally:
        proxy.stop()
    assert list(blobs.iterdir()) == [alive]


# -- 12. memory bounds -----------------------------------------------------------------------------


async def test_the_negative_cache_and_the_corrupt_copies_keep_at_most_their_limit() -> None:
    negative = NegativeCache("memory://", ttl=60, max_entries=100)
    digests = [make_blob(8, seed=n)[1] for n in range(250)]
    for digest in digests:
        await negative.add(digest)
    assert [await negative.contains(d) for d in digests[-100:]] == [True] * 100
    assert not await negative.contains(digests[0])  # the oldest were forgotten
    corrupt = CorruptCopies(ttl=60, limit=100)
    for digest in digests:
        corrupt.add("tier", Digest(digest))
    assert len(corrupt) == 100
    assert corrupt.remembered("tier", Digest(digests[-1])) and not corrupt.remembered("tier", Digest(digests[0]))


# -- 3, 6. a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a cache disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_cache_disk_serves_a_large_blob_uncached_and_never_charges_the_source(
    make_proxy: ProxyFactory, small_disk: Path, tmp_path: Path
) -> None:
    big, big_digest = make_blob(24 << 20)
    small, small_digest = make_blob(1000)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / big_digest).write_bytes(big)
    (tmp_path / "local" / small_digest).write_bytes(small)
    cache = {"name": "disk", "kind": "disk", "role": "cache", "path": str(small_disk / "cache")}
    client = await start(make_proxy, [cache, folder("local", tmp_path / "local")], breaker={"threshold": 1})

    for _ in range(2):
        response = await client.get(f"/sha1/{big_digest}")
        assert response.status == 200
        assert await response.read() == big
    response = await client.get(f"/sha1/{small_digest}")
    assert (response.status, await response.read()) == (200, small)
    await client.app[STORE].wait_idle()
    stats = tier_stats(client)
    assert (stats["local"]["errors"], stats["local"]["breaker"]) == (0, "closed")
    assert spool_files(small_disk / "cache") == []


async def test_a_full_cache_disk_refuses_uploads_with_507_and_still_deletes(
    make_proxy: ProxyFactory, small_disk: Path, tmp_path: Path
) -> None:
    cache = {"name": "disk", "kind": "disk", "role": "cache", "path": str(small_disk / "cache")}
    uploads = {"name": "uploads", "kind": "fs", "path": str(small_disk / "uploads")}
    client = await make_proxy([cache, uploads], uploads={"targets": ["uploads"]}, auth={"admin_tokens": ["admin"]})
    cached, cached_digest = make_blob(1 << 20)
    assert (await client.put(f"/sha1/{cached_digest}", data=cached)).status == 201
    assert (await client.get(f"/sha1/{cached_digest}")).status == 200
    await client.app[STORE].wait_idle()
    assert tier_stats(client)["disk"]["entries"] == 1
    for _ in range(40):  # fill the disk with blobs that fit in memory on the way
        data, digest = make_blob(1 << 20)
        response = await client.put(f"/sha1/{digest}", data=data)
        if response.status != 201:
            break
    assert response.status == 507
    problem = await response.json(content_type=None)
    assert (response.content_type, problem["type"]) == ("application/problem+json", "insufficient-storage")
    big, big_digest = make_blob(20 << 20)  # spooled to a file on the way: the spool is full too
    response = await client.put(f"/sha1/{big_digest}", data=big)
    assert response.status == 507
    # Space can be freed through the API.
    response = await client.delete(f"/sha1/{cached_digest}", headers={"Authorization": "Bearer admin"})
    assert response.status == 204, await response.text()
    assert tier_stats(client)["disk"]["entries"] == 0
