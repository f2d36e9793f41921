"""proxy.store.claims against a real redis-server: two Claims objects stand for two instances
(each has its own connections), with a short lease so that a dead holder runs out quickly; and
two stores (fills) sharing a bucket through them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.digest import Digest
from proxy.store.claims import CHANNEL, KEY_PREFIX, Claims
from proxy.store.composite import Composite
from proxy.tier import Blob
from tests.fakes import MemoryTier
from tests.redis_server import RedisServer

LEASE = 1.0
DIGEST = "4bc39c7d87318382feb3cc5a684c767fbd913968"


@pytest.fixture
async def instances(redis_server: RedisServer) -> AsyncIterator[Callable[..., Claims]]:
    made: list[Claims] = []

    def make(wait: float = 10.0, url: str = redis_server.url) -> Claims:
        claims = Claims(url, wait=wait, lease=LEASE)
        made.append(claims)
        return claims

    yield make
    for claims in made:
        await claims.close()


async def subscribed(claims: Claims) -> None:
    """Wait until the listener's subscription is live (so a test can rely on the notice)."""
    await claims.start()
    deadline = time.monotonic() + 10
    while not await claims.redis.pubsub_numsub(CHANNEL) or (await claims.redis.pubsub_numsub(CHANNEL))[0][1] < 1:
        assert time.monotonic() < deadline, "the listener never subscribed"
        await asyncio.sleep(0.01)


async def test_one_holder_and_a_waiter_woken_by_the_release(
    instances: Callable[..., Claims], redis_server: RedisServer
) -> None:
    first, second = instances(), instances(wait=30)
    await subscribed(second)
    holder, waiter = first.claim(DIGEST), second.claim(DIGEST)
    assert await holder.take()
    assert first.held == 1
    waiting = asyncio.ensure_future(waiter.take())
    await asyncio.sleep(LEASE * 2)  # the holder renews: the lease alone would have run out by now
    assert not waiting.done()
    released = time.monotonic()
    await holder.release()
    assert await asyncio.wait_for(waiting, 5) is False  # look in the shared tier
    assert time.monotonic() - released < LEASE  # woken by the notice, not by a lease running out
    assert waiter.waited and not waiter.held
    assert redis_server.keys(KEY_PREFIX + "*") == {}


async def test_a_holder_that_stops_renewing_is_taken_over(instances: Callable[..., Claims]) -> None:
    claims = instances()
    key = KEY_PREFIX + DIGEST
    # A holder that died: its claim stays until its lease runs out, and nobody is told.
    await claims.redis.set(key, "dead-holder", px=int(LEASE * 1000))
    waiter = claims.claim(DIGEST)
    began = time.monotonic()
    assert await waiter.take() is False  # woken when the lease would run out: look in the shared tier
    assert time.monotonic() - began >= LEASE / 2
    assert await waiter.take() is True  # not there: the takeover
    assert waiter.held
    # Compare-and-delete: a holder whose lease ran out cannot drop the claim that replaced it.
    assert await claims.release_script(keys=[key], args=["dead-holder", CHANNEL, DIGEST]) == 0
    assert await claims.redis.get(key) == waiter.token.encode()
    await waiter.release()
    assert await claims.redis.get(key) is None


async def test_the_wait_is_bounded(instances: Callable[..., Claims]) -> None:
    first, second = instances(), instances(wait=0.2)
    holder = first.claim(DIGEST)
    assert await holder.take()
    waiter = second.claim(DIGEST)
    began = time.monotonic()
    while not await waiter.take():  # woken at most by lease ends, then coalesce.wait runs out
        pass
    assert not waiter.held  # fetching alone, beside the holder
    assert time.monotonic() - began < LEASE * 3
    await holder.release()


async def test_without_redis_every_claim_is_taken_at_once(
    instances: Callable[..., Claims], redis_server: RedisServer
) -> None:
    redis_server.kill()
    claims = instances()
    await claims.start()
    began = time.monotonic()
    for _ in range(20):  # one short timeout, then the breaker answers without asking
        claim = claims.claim(DIGEST)
        assert await claim.take() is True
        assert not claim.held
        await claim.release()
    assert time.monotonic() - began < 2
    assert claims.describe()["available"] is False


class Bucket(MemoryTier):
    """A cache tier every "instance" reads (the blobs dict is shared); ``stale`` opens miss
    first, as a read that raced another instance's write would."""

    shared = True

    def __init__(self, blobs: dict[str, bytes], stale: int = 0) -> None:
        super().__init__("bucket")
        self.blobs = blobs
        self.stale = stale

    async def open(self, digest: Digest) -> Blob | None:
        if self.stale:
            self.stale -= 1
            self.calls["open"] += 1
            return None
        return await super().open(digest)


async def test_a_claim_taken_after_another_fill_ended_looks_in_the_shared_tier_first(
    instances: Callable[..., Claims],
) -> None:
    """An instance missed the bucket just before another's fill put the blob there and released
    its claim: the claim is free when it asks, but the blob must come from the bucket."""
    shared: dict[str, bytes] = {}
    origin = MemoryTier("origin")
    digest = origin.add(b"fetched once for the fleet" * 100)
    late = Bucket(shared, stale=1)
    async with Composite(claims=instances()) as first, Composite(claims=instances()) as second:
        first.append_cache(Bucket(shared))
        first.append_source(origin)
        second.append_cache(late)
        second.append_source(origin)
        assert await first.get(digest) == origin.blobs[digest]
        assert await second.get(digest) == origin.blobs[digest]
    assert origin.calls["open"] == 1
    assert late.calls["open"] == 2  # the stale miss, then the look after taking the claim


async def test_a_claim_given_up_mid_call_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fill cancelled while its claim waits on Redis (a server stopping) keeps no entry: the
    per-digest notices live only as long as a take()."""
    # The unanswered command must still be waiting when the test looks, however slow the machine.
    monkeypatch.setattr("proxy.store.claims._COMMAND_TIMEOUT", 30.0)
    asked = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # a command came; it is never answered
        asked.set()
        await reader.read()  # until the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    claims = Claims(f"redis://127.0.0.1:{port}/0", wait=10, lease=LEASE)
    try:
        taking = asyncio.ensure_future(claims.claim(DIGEST).take())
        await asyncio.wait_for(asked.wait(), 10)
        assert claims.describe()["waiting"] == 1
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        assert claims.describe()["waiting"] == 0
    finally:
        await claims.close()
        server.close()
