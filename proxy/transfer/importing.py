"""An import: each object of the source is hashed as it arrives, checked against the digest in
its name, and stored in one tier. Up to ``jobs`` objects are in flight; an archive's members are
read in order (the archive moves on after each) and stored in parallel. A failing object is
reported and the run goes on; a TransferError stops the run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from proxy.digest import Digest
from proxy.errors import BadDigest, CorruptBlob
from proxy.store.composite import Composite
from proxy.store.spool import MemoryBudget, Spool
from proxy.tier import CHUNK_SIZE, Tier
from proxy.transfer.checkpoint import Checkpoint
from proxy.transfer.locations import Entry, Source, digest_in
from proxy.transfer.pool import Pool
from proxy.transfer.reporting import Reporter, describe, log_unexpected
from proxy.transfer.spec import TransferError
from proxy.transfer.tally import ItemMeter, Tally

PREFETCH = 100_000  # source entries listed ahead, so the total is known early for most sources


class Import:
    """One import's run from ``source`` into ``tier``, counted in ``tally``."""

    def __init__(
        self,
        store: Composite,
        source: Source,
        tier: Tier,
        checkpoint: Checkpoint,
        tally: Tally,
        reporter: Reporter,
        *,
        jobs: int,
        memory: int,
    ) -> None:
        self.store = store
        self.source = source
        self.tier = tier
        self.checkpoint = checkpoint
        self.tally = tally
        self.reporter = reporter
        self.jobs = jobs
        self.budget = MemoryBudget(memory)  # objects being received, all together
        self._fatal: TransferError | None = None

    async def run(self) -> None:
        source, checkpoint = self.source, self.checkpoint
        await checkpoint.open()
        self.reporter.resuming(self.tally, checkpoint)
        pool = Pool(self.jobs)
        complete = False
        try:
            await source.start()
            entries = source.entries() if source.sequential else self._prefetch(source.entries())
            count = 0
            async for entry in entries:
                count += 1
                if self._fatal is not None:
                    break
                try:
                    digest = digest_in(entry.name)
                except BadDigest:
                    self.reporter.fail(self.tally, "ignored", entry.name, "not a digest; not imported")
                    continue
                recorded = checkpoint.finished.get(entry.name)
                if recorded is not None:
                    self.tally.finished(recorded[1], recorded[0], resumed=True)
                elif source.sequential:
                    await self._import_in_order(entry, digest, pool)
                else:
                    await pool.submit(self._guarded, self._import_one, entry, digest)
            self.tally.total = count
            await pool.drain()
            if self._fatal is not None:
                raise self._fatal
            complete = True
        finally:
            await pool.cancel()
            try:
                await source.close()
            finally:
                await checkpoint.end(complete and not self.tally.problems)

    async def _guarded(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one item; a TransferError stops the whole import."""
        try:
            await work(*args)
        except TransferError as error:
            if self._fatal is None:
                self._fatal = error

    async def _prefetch(self, entries: AsyncIterator[Entry]) -> AsyncIterator[Entry]:
        """List ahead of the transfers (up to PREFETCH entries): the total is known as soon as
        the listing ends, not when the last item is started."""
        queue: asyncio.Queue[Entry | None] = asyncio.Queue(PREFETCH)
        count = 0

        async def lister() -> None:
            nonlocal count
            size: int | None = 0
            async for entry in entries:
                count += 1
                size = None if size is None or entry.size is None else size + entry.size
                await queue.put(entry)
            self.tally.total, self.tally.total_bytes = count, size
            await queue.put(None)

        task = asyncio.get_running_loop().create_task(lister(), name="transfer-listing")
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()  # an item not taken stays in the queue for the next get
                if getter.done() and not getter.cancelled():
                    entry = getter.result()
                    if entry is None:
                        return
                    yield entry
                elif task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]  # the listing failed
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _import_one(self, entry: Entry, digest: Digest) -> None:
        if await self._skip(entry, digest):
            return
        meter = self.tally.meter(entry.size)
        spool = await self._receive(entry, digest, meter)
        if spool is not None:
            await self._store(entry.name, digest, spool, meter)

    async def _import_in_order(self, entry: Entry, digest: Digest, pool: Pool) -> None:
        """An archive member: read it now (the archive moves on after), store it in parallel."""
        if await self._skip(entry, digest):
            return
        meter = self.tally.meter(entry.size)
        spool = await self._receive(entry, digest, meter)
        if spool is None:
            return
        try:
            await pool.submit(self._guarded, self._store, entry.name, digest, spool, meter)
        except BaseException:
            spool.release()
            self.tally.release(meter)
            raise

    async def _skip(self, entry: Entry, digest: Digest) -> bool:
        """True if the tier has the blob already (or asking failed: reported)."""
        try:
            found = await self.tier.stat(digest)
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            self.reporter.fail(self.tally, "failed", entry.name, describe(error))
            return True
        if found is None:
            return False
        self.checkpoint.finish(entry.name, found.size or 0, "skipped")
        self.tally.finished("skipped")
        return True

    async def _receive(self, entry: Entry, digest: Digest, meter: ItemMeter) -> Spool | None:
        """The object's bytes, hashed as they arrive (small in memory, large in a temp file); None
        (reported) if they are not the blob their name says, or could not be read."""
        spool = Spool(digest, self.store.spool_dir, CHUNK_SIZE, budget=self.budget)
        try:
            async for chunk in entry.chunks():
                await spool.write(chunk)
                meter.moved(len(chunk))
            if entry.size is not None and spool.received != entry.size:
                raise OSError(f"read {spool.received} of {entry.size} bytes")
            await spool.finish()
            return spool
        except CorruptBlob as error:
            self.reporter.fail(self.tally, "corrupt", entry.name, f"{error}; not stored")
        except TransferError:
            raise
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            log_unexpected(error)
            self.reporter.fail(self.tally, "failed", entry.name, describe(error))
        finally:
            if not spool.verified:
                spool.release()
                self.tally.release(meter)
        return None

    async def _store(self, name: str, digest: Digest, spool: Spool, meter: ItemMeter) -> None:
        try:
            await self.store.put(digest, spool, [self.tier])  # also forgets any "found nowhere"
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            log_unexpected(error)
            self.reporter.fail(self.tally, "failed", name, f"cannot store in {self.tier.name}: {describe(error)}")
            return
        finally:
            spool.release()
            self.tally.release(meter)
        self.checkpoint.finish(name, spool.size, "done")
        self.tally.finished("done", spool.size)
