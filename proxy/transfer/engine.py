"""Running an export or an import against a Composite.

    transfer = Transfer(TransferSpec("export", targets=("s3://a/p/", "b.tar"), hashes=(...)), store)
    task = asyncio.create_task(transfer.run())
    transfer.snapshot()          # progress, at any time (per target in .targets)
    task.cancel()                # pause: the checkpoints keep what is done
    await Transfer(same_spec, store).run()   # resume: does only what is left, target by target

Export reads every blob through the store once (so every byte is verified) and writes it to
every target that lacks it. Each target is a Destination with its own checkpoint, progress and
writers, fed by a queue: a blob wanted by several targets waits for the slower ones in a spool
(in memory while the ``memory`` budget lasts, on disk beyond), so a slow or broken target never
holds up the others. Import verifies each object of the source against the digest in its name
and stores the good ones in one tier. Up to ``jobs`` items are in flight at once (per target,
for an export); a failing item is reported and the run goes on; a broken target
(TransferError) stops only itself.

The parts: ``exporting`` (the reader that routes each blob to its targets), ``destination`` (a
target's queue, writers, checkpoint and progress), ``reading`` (a blob read once, or as it
arrives), ``importing``, ``hashes`` (the digests asked for), ``wiring`` (spec to targets, sources
and checkpoint paths), ``reporting`` (what goes wrong, said once), ``pool``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from proxy.store.composite import Composite
from proxy.store.spool import MemoryBudget
from proxy.transfer.checkpoint import Checkpoint
from proxy.transfer.destination import Destination
from proxy.transfer.exporting import Export
from proxy.transfer.hashes import Hashes
from proxy.transfer.importing import Import
from proxy.transfer.locations import ByteBudget, Location, parse_location
from proxy.transfer.reporting import Reporter
from proxy.transfer.spec import TransferSpec
from proxy.transfer.tally import Snapshot, Tally, combine
from proxy.transfer.wiring import checkpoint_path, identity, into_tier, make_source, make_target, state_dir


class Transfer:
    """One run of a TransferSpec against ``store``. Not reusable: make a new one to resume."""

    def __init__(
        self,
        spec: TransferSpec,
        store: Composite,
        *,
        state_dir: str | None = None,
        default_into: str | None = None,
        stdin: BinaryIO | None = None,
        stdout: BinaryIO | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        spec.check()
        self.spec = spec
        self.store = store
        self.locations = [parse_location(text) for text in spec.locations]
        self.location = self.locations[0]
        self.into = spec.into or default_into
        self.state = "pending"
        self.tally = Tally(spec.kind, self.location.text)  # an import's
        self.destinations: list[Destination] = []  # an export's, once it has started
        self.checkpoint_paths: list[str] = []
        self._state_dir = state_dir
        self._stdin = stdin
        self._stdout = stdout
        self._reporter = Reporter(report, several=len(self.locations) > 1)
        self._held_budget = MemoryBudget(spec.memory)  # blobs waiting for several targets
        self._part_budget = ByteBudget(spec.memory)  # multipart parts, all bucket targets together

    def snapshot(self) -> Snapshot:
        if self.spec.kind == "import" or not self.destinations:
            return self.tally.snapshot(self.state)
        return combine(self.spec.kind, self.state, [d.tally.snapshot(self._state_of(d)) for d in self.destinations])

    def _state_of(self, destination: Destination) -> str:
        if destination.broken is not None:
            return "failed"
        if self.state in ("done", "failed"):
            return "failed" if destination.tally.problems else "done"
        return self.state

    async def run(self) -> Snapshot:
        """Run to the end; the final snapshot. Raises UsageError/TransferError if the transfer
        cannot start or a target breaks (the other targets are done first), and CancelledError
        (after saving the checkpoints) when cancelled."""
        if self.state != "pending":
            raise RuntimeError("a Transfer runs once; make a new one to resume")
        self.state = "running"
        executor = ThreadPoolExecutor(self.spec.jobs * 2 + 4, thread_name_prefix="transfer")
        try:
            await self.store.start()
            if self.spec.kind == "export":
                await self._export(executor)
            else:
                await self._import(executor)
        except asyncio.CancelledError:
            self.state = "cancelled"
            raise
        except BaseException:
            self.state = "failed"
            raise
        finally:
            self.tally.stop()
            for destination in self.destinations:
                destination.tally.stop()
            executor.shutdown(wait=False)
        self.state = "done"
        snapshot = self.snapshot()
        self.state = "done" if snapshot.ok else "failed"
        return self.snapshot()

    def _checkpoint(self, location: Location, into: str | None = None) -> Checkpoint:
        path = checkpoint_path(self.spec, location, self._state_dir or state_dir(self.store), into)
        if path is not None:
            self.checkpoint_paths.append(path)
        return Checkpoint(path, identity(self.spec, location, into))

    async def _export(self, executor: ThreadPoolExecutor) -> None:
        hashes = Hashes(self.spec, executor, self._stdin)
        expected = await hashes.count()
        for location in self.locations:
            checkpoint = self._checkpoint(location)
            target = await make_target(location, self.spec, self.store, executor, self._part_budget, self._stdout)
            destination = Destination(location, target, checkpoint, self.store, self._reporter)
            destination.tally.total = expected
            self.destinations.append(destination)
        export = Export(
            self.store, self.destinations, hashes, self._reporter, jobs=self.spec.jobs, budget=self._held_budget
        )
        await export.run(expected)

    async def _import(self, executor: ThreadPoolExecutor) -> None:
        tier = into_tier(self.store, self.into)
        source = await make_source(self.location, self.spec, self.store, executor, self._stdin)
        checkpoint = self._checkpoint(self.location, tier.name)
        run = Import(
            self.store,
            source,
            tier,
            checkpoint,
            self.tally,
            self._reporter,
            jobs=self.spec.jobs,
            memory=self.spec.memory,
        )
        await run.run()


__all__ = ["Transfer"]
