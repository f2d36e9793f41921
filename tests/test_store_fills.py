"""Fills: concurrent opens coalesce into one fetch, a client that leaves does not cancel the
fill, and the verified copy is written into the cache tiers before the one that had it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from proxy.store.composite import Composite
from tests.fakes import MemoryTier


async def until(condition: Callable[[], bool], deadline: float = 10.0) -> None:
    """Poll ``condition`` until it holds, failing after ``deadline`` seconds."""
    give_up = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < give_up, "condition not reached in time"
        await asyncio.sleep(0.001)


def gated(name: str) -> MemoryTier:
    tier = MemoryTier(name)
    tier.gate = asyncio.Event()
    return tier


async def test_concurrent_opens_coalesce_into_one_fetch() -> None:
    source = gated("source")
    digest = source.add(b"one fetch for all" * 1000)
    async with Composite([source]) as store:
        readers = [asyncio.create_task(store.get(digest)) for _ in range(20)]
        await until(lambda: store.coalesced == 19)  # all joined while the copy is held back
        assert source.gate is not None
        source.gate.set()
        assert set(await asyncio.gather(*readers)) == {b"one fetch for all" * 1000}
    assert source.calls["open"] == 1


async def test_a_client_that_leaves_does_not_cancel_the_fill() -> None:
    cache, source = MemoryTier("cache", trusted=True), gated("source")
    digest = source.add(b"still wanted")
    async with Composite() as store:
        store.append_cache(cache)
        store.append_source(source)
        reader = asyncio.create_task(store.get(digest))
        await until(lambda: source.calls["open"] == 1)
        reader.cancel()
        assert source.gate is not None
        source.gate.set()
        await store.wait_idle()
        assert cache.blobs[digest] == b"still wanted"
        assert await store.get(digest) == b"still wanted"
    assert source.calls["open"] == 1


async def test_the_copy_is_cached_in_the_cache_tiers_before_the_one_that_had_it() -> None:
    cache, empty, source, after = (
        MemoryTier("cache", trusted=True),
        MemoryTier("empty"),
        MemoryTier("source"),
        MemoryTier("after"),
    )
    digest = source.add(b"fill me")
    async with Composite() as store:
        store.append_cache(cache)
        store.append_source(empty)
        store.append_source(source)
        store.append_cache(after)
        async with await store.open(digest) as opened:
            assert (opened.tier, opened.hit) == ("source", False)
            assert await opened.read() == b"fill me"
        await store.wait_idle()
        assert cache.blobs == {digest: b"fill me"}
        assert (empty.calls["put"], after.calls["put"]) == (0, 0)  # a source, and a tier behind it
        async with await store.open(digest) as opened:
            assert (opened.tier, opened.hit) == ("cache", True)
        assert store.stats["cache"].cache_writes == 1


async def test_with_cache_false_a_copy_from_a_source_is_not_cached() -> None:
    cache, source = MemoryTier("cache", trusted=True), MemoryTier("source")
    digest = source.add(b"exported once")
    async with Composite() as store:
        store.append_cache(cache)
        store.append_source(source)
        assert await store.get(digest, cache=False) == b"exported once"
        assert b"".join([chunk async for chunk in store.stream(digest, cache=False)]) == b"exported once"
        await store.wait_idle()
        assert cache.calls["put"] == 0
        assert await store.get(digest) == b"exported once"  # cache=True (the default) caches it
        await store.wait_idle()
        assert cache.blobs == {digest: b"exported once"}


async def test_an_arriving_blob_streams_all_but_its_last_byte_until_verified() -> None:
    source = gated("source")
    data = b"0123456789"
    digest = source.add(data)
    async with Composite([source]) as store:
        opened = await store.open(digest)
        try:
            assert opened.size == len(data)
            assert await opened.streams_past(5)
            assert not await opened.streams_past(len(data))
            received = bytearray()

            async def follow() -> None:
                async for chunk in opened.chunks():
                    received.extend(chunk)

            follower = asyncio.create_task(follow())
            assert source.gate is not None
            source.gate.set()
            await follower
            assert bytes(received) == data
            blob = await opened.verified()
            assert await blob.read() == data
        finally:
            await opened.close()


async def test_a_found_blob_reads_a_range_and_is_handed_over_once() -> None:
    cache = MemoryTier("cache", trusted=True)
    digest = cache.add(b"abcdefghij")
    async with Composite() as store:
        store.append_cache(cache)
        async with await store.open(digest) as opened:
            assert not await opened.streams_past(0)
            assert b"".join([chunk async for chunk in opened.chunks(2, 5)]) == b"cde"
        async with await store.open(digest) as opened:
            blob = await opened.verified()
            assert await blob.read() == b"abcdefghij"


async def test_a_verified_blob_names_the_tier_whose_copy_verified() -> None:
    bad, good = MemoryTier("bad"), MemoryTier("good")
    digest = bad.add(b"the right bytes")
    good.add(b"the right bytes")
    bad.behaviour = "corrupt"
    async with Composite([bad, good]) as store, await store.open(digest) as opened:
        blob = await opened.verified()
        assert await blob.read() == b"the right bytes"
        assert opened.tier == "good"
