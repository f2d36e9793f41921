"""Coalescing across instances (coalesce.url, SPEC 4): three real ``casproxy serve`` processes
sharing a real redis-server and a bucket cache tier (moto's S3), in front of one slow origin that
counts its fetches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Bucket, make_blob
from tests.fleet import FIRST_CHUNK, Fleet, Origin, own_moto, running_fleet, serving, sha1_of_get
from tests.processes import wait_until
from tests.redis_server import RedisServer

PER_INSTANCE = 20


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """This module's own moto (see tests.fleet.own_moto), in place of the session's."""
    with own_moto() as endpoint:
        yield endpoint


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with serving(Origin()) as origin:
        yield origin


@pytest.fixture
async def fleet(tmp_path: Path, bucket: Bucket, origin: Origin, redis_server: RedisServer) -> AsyncIterator[Fleet]:
    async with running_fleet(tmp_path / "fleet", 3, bucket, origin, redis_server.url) as fleet:
        yield fleet


async def poll(value: Callable[[], Awaitable[float]], want: float, what: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while (got := await value()) != want:
        assert time.monotonic() < deadline, f"timed out waiting for {what} (have {got}, want {want})"
        await asyncio.sleep(0.02)


async def everyone_gets(session: aiohttp.ClientSession, fleet: Fleet, digest: str) -> list[tuple[int, str] | str]:
    """PER_INSTANCE concurrent GETs on every instance at once; a failed request is its error."""

    async def one(url: str) -> tuple[int, str] | str:
        try:
            return await sha1_of_get(session, url)
        except aiohttp.ClientError as error:
            return repr(error)

    return await asyncio.gather(
        *(one(f"{proxy.url}/sha1/{digest}") for proxy in fleet.instances for _ in range(PER_INSTANCE))
    )


async def test_a_fleet_asks_the_origin_once_for_a_cold_blob(fleet: Fleet, origin: Origin, bucket: Bucket) -> None:
    async with aiohttp.ClientSession() as session:
        for size in [1000, 5 << 20]:
            data, digest = make_blob(size)
            origin.blobs[digest] = data
            answers = await everyone_gets(session, fleet, digest)
            assert answers == [(200, digest)] * 3 * PER_INSTANCE, size
            assert origin.count(digest) == 1, size
            assert bucket.get(digest) == data  # where the other instances read it
        # At least one claim per digest; one more for each instance that missed the bucket just
        # before the holder filled it, claimed after the holder let go, and then found it there.
        assert await fleet.metric(session, "casproxy_coalesce_claims_total") >= 2
        assert await fleet.metric(session, "casproxy_coalesce_takeovers_total") == 0


async def test_a_waiter_takes_over_from_a_holder_killed_mid_fill(fleet: Fleet, origin: Origin) -> None:
    origin.hold = asyncio.Event()  # fetches stop after their first chunk
    data, digest = make_blob(3 << 20)
    origin.blobs[digest] = data
    async with aiohttp.ClientSession() as session:
        requests = asyncio.ensure_future(everyone_gets(session, fleet, digest))
        await asyncio.wait_for(origin.started.wait(), 30)
        holder = origin.fetches[0][1]
        fleet.instance(holder).kill()
        killed_at = time.monotonic()
        origin.hold.set()  # later fetches (the takeover's) run at full speed
        answers = await asyncio.wait_for(requests, 60)
        took_over = time.monotonic() - killed_at

        by_instance = [answers[i * PER_INSTANCE : (i + 1) * PER_INSTANCE] for i in range(3)]
        for index, got in enumerate(by_instance):
            if str(index) == holder:  # its clients were cut off; none got wrong bytes
                assert all(answer in ((200, digest),) or isinstance(answer, str) for answer in got)
            else:
                assert got == [(200, digest)] * PER_INSTANCE
        assert len(origin.fetches) == 2, origin.fetches  # the dead holder's, then one takeover
        assert origin.fetches[1][1] != holder
        assert await fleet.metric(session, "casproxy_coalesce_takeovers_total") == 1
        print(f"takeover: every survivor's client served {took_over:.2f}s after the holder was killed")


async def test_requests_succeed_when_redis_dies_mid_fill_and_after(
    fleet: Fleet, origin: Origin, redis_server: RedisServer
) -> None:
    origin.hold = asyncio.Event()
    data, digest = make_blob(1 << 20)
    origin.blobs[digest] = data
    async with aiohttp.ClientSession() as session:
        requests = asyncio.ensure_future(everyone_gets(session, fleet, digest))
        await asyncio.wait_for(origin.started.wait(), 30)
        await poll(lambda: fleet.metric(session, "casproxy_coalesce_waits_total"), 2, "both others to wait")
        redis_server.kill()  # while one instance holds the claim and the others wait on it
        origin.hold.set()
        assert await asyncio.wait_for(requests, 60) == [(200, digest)] * 3 * PER_INSTANCE
        assert origin.count(digest) == 1  # the waiters still found it in the bucket

        # With Redis gone, coalescing is per machine: at most one fetch per instance.
        data, digest = make_blob(1000)
        origin.blobs[digest] = data
        assert await everyone_gets(session, fleet, digest) == [(200, digest)] * 3 * PER_INSTANCE
        assert 1 <= origin.count(digest) <= 3
        assert await fleet.metric(session, "casproxy_coalesce_alone_total") >= 1


async def test_without_coalesce_url_each_instance_fetches_for_itself(
    tmp_path: Path, bucket: Bucket, origin: Origin
) -> None:
    """The baseline the claims improve on: one fetch per machine."""
    origin.hold = asyncio.Event()
    # Larger than the origin's first chunk, so every fetch is held mid-body and no instance can
    # fill the shared bucket before the last one has asked the origin (a 1000-byte blob was sent
    # whole before the hold: on a loaded machine a late instance found it in the bucket).
    data, digest = make_blob(FIRST_CHUNK + 1000)
    origin.blobs[digest] = data
    # A held fetch delivers nothing: no rate floor, or a slow third instance fails the first.
    fleet_of_three = running_fleet(tmp_path / "fleet", 3, bucket, origin, None, min_rate=0)
    async with fleet_of_three as fleet, aiohttp.ClientSession() as session:
        requests = asyncio.ensure_future(everyone_gets(session, fleet, digest))
        await wait_until(lambda: origin.count(digest) == 3, 60, f"every instance to ask the origin: {origin.fetches}")
        origin.hold.set()
        assert await asyncio.wait_for(requests, 30) == [(200, digest)] * 3 * PER_INSTANCE
    assert origin.count(digest) == 3
