"""``server.workers = 2``: two processes on one port sharing the disk cache. Coalescing holds
across them (one upstream fetch), /metrics adds them up, a killed worker is replaced, and
SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Upstream, free_port, make_blob, write_config
from tests.processes import ProxyProcess, wait_until

UpstreamFactory = Callable[..., Awaitable[Upstream]]


async def slow_origin(request: web.Request, up: Upstream) -> web.StreamResponse:
    await asyncio.sleep(1.0)  # every client asks while the one fetch is in flight
    data = up.blobs.get(request.match_info["hash"])
    if data is None:
        raise web.HTTPNotFound()
    return web.Response(body=data)


@pytest.fixture
async def two_workers(upstream: UpstreamFactory, tmp_path: Path) -> AsyncIterator[tuple[ProxyProcess, Upstream]]:
    up = await upstream(slow_origin)
    port = free_port()
    config = write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
            {"name": "origin", "kind": "http", "url": up.url},
        ],
        server={"host": "127.0.0.1", "port": port, "workers": 2, "access_log": False},
        uploads={"targets": ["disk"]},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    try:
        yield proxy, up
    finally:
        proxy.stop()


def fresh_connections() -> aiohttp.ClientSession:
    # A new connection per request, so the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))


async def worker_pids(session: aiohttp.ClientSession, url: str, want: int = 2, tries: int = 300) -> set[int]:
    """The workers answering, asked until ``want`` are seen (one may still be starting)."""
    pids: set[int] = set()
    for _ in range(tries):
        async with session.get(f"{url}/stats") as response:
            pids.add((await response.json())["process"]["pid"])
        if len(pids) >= want:
            break
        await asyncio.sleep(0.05)
    return pids


async def metric_sum(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_cold_gets_spread_over_two_workers_make_one_upstream_fetch(
    two_workers: tuple[ProxyProcess, Upstream],
) -> None:
    proxy, up = two_workers
    data, digest = make_blob(300_000)
    up.blobs[digest] = data
    async with fresh_connections() as session:
        await proxy.wait_healthy(session, limit=30)
        assert len(await worker_pids(session, proxy.url)) == 2, "both workers answer on the one port"

        async def get() -> tuple[int, bytes]:
            async with session.get(f"{proxy.url}/sha1/{digest}") as response:
                return response.status, await response.read()

        answers = await asyncio.gather(*(get() for _ in range(40)))
        assert answers == [(200, data)] * 40
        assert up.requests == [digest], "one upstream fetch for the whole server"

        # Any worker's /metrics counts every worker's requests.
        for _ in range(4):
            gets = await metric_sum(session, proxy.url, "casproxy_http_requests_total", route="/sha1/{hash}")
            assert gets == 40
        # The other 39 joined a fill in their own worker; the other worker's fill waited for
        # the first one's (scope "workers") and then served its clients from the disk cache.
        assert await metric_sum(session, proxy.url, "casproxy_coalesced_waits_total", scope="workers") == 1
        assert await metric_sum(session, proxy.url, "casproxy_coalesced_waits_total") == 39


async def test_a_killed_worker_is_replaced_and_sigterm_stops_all(two_workers: tuple[ProxyProcess, Upstream]) -> None:
    proxy, up = two_workers
    data, digest = make_blob(1000)
    up.blobs[digest] = data
    async with fresh_connections() as session:
        await proxy.wait_healthy(session, limit=30)
        before = await worker_pids(session, proxy.url)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            pids = await worker_pids(session, proxy.url, tries=20)
            return victim not in pids and len(pids) == 2

        for _ in range(100):
            if await replaced():
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"worker {victim} was not replaced:\n{proxy.log.read_text()}")
        async with session.get(f"{proxy.url}/sha1/{digest}") as response:
            assert response.status == 200 and await response.read() == data
        survivors = (before | await worker_pids(session, proxy.url)) - {victim}

    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    await wait_until(lambda: proxy.process is not None and proxy.process.poll() is not None, 30, "the server to stop")
    assert proxy.process.returncode == 0
    for pid in survivors:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no worker left behind


async def test_an_upload_to_one_worker_clears_found_nowhere_in_the_other(tmp_path: Path) -> None:
    # Uploads land in a source behind the cache: a worker whose private negative cache says
    # "found nowhere" would answer 404 without looking, unless the upload reached it too.
    port = free_port()
    config = write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
            {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
        ],
        server={"host": "127.0.0.1", "port": port, "workers": 2, "access_log": False},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    data, digest = make_blob(5000)
    try:
        async with fresh_connections() as session:
            await proxy.wait_healthy(session, limit=30)
            assert len(await worker_pids(session, proxy.url)) == 2
            for _ in range(20):  # both workers now remember it as found nowhere
                async with session.get(f"{proxy.url}/sha1/{digest}") as response:
                    assert response.status == 404
            async with session.put(f"{proxy.url}/sha1/{digest}", data=data) as response:
                assert response.status == 201
            for _ in range(20):
                async with session.get(f"{proxy.url}/sha1/{digest}") as response:
                    assert response.status == 200 and await response.read() == data
    finally:
        proxy.stop()
