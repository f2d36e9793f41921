"""One export target: a queue of blobs to write, the writers that drain it, and the target's own
checkpoint and progress. Each target goes at its own pace: a slow one only fills its queue, a
broken one (TransferError) stops alone while the others go on."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import botocore.exceptions

from proxy.digest import Digest
from proxy.errors import CorruptBlob, UpstreamFailed
from proxy.store.composite import Composite
from proxy.transfer.checkpoint import Checkpoint
from proxy.transfer.locations import Location, Target
from proxy.transfer.reading import Shared, StoreBlob
from proxy.transfer.reporting import Reporter, describe, item_failure
from proxy.transfer.spec import TransferError
from proxy.transfer.tally import Tally

log = logging.getLogger(__name__)
# Blobs read ahead of the slowest target: they wait as verified copies (in RAM within --memory,
# else files), each holding a file descriptor, so this stays well under the usual 1024 fds.
BACKLOG = 256


@dataclass
class Work:
    """A blob for one target: ``held`` is a verified copy shared with other targets (the
    writer releases its reference), None when this target is the only one that wants it and
    reads it from the store itself."""

    digest: Digest
    held: Shared | None


class Destination:
    """One export target: its writer tasks, checkpoint, progress, and whether it broke."""

    def __init__(
        self, location: Location, target: Target, checkpoint: Checkpoint, store: Composite, reporter: Reporter
    ) -> None:
        self.location = location
        self.target = target
        self.checkpoint = checkpoint
        self.tally = Tally("export", location.text)
        self.queue: asyncio.Queue[Work | None] = asyncio.Queue(BACKLOG)
        self.broken: TransferError | None = None
        self.started = False
        self._store = store
        self._reporter = reporter

    def wants(self, digest: Digest) -> bool:
        """False if it broke, or an earlier run finished the blob here (counted as resumed)."""
        if self.broken is not None:
            return False
        recorded = self.checkpoint.finished.get(digest)
        if recorded is None:
            return True
        self.tally.finished(recorded[1], recorded[0], resumed=True)
        return False

    def broke(self, error: TransferError) -> None:
        if self.broken is None:
            self.broken = error
            self._reporter.broke(self.tally, error)

    # -- lifetime ------------------------------------------------------------------------

    async def start(self, expected: int | None) -> None:
        """Open the checkpoint and the target; a target that cannot start is broken."""
        try:
            await self.checkpoint.open()
            self.started = True
            self._reporter.resuming(self.tally, self.checkpoint)
            await self.target.start(expected)
        except TransferError as error:
            self.broke(error)
        except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            self.broke(TransferError(describe(error)))

    async def close(self, complete: bool) -> None:
        complete = complete and self.broken is None
        try:
            await self.target.close(complete)
        except Exception as error:  # noqa: BLE001 - one target's failure must not stop the others
            self.broke(TransferError(describe(error)))
            complete = False
        finally:
            if self.started:
                await self.checkpoint.end(complete and not self.tally.problems)

    async def drop_queued(self) -> None:
        """Let go of the copies still waiting, once the writers have stopped."""
        while not self.queue.empty():
            work = self.queue.get_nowait()
            if work is not None and work.held is not None:
                await work.held.release()

    # -- writing -------------------------------------------------------------------------

    async def lacks(self, digest: Digest) -> bool:
        """True if the target does not have the blob yet; else it is counted (skipped, failed,
        or the target broke)."""
        try:
            if not await self.target.has(digest):
                return True
        except TransferError as error:
            self.broke(error)
            return False
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            self._reporter.fail(self.tally, "failed", digest, describe(error))
            return False
        self.checkpoint.finish(digest, 0, "skipped")
        self.tally.finished("skipped")
        return False

    async def write_all(self) -> None:
        """Write what the queue brings until told to stop; a broken target only drains it."""
        while (work := await self.queue.get()) is not None:
            try:
                if self.broken is None:
                    await self._write_one(work)
            except TransferError as error:
                self.broke(error)
            finally:
                if work.held is not None:
                    await work.held.release()

    async def _write_one(self, work: Work) -> None:
        try:
            size = await self._write(work)
        except TransferError:
            raise
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            kind, message = item_failure(error)
            self._reporter.fail(self.tally, kind, work.digest, message)
        else:
            self.checkpoint.finish(work.digest, size, "done")
            self.tally.finished("done", size)

    async def _write(self, work: Work) -> int:
        """Write one blob; once more if its copy went bad mid-way (the store moves on to the
        next tier that has it)."""
        for attempt in (1, 2):
            if work.held is not None:
                blob: StoreBlob | Shared = work.held
            else:
                blob = await StoreBlob.open(self._store, work.digest, whole=self.target.verified_first)
            meter = self.tally.meter(blob.size)
            try:
                await self.target.write(work.digest, blob, self.checkpoint, meter)
                return blob.size
            except (CorruptBlob, UpstreamFailed) as error:
                if attempt == 2 or work.held is not None:
                    raise
                log.warning("%s: %s; reading it again", work.digest, describe(error))
            finally:
                self.tally.release(meter)
                if isinstance(blob, StoreBlob):
                    await blob.close()
        raise AssertionError("unreachable")
