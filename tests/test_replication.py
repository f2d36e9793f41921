"""The replication queue against small in-memory tiers behind the Tier protocol: no S3, no server."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from proxy.blocking import run
from proxy.digest import Digest
from proxy.errors import TierError
from proxy.replication import ReplicationQueue
from proxy.tier import Blob, BytesBlob, Payload, Stat, Tier


@dataclass(frozen=True)
class BytesPayload:
    data: bytes
    path: None = None
    checksum: None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> BinaryIO | None:
        return None


class MemoryTier(Tier):
    """Blobs in a dict; while ``failing`` is set every put fails."""

    can_store = True

    def __init__(self, name: str = "mirror") -> None:
        self.name = name
        self.blobs: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.failing = False
        self.changed = asyncio.Event()
        self.partner: MemoryTier | None = None  # puts wait until this tier has started one too

    async def open(self, digest: Digest) -> Blob | None:
        data = self.blobs.get(digest)
        return None if data is None else BytesBlob(data)

    async def stat(self, digest: Digest) -> Stat | None:
        data = self.blobs.get(digest)
        return None if data is None else Stat(len(data))

    async def put(self, digest: Digest, payload: Payload) -> None:
        self.puts.append(digest)
        self.changed.set()
        if self.partner is not None:
            await self.partner.changed.wait()
        if self.failing:
            raise TierError(f"{self.name}: down")
        source = payload.open()
        self.blobs[digest] = payload.data or b"" if source is None else await run(_read_all, source)


def _read_all(source: BinaryIO) -> bytes:
    with source:
        return source.read()


def blob(seed: int) -> tuple[bytes, Digest]:
    data = f"blob {seed} ".encode() * 100
    return data, Digest(hashlib.sha1(data).hexdigest())


async def until(condition: Callable[[], Awaitable[bool]], what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not await condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


StartQueue = Callable[[MemoryTier], Awaitable[ReplicationQueue]]


@pytest.fixture
async def queues(tmp_path: Path) -> AsyncIterator[StartQueue]:
    """Queues over one folder, as each worker process of a server has; closed at the end."""
    started: list[ReplicationQueue] = []

    async def start(target: MemoryTier) -> ReplicationQueue:
        queue = ReplicationQueue(str(tmp_path / "queue"), {target.name: target})
        await queue.start()
        started.append(queue)
        return queue

    yield start
    for queue in started:
        await queue.close()


async def test_an_enqueued_blob_reaches_its_target_and_leaves_the_queue(queues: StartQueue, tmp_path: Path) -> None:
    target = MemoryTier()
    queue = await queues(target)
    data, digest = blob(1)
    await queue.enqueue(digest, BytesPayload(data), [target.name])

    async def empty() -> bool:
        return await queue.depth() == 0

    await until(empty, "the queue is empty")
    assert target.blobs == {digest: data} and target.puts == [digest]
    assert not list((tmp_path / "queue" / "blobs").iterdir())  # its copy is gone with its last row


async def test_a_failing_target_is_retried_with_growing_delays_until_it_takes_the_blob(queues: StartQueue) -> None:
    target = MemoryTier()
    target.failing = True
    queue = await queues(target)
    data, digest = blob(2)
    await queue.enqueue(digest, BytesPayload(data), [target.name])

    async def tried_twice() -> bool:
        rows = await queue.pending()
        return bool(rows) and int(rows[0]["attempts"]) >= 2

    await until(tried_twice, "two attempts failed")
    row = (await queue.pending())[0]
    assert row["next_try"] > time.time() and "down" in row["last_error"]  # backing off, and says why
    assert queue.failures >= 2 and digest not in target.blobs
    target.failing = False

    async def delivered() -> bool:
        return digest in target.blobs and (await queue.depth()) == 0

    await until(delivered, "the blob reached the recovered target")
    assert target.blobs[digest] == data


async def test_queued_work_survives_a_restart(queues: StartQueue) -> None:
    down = MemoryTier()
    down.failing = True
    first = await queues(down)
    data, digest = blob(3)
    await first.enqueue(digest, BytesPayload(data), [down.name])
    await until(lambda: _attempted(down), "the first attempt")
    await first.close()

    up = MemoryTier()
    second = await queues(up)

    async def delivered() -> bool:
        return up.blobs.get(digest) == data and (await second.depth()) == 0

    await until(delivered, "the restarted queue delivered the blob", deadline=30.0)


async def _attempted(tier: MemoryTier) -> bool:
    return bool(tier.puts)


async def test_two_workers_sharing_a_queue_never_copy_one_item_twice(queues: StartQueue) -> None:
    # The work is queued first (a queue whose target is down), then two queues over the same folder
    # start at once, each with its own SQLite connection and target, as two worker processes have.
    blobs = [blob(100 + i) for i in range(40)]
    down = MemoryTier()
    down.failing = True
    producer = await queues(down)
    for data, digest in blobs:
        await producer.enqueue(digest, BytesPayload(data), ["mirror"])
    await producer.close()
    one, two = MemoryTier(), MemoryTier()
    one.partner, two.partner = two, one  # neither may finish the work alone, however the two are scheduled
    first, _ = await asyncio.gather(queues(one), queues(two))

    async def done() -> bool:
        return await first.depth() == 0

    await until(done, "every blob was copied")
    copies = one.puts + two.puts
    assert sorted(copies) == sorted(digest for _, digest in blobs)  # each exactly once


_HOLDER = """
import asyncio, sys
from proxy.digest import Digest
from proxy.replication import ReplicationQueue
from proxy.tier import Tier


class Stuck(Tier):
    name = "mirror"
    can_store = True

    async def open(self, digest):
        return None

    async def put(self, digest, payload):
        print("copying", flush=True)  # the copy is leased to this process now
        await asyncio.Event().wait()


async def main():
    queue = ReplicationQueue(sys.argv[1], {"mirror": Stuck()})
    await queue.start()
    await queue.enqueue(Digest(sys.argv[2]), _Payload(), ["mirror"])
    await asyncio.Event().wait()


class _Payload:
    data, path, checksum, size = bytes.fromhex(sys.argv[3]), None, None, len(bytes.fromhex(sys.argv[3]))

    def open(self):
        return None


asyncio.run(main())
"""


async def test_a_copy_leased_by_a_worker_killed_mid_copy_is_taken_back_at_the_next_start(
    queues: StartQueue, tmp_path: Path
) -> None:
    data, digest = blob(5)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(tmp_path / "queue"), digest, data.hex(), stdout=asyncio.subprocess.PIPE
    )
    assert holder.stdout is not None
    assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"copying\n"
    holder.kill()  # kill -9 mid-copy: its lease (LEASE, 300 s) would hide the copy from everyone
    await holder.wait()

    target = MemoryTier()
    queue = await queues(target)

    async def delivered() -> bool:
        return target.blobs.get(digest) == data and (await queue.depth()) == 0

    await until(delivered, "the next start took the dead worker's copy back", deadline=30.0)
