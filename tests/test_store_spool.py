"""The spool: in memory while small, in a file when large, tailed by readers while it grows,
and failed (for every reader) when its bytes turn out wrong."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import xxhash

from proxy import DiskTier
from proxy.errors import CorruptBlob
from proxy.store.spool import HASH_INLINE_MAX, ROOM_STEP, MemoryBudget, Spool, SpoolFailed, SpoolUnwritable
from proxy.tier import BytesBlob, FileBlob
from tests.fakes import digest_of
from tests.test_store_fills import until


async def test_a_small_blob_stays_in_memory() -> None:
    data = b"small" * 100
    spool = Spool(digest_of(data), memory_limit=1 << 20)
    await spool.write(data)
    await spool.finish()
    assert (spool.verified, spool.data, spool.path) == (True, data, None)
    blob = spool.blob()
    assert isinstance(blob, BytesBlob)
    assert await blob.read() == data
    spool.release()


async def test_a_large_blob_in_memory_is_hashed_in_blocks_and_verifies() -> None:
    data = os.urandom(3 * HASH_INLINE_MAX + 17)
    spool = Spool(digest_of(data), memory_limit=len(data))
    for offset in range(0, len(data), 64 << 10):
        await spool.write(data[offset : offset + (64 << 10)])
    await spool.finish()
    assert spool.data == data
    spool.release()


async def test_a_blob_past_the_memory_limit_or_budget_goes_to_a_file_removed_on_release(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    budget = MemoryBudget(1000)
    spool = Spool(digest_of(data), str(tmp_path), memory_limit=1 << 20, budget=budget)
    for offset in range(0, len(data), 500):
        await spool.write(data[offset : offset + 500])
    await spool.finish()
    assert spool.data is None and spool.path is not None
    blob = spool.blob()
    assert isinstance(blob, FileBlob)
    spool.release()
    assert list(tmp_path.iterdir()) == []
    assert await blob.read() == data  # its own handle outlives the file's name
    assert budget.used == 0


async def test_a_reader_tails_the_spool_but_gets_the_last_byte_only_once_verified() -> None:
    data = os.urandom(5000)
    spool = Spool(digest_of(data), memory_limit=1 << 20)
    received = bytearray()

    async def read() -> None:
        async for chunk in spool.chunks():
            received.extend(chunk)

    reader = asyncio.create_task(read())
    await spool.write(data)
    await until(lambda: len(received) == len(data) - 1)
    assert not reader.done()
    await spool.finish()
    await reader
    assert bytes(received) == data
    spool.release()


async def test_a_range_reader_gets_its_last_byte_only_once_the_whole_blob_verified() -> None:
    """A range that ends before the blob does is a complete answer too: its last byte waits."""
    data = os.urandom(5000)
    spool = Spool(digest_of(data), memory_limit=1 << 20)
    received = bytearray()

    async def read() -> None:
        async for chunk in spool.chunks(100, 200):
            received.extend(chunk)

    reader = asyncio.create_task(read())
    await spool.write(data[:3000])
    await until(lambda: len(received) == 99)
    await spool.write(data[3000:])
    await asyncio.sleep(0.01)  # more bytes arrived; still no last byte
    assert len(received) == 99 and not reader.done()
    await spool.finish()
    await reader
    assert bytes(received) == data[100:200]
    spool.release()


async def test_wrong_bytes_fail_the_spool_and_its_readers() -> None:
    spool = Spool(digest_of(b"expected"), memory_limit=1 << 20)
    failed = asyncio.Event()

    async def read() -> None:
        try:
            async for _ in spool.chunks():
                pass
        except SpoolFailed:
            failed.set()
            raise

    reader = asyncio.create_task(read())
    await spool.write(b"something else")
    with pytest.raises(CorruptBlob):
        await spool.finish()
    with pytest.raises(SpoolFailed):
        await reader
    assert failed.is_set() and not spool.verified
    with pytest.raises(RuntimeError):
        spool.blob()
    spool.release()


async def test_a_spilled_spool_carries_the_disk_checksum_of_its_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    spool = Spool(digest_of(data), str(tmp_path), memory_limit=1 << 20)  # spills past 1 MiB
    for offset in range(0, len(data), 100_000):
        await spool.write(data[offset : offset + 100_000])
    await spool.finish()
    assert spool.path is not None
    assert spool.checksum == xxhash.xxh3_64_hexdigest(data) == xxhash.xxh3_64_hexdigest(Path(spool.path).read_bytes())
    spool.release()


async def test_the_disk_cache_commits_a_spooled_file_under_the_spools_checksum(tmp_path: Path) -> None:
    data = os.urandom(2 << 20)
    disk = DiskTier(str(tmp_path / "cache"), memory_item_limit=0)
    await disk.start()
    try:
        spool = Spool(digest_of(data), disk.spool_dir, memory_limit=0)  # as fills spool
        await spool.write(data)
        await spool.finish()
        await disk.put(digest_of(data), spool)
        spool.release()
        blob = await disk.open(digest_of(data))
        assert blob is not None
        assert await blob.read() == data  # read back through its checksum check
    finally:
        await disk.close()


class Room:
    """A spool folder's owner that has room for ``free`` more bytes, and records each claim."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.claims: list[int] = []

    async def __call__(self, size: int) -> bool:
        self.claims.append(size)
        return size <= self.free


async def write_all(spool: Spool, data: bytes) -> None:
    for offset in range(0, len(data), 64 << 10):
        await spool.write(data[offset : offset + (64 << 10)])
    await spool.finish()


async def test_a_growing_file_claims_its_room_a_step_ahead_before_writing(tmp_path: Path) -> None:
    data = os.urandom(2 * ROOM_STEP + 5)
    room = Room(free=1 << 40)
    spool = Spool(digest_of(data), str(tmp_path), memory_limit=0, room=room)
    await write_all(spool, data)
    assert spool.path is not None and spool.data is None
    assert room.claims == [ROOM_STEP, ROOM_STEP, ROOM_STEP]  # size unknown: one claim per step
    spool.release()

    announced = Spool(digest_of(data), str(tmp_path), memory_limit=0, room=room)
    await announced.expect(len(data))
    await write_all(announced, data)
    assert room.claims[3:] == [len(data)]  # size known: one claim for all of it
    announced.release()


async def test_with_no_room_on_disk_the_blob_is_kept_in_memory_within_the_budget(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    budget = MemoryBudget(4 << 20)
    spool = Spool(digest_of(data), str(tmp_path), memory_limit=1 << 20, budget=budget, room=Room(free=0))
    await write_all(spool, data)  # size unknown: it learns at its first flush
    assert (spool.data, spool.path, budget.used) == (data, None, len(data))
    spool.release()
    assert budget.used == 0

    announced = Spool(digest_of(data), str(tmp_path), memory_limit=0, budget=budget, room=Room(free=0))
    await announced.expect(len(data))
    await write_all(announced, data)
    assert announced.data == data and list(tmp_path.iterdir()) == []
    announced.release()


async def test_with_no_room_on_disk_or_in_memory_the_spool_is_unwritable(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    budget = MemoryBudget(2 << 20)
    spool = Spool(digest_of(data), str(tmp_path), memory_limit=0, budget=budget, room=Room(free=0))
    with pytest.raises(SpoolUnwritable):
        await spool.expect(len(data))  # known at once: nothing is written
    spool.release()

    spool = Spool(digest_of(data), str(tmp_path), memory_limit=1 << 20, budget=budget, room=Room(free=0))
    with pytest.raises(SpoolUnwritable):
        await write_all(spool, data)
    spool.release()
    assert budget.used == 0 and list(tmp_path.iterdir()) == []

    unbudgeted = Spool(digest_of(data), str(tmp_path), memory_limit=0, room=Room(free=0))
    with pytest.raises(SpoolUnwritable):  # no budget (an upload's spool): memory is not unbounded
        await write_all(unbudgeted, data)
    unbudgeted.release()

    async def broken(size: int) -> bool:
        raise OSError("database or disk is full")

    spool = Spool(digest_of(data), str(tmp_path), memory_limit=0, room=broken)
    with pytest.raises(SpoolUnwritable):  # the room's owner failing is this machine failing
        await write_all(spool, data)
    spool.release()
