"""The ordered walk: order, deadlines, breakers, corrupt copies skipped, failures charged to
the tier that failed. Against fake tiers behind the protocol."""

from __future__ import annotations

import pytest

from proxy.errors import UpstreamFailed
from proxy.store.composite import Composite
from proxy.store.walk import Skipped, Walk
from proxy.tier import Stat
from tests.fakes import MemoryTier


async def test_the_first_tier_in_order_that_has_it_answers_and_later_ones_are_not_asked() -> None:
    first, second, third = MemoryTier("first"), MemoryTier("second"), MemoryTier("third")
    digest = second.add(b"hello")
    third.add(b"hello")
    first.behaviour = "miss"
    async with Composite([first, second, third]) as store, await store.open(digest) as opened:
        assert await opened.read() == b"hello"
        assert opened.tier == "second"
    assert (first.calls["open"], second.calls["open"], third.calls["open"]) == (1, 1, 0)


async def test_a_hanging_tier_costs_its_timeout_and_is_charged_an_error() -> None:
    walk = Walk()
    tier = MemoryTier("slow", timeout=0.05)
    walk.append(tier)
    tier.behaviour = "hang"
    errors: list[str] = []
    with pytest.raises(Skipped):
        await walk.ask(tier, tier.stat(tier.add(b"x")), errors)
    assert errors == ["slow: no answer within 0.05s"]
    assert walk.meters["slow"].stats.errors == 1
    assert walk.breakers["slow"].failures == 1


async def test_ask_returns_the_calls_answer_and_a_success_closes_the_count() -> None:
    walk = Walk(breaker_threshold=3)
    tier = MemoryTier("ok")
    walk.append(tier)
    walk.breakers["ok"].failed()
    answer: Stat | None = await walk.ask(tier, tier.stat(tier.add(b"four")))
    assert answer == Stat(4)
    assert walk.breakers["ok"].failures == 0


async def test_an_open_breaker_skips_the_tier_without_calling_it() -> None:
    walk = Walk(breaker_threshold=2, breaker_cooldown=60)
    tier = MemoryTier("flaky")
    walk.append(tier)
    tier.behaviour = "raise"
    digest = tier.add(b"x")
    for _ in range(2):
        with pytest.raises(Skipped):
            await walk.ask(tier, tier.open(digest))
    errors: list[str] = []
    with pytest.raises(Skipped):
        await walk.ask(tier, tier.open(digest), errors)
    assert tier.calls["open"] == 2
    assert errors == ["flaky: skipped (circuit open after repeated failures)"]
    assert walk.breakers["flaky"].state == "open"


async def test_a_corrupt_copy_is_skipped_and_charged_to_its_tier_only() -> None:
    bad, good = MemoryTier("bad"), MemoryTier("good")
    digest = bad.add(b"the right bytes")
    good.add(b"the right bytes")
    bad.behaviour = "corrupt"
    async with Composite([bad, good]) as store:
        assert await store.get(digest) == b"the right bytes"
        stats = store.stats
    assert (stats["bad"].corrupt, stats["bad"].errors, stats["bad"].hits) == (1, 0, 0)
    assert (stats["good"].corrupt, stats["good"].errors, stats["good"].hits) == (0, 0, 1)


async def test_failures_are_charged_to_the_failing_tier_and_named_in_the_error() -> None:
    broken, empty = MemoryTier("broken"), MemoryTier("empty")
    digest = broken.add(b"lost")
    broken.behaviour = "raise"
    async with Composite([broken, empty]) as store:
        with pytest.raises(UpstreamFailed, match="broken: told to fail"):
            await store.get(digest)
        stats = store.stats
    assert (stats["broken"].errors, stats["empty"].errors, stats["empty"].misses) == (1, 0, 1)


async def test_trusted_tiers_at_the_head_only() -> None:
    walk = Walk()
    for tier in (MemoryTier("a", trusted=True), MemoryTier("b"), MemoryTier("c", trusted=True)):
        walk.append(tier)
    assert [tier.name for tier in walk.trusted_head()] == ["a"]
