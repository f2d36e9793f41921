"""An export's reading side: each digest asked for is read through the store once and put on
the queue of every target that lacks it; the targets' writers (Destination) take it from there.
A blob one target wants is read by that target's writer as it arrives; a blob several want is
read here, verified whole, and shared (in memory within the budget, else in a file)."""

from __future__ import annotations

import asyncio

from proxy.digest import Digest
from proxy.errors import BadDigest
from proxy.store.composite import Composite
from proxy.store.spool import MemoryBudget
from proxy.transfer.destination import Destination, Work
from proxy.transfer.hashes import Hashes
from proxy.transfer.pool import Pool
from proxy.transfer.reading import read_once
from proxy.transfer.reporting import Reporter, item_failure
from proxy.transfer.spec import TransferError


class Export:
    """One export's run over its destinations (already made, each with its tally's total)."""

    def __init__(
        self,
        store: Composite,
        destinations: list[Destination],
        hashes: Hashes,
        reporter: Reporter,
        *,
        jobs: int,
        budget: MemoryBudget,
    ) -> None:
        self.store = store
        self.destinations = destinations
        self.hashes = hashes
        self.reporter = reporter
        self.jobs = jobs  # blobs routed at once, and writers per target
        self.budget = budget  # for blobs waiting in memory for several targets

    async def run(self, expected: int | None) -> None:
        """Raises TransferError if any target broke, once the others are done."""
        writers: list[asyncio.Task[None]] = []
        pool = Pool(self.jobs)
        complete = False
        try:
            await asyncio.gather(*(destination.start(expected) for destination in self.destinations))
            if all(destination.broken is not None for destination in self.destinations):
                raise self.destinations[0].broken or AssertionError("unreachable")
            for destination in self.destinations:
                writers += [asyncio.create_task(destination.write_all()) for _ in range(self.jobs)]
            await self._route_all(pool)
            for destination in self.destinations:
                for _ in range(self.jobs):
                    await destination.queue.put(None)
            await asyncio.gather(*writers)
            complete = True
        finally:
            await pool.cancel()
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
            for destination in self.destinations:
                await destination.drop_queued()
            await asyncio.gather(*(destination.close(complete) for destination in self.destinations))
        broken = [d for d in self.destinations if d.broken is not None]
        if broken:
            raise TransferError("; ".join(f"{d.location.text}: {d.broken}" for d in broken))

    async def _route_all(self, pool: Pool) -> None:
        seen: set[Digest] = set()
        destinations = self.destinations
        async for word in self.hashes.words():
            if all(destination.broken is not None for destination in destinations):
                break
            try:
                digest = Digest.parse(word)
            except BadDigest:
                for destination in destinations:
                    self.reporter.fail(destination.tally, "failed", word[:80], "not a digest")
                continue
            if digest in seen:
                for destination in destinations:
                    destination.tally.finished("skipped")  # listed twice
                continue
            seen.add(digest)
            wanting = [destination for destination in destinations if destination.wants(digest)]
            if wanting:
                await pool.submit(self._route, digest, wanting)
        if self.hashes.read is not None:  # now known: the file of hashes has been read to its end
            for destination in destinations:
                destination.tally.total = self.hashes.read
        await pool.drain()

    async def _route(self, digest: Digest, wanting: list[Destination]) -> None:
        """Ask each target whether it has the blob; read it once for those that lack it."""
        lacking = await asyncio.gather(*(destination.lacks(digest) for destination in wanting))
        needed = [destination for destination, lacks in zip(wanting, lacking, strict=True) if lacks]
        if len(needed) == 1:
            await needed[0].queue.put(Work(digest, None))  # its writer reads it, as it arrives
            return
        if not needed:
            return
        try:
            held = await read_once(self.store, digest, self.budget)
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            kind, message = item_failure(error)
            for destination in needed:
                self.reporter.fail(destination.tally, kind, digest, message)
            return
        try:
            for destination in needed:
                await destination.queue.put(Work(digest, held.acquire()))
        finally:
            await held.release()
