"""The negative cache: "found nowhere" remembered for its TTL, forgotten on a store, here and,
through the shared upload clock, in every process that shares the cache folder."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from proxy.store.negative import NegativeCache, UploadClock

DIGEST = "c" * 40


async def test_an_entry_is_remembered_until_discarded() -> None:
    negative = NegativeCache(ttl=60)
    assert not await negative.contains(DIGEST)
    await negative.add(DIGEST, negative.now())
    assert await negative.contains(DIGEST)
    await negative.discard(DIGEST)
    assert not await negative.contains(DIGEST)
    assert negative.hits == 1
    await negative.close()


async def test_a_zero_ttl_remembers_nothing() -> None:
    negative = NegativeCache(ttl=0)
    await negative.add(DIGEST)
    assert not await negative.contains(DIGEST)
    await negative.close()


async def test_a_store_in_another_process_voids_entries_from_walks_that_began_before_it(tmp_path: Path) -> None:
    path = str(tmp_path / "uploads.clock")
    negative = NegativeCache(ttl=60, clock=UploadClock(path))
    began = negative.now()
    await negative.add(DIGEST, began)
    assert await negative.contains(DIGEST)
    advance = f"from proxy.store.negative import UploadClock; UploadClock({path!r}).advance()"
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", advance)
    assert await child.wait() == 0
    assert not await negative.contains(DIGEST)  # seen through the mapping: no reopen
    await negative.add(DIGEST, negative.now())  # a walk after the store counts again
    assert await negative.contains(DIGEST)
    await negative.close()


def test_the_clock_never_goes_back(tmp_path: Path) -> None:
    path = str(tmp_path / "uploads.clock")
    first, second = UploadClock(path), UploadClock(path)
    assert first.last() == 0
    (tmp_path / "uploads.clock").write_bytes((1 << 62).to_bytes(8, "little"))  # a clock ahead of ours
    second.advance()
    assert first.last() == 1 << 62
    first.close()
    second.close()
