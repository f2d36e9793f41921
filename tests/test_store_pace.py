"""A tier's bytes under its deadline and minimum rate: a trickle or a hang fails within one
window or one timeout; a steady source, however slow its consumer, does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.store import pace
from proxy.store.pace import TooSlow, paced


@pytest.fixture(autouse=True)
def short_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pace, "RATE_WINDOW", 0.2)


async def source(pieces: int, size: int, gap: float, then_hang: bool = False) -> AsyncIterator[bytes]:
    for _ in range(pieces):
        yield bytes(size)
        await asyncio.sleep(gap)
    if then_hang:
        await asyncio.Event().wait()


async def drain(chunks: AsyncIterator[bytes]) -> int:
    return sum([len(chunk) async for chunk in chunks])


async def test_a_source_above_its_min_rate_is_read_whole_even_by_a_slow_consumer() -> None:
    received = 0
    async for chunk in paced(source(20, 1000, 0.01), "t", idle=5, min_rate=1000):
        received += len(chunk)
        await asyncio.sleep(0.02)  # the consumer's time is not the tier's
    assert received == 20_000


async def test_a_trickle_below_min_rate_fails_within_a_window() -> None:
    with pytest.raises(TooSlow, match=r"t: sent \d+ bytes in 0\.2s, below its min_rate of 100000 bytes/s"):
        async with asyncio.timeout(5):
            await drain(paced(source(10_000, 1, 0.01), "t", idle=5, min_rate=100_000))


async def test_a_source_that_goes_quiet_fails_after_its_timeout() -> None:
    with pytest.raises(TooSlow, match=r"t: no byte for 0\.1s"):
        async with asyncio.timeout(5):
            await drain(paced(source(3, 10, 0, then_hang=True), "t", idle=0.1, min_rate=0))


async def test_without_a_floor_a_slow_steady_source_is_read_whole() -> None:
    assert await drain(paced(source(30, 1, 0.01), "t", idle=1, min_rate=0)) == 30


async def test_closing_the_reader_cancels_the_read_in_flight() -> None:
    waiting, cancelled = asyncio.Event(), asyncio.Event()

    async def hanging() -> AsyncIterator[bytes]:
        yield b"x"
        try:
            waiting.set()
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        yield b"never"

    reader = paced(hanging(), "t", idle=5, min_rate=0)
    assert await anext(reader) == b"x"
    await waiting.wait()  # the next read is under way
    await reader.aclose()
    assert cancelled.is_set()
