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
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import botocore.exceptions

from proxy.blocking import run_on
from proxy.config import Config
from proxy.digest import Digest
from proxy.errors import BadDigest, CorruptBlob, NotFound, ProxyError, TierError, UpstreamFailed
from proxy.policy import default_targets
from proxy.policy import state_dir as policy_state_dir
from proxy.store.composite import Composite
from proxy.store.opened import Opened
from proxy.store.spool import MemoryBudget, Spool
from proxy.tier import CHUNK_SIZE, Blob, FileBlob, Tier
from proxy.transfer.bucket import BucketSource, BucketTarget, error_code, make_client
from proxy.transfer.checkpoint import Checkpoint
from proxy.transfer.locations import (
    ByteBudget,
    Entry,
    FolderSource,
    FolderTarget,
    Location,
    Source,
    Target,
    digest_in,
    parse_location,
)
from proxy.transfer.spec import TransferError, TransferSpec, UsageError
from proxy.transfer.tally import ItemMeter, Snapshot, Tally, combine
from proxy.transfer.tarball import TarSource, TarTarget

log = logging.getLogger(__name__)
T = TypeVar("T")
PREFETCH = 100_000  # source entries listed ahead, so the total is known early for most sources
# Blobs read ahead of the slowest target: they wait as verified copies (in RAM within --memory,
# else files), each holding a file descriptor, so this stays well under the usual 1024 fds.
BACKLOG = 256


def state_dir(store: Composite) -> str:
    """Where a transfer keeps its checkpoints by default: the folder a tier owns (the disk
    cache's), else ./data."""
    return policy_state_dir(store.tiers)


def default_into(config: Config, store: Composite) -> str | None:
    """The tier an import writes to by default: the first upload target, else the first source
    that can store blobs."""
    if config.uploads.targets:
        return config.uploads.targets[0]
    targets = default_targets(store.tiers)
    return targets[0].name if targets else None


def checkpoint_path(spec: TransferSpec, location: Location, folder: str, into: str | None = None) -> str | None:
    """Where the record of ``spec``'s work at ``location`` lives: ``spec.checkpoint`` for one
    location (one file per target beside it for several), else a file in ``folder`` named by
    the work, so the same location resumes whatever other targets a run names."""
    identity = _identity(spec, location, into)
    name = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    if spec.checkpoint is not None:
        if len(spec.locations) == 1:
            return spec.checkpoint
        root, ext = os.path.splitext(spec.checkpoint)
        return f"{root}-{name}{ext}"
    if not location.resumable:
        return None
    return os.path.join(folder, "transfers", f"{spec.kind}-{name}.sqlite")


def _identity(spec: TransferSpec, location: Location, into: str | None) -> dict[str, Any]:
    return {"kind": spec.kind, "location": location.identity, "into": into}


class Shared:
    """A verified blob several targets read, each from the start (a file read with pread, or
    bytes in memory counted against the transfer's memory budget); closed when the last target
    lets go."""

    def __init__(self, blob: Blob, size: int, budget: MemoryBudget | None = None) -> None:
        self.blob = blob
        self.size = size
        self._budget = budget  # holds ``size`` of it, for bytes in memory
        self._refs = 1

    def acquire(self) -> Shared:
        self._refs += 1
        return self

    def chunks(self) -> AsyncIterator[bytes]:
        return self.blob.chunks()

    async def release(self) -> None:
        self._refs -= 1
        if self._refs == 0:
            if self._budget is not None:
                self._budget.give(self.size)
            await self.blob.close()


@dataclass
class _Work:
    """A blob for one target: ``held`` is a verified copy shared with other targets (the
    writer releases its reference), None when this target is the only one that wants it and
    reads it from the store itself."""

    digest: Digest
    held: Shared | None


class Destination:
    """One export target: its writer tasks, checkpoint, progress, and whether it broke."""

    def __init__(self, location: Location, target: Target, checkpoint: Checkpoint) -> None:
        self.location = location
        self.target = target
        self.checkpoint = checkpoint
        self.tally = Tally("export", location.text)
        self.queue: asyncio.Queue[_Work | None] = asyncio.Queue(BACKLOG)
        self.broken: TransferError | None = None
        self.started = False

    def wants(self, digest: Digest) -> bool:
        """False if it broke, or an earlier run finished the blob here (counted as resumed)."""
        if self.broken is not None:
            return False
        recorded = self.checkpoint.finished.get(digest)
        if recorded is None:
            return True
        self.tally.finished(recorded[1], recorded[0], resumed=True)
        return False


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
        self._report = report
        self._fatal: TransferError | None = None
        self._executor: ThreadPoolExecutor | None = None
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
        self._executor = ThreadPoolExecutor(self.spec.jobs * 2 + 4, thread_name_prefix="transfer")
        try:
            await self.store.start()
            if self.spec.kind == "export":
                await self._export()
            else:
                await self._import()
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
            self._executor.shutdown(wait=False)
        self.state = "done"
        snapshot = self.snapshot()
        self.state = "done" if snapshot.ok else "failed"
        return self.snapshot()

    # -- shared --------------------------------------------------------------------------

    def _checkpoint(self, location: Location, into: str | None = None) -> Checkpoint:
        path = checkpoint_path(self.spec, location, self._state_dir or state_dir(self.store), into)
        if path is not None:
            self.checkpoint_paths.append(path)
        return Checkpoint(path, _identity(self.spec, location, into))

    def _fail(self, tally: Tally, kind: str, name: str, message: str) -> None:
        line = f"{name}: {message}"
        tally.error(kind, line)
        if self._report is not None:
            prefix = f"{tally.location}: " if len(self.locations) > 1 else ""
            self._report(prefix + line)

    def _resuming(self, tally: Tally, checkpoint: Checkpoint) -> None:
        """Say at the start of a resumed run how much an earlier run did."""
        if self._report is None or not checkpoint.finished:
            return
        from proxy.transfer.progress import human_size  # progress draws; the engine only counts

        done = len(checkpoint.finished)
        size = sum(size for size, _ in checkpoint.finished.values())
        total = "?" if tally.total is None else str(tally.total)
        where = f" {tally.location}" if len(self.locations) > 1 else ""
        self._report(f"resuming{where}: {done} of {total} done ({human_size(size)} by earlier runs)")

    async def _finish(self, tally: Tally, checkpoint: Checkpoint, complete: bool) -> None:
        if complete and not tally.problems:
            await checkpoint.discard()  # nothing left to resume
        else:
            await checkpoint.close()

    async def _guarded(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one item; a TransferError stops the whole transfer."""
        try:
            await work(*args)
        except TransferError as error:
            if self._fatal is None:
                self._fatal = error

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    # -- export --------------------------------------------------------------------------

    def _make_target(self, location: Location) -> Target:
        spec = self.spec
        assert self._executor is not None
        if location.kind == "s3":
            client = make_client(location, spec.endpoint_url, self.store.tiers, spec.jobs * 2 + 4)
            return BucketTarget(
                location,
                client,
                self._executor,
                requests=spec.jobs,
                part_size=spec.part_size,
                threshold=spec.multipart_threshold,
                budget=self._part_budget,
            )
        if location.kind == "folder":
            return FolderTarget(location, self._executor)
        return TarTarget(location, self._stdout or sys.stdout.buffer)

    async def _export(self) -> None:
        expected = await self._count_hashes()
        for location in self.locations:
            checkpoint = self._checkpoint(location)
            destination = Destination(location, self._make_target(location), checkpoint)
            destination.tally.total = expected
            self.destinations.append(destination)
        writers: list[asyncio.Task[None]] = []
        pool = _Pool(self.spec.jobs)
        complete = False
        try:
            await asyncio.gather(*(self._start(destination, expected) for destination in self.destinations))
            if all(destination.broken is not None for destination in self.destinations):
                raise self.destinations[0].broken or AssertionError("unreachable")
            for destination in self.destinations:
                writers += [asyncio.create_task(self._writer(destination)) for _ in range(self.spec.jobs)]
            await self._route_all(pool)
            for destination in self.destinations:
                for _ in range(self.spec.jobs):
                    await destination.queue.put(None)
            await asyncio.gather(*writers)
            complete = True
        finally:
            await pool.cancel()
            for task in writers:
                task.cancel()
            await asyncio.gather(*writers, return_exceptions=True)
            for destination in self.destinations:
                await _drop_queued(destination.queue)
            await asyncio.gather(*(self._close(destination, complete) for destination in self.destinations))
        broken = [d for d in self.destinations if d.broken is not None]
        if broken:
            raise TransferError("; ".join(f"{d.location.text}: {d.broken}" for d in broken))

    async def _start(self, destination: Destination, expected: int | None) -> None:
        """Open a target's checkpoint and the target; a target that cannot start is broken."""
        try:
            await destination.checkpoint.open()
            destination.started = True
            self._resuming(destination.tally, destination.checkpoint)
            await destination.target.start(expected)
        except TransferError as error:
            self._break(destination, error)
        except (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            self._break(destination, TransferError(describe(error)))

    def _break(self, destination: Destination, error: TransferError) -> None:
        if destination.broken is None:
            destination.broken = error
            destination.tally.errors.append(f"{destination.location.text}: {error}")
            destination.tally.error_count += 1
            if self._report is not None and len(self.locations) > 1:
                self._report(f"{destination.location.text}: {error}; the other targets go on")

    async def _close(self, destination: Destination, complete: bool) -> None:
        complete = complete and destination.broken is None
        try:
            await destination.target.close(complete)
        except Exception as error:  # noqa: BLE001 - one target's failure must not stop the others
            self._break(destination, TransferError(describe(error)))
            complete = False
        finally:
            if destination.started:
                await self._finish(destination.tally, destination.checkpoint, complete)

    async def _route_all(self, pool: _Pool) -> None:
        seen: set[Digest] = set()
        destinations = self.destinations
        async for word in self._hashes():
            if all(destination.broken is not None for destination in destinations):
                break
            try:
                digest = Digest.parse(word)
            except BadDigest:
                for destination in destinations:
                    self._fail(destination.tally, "failed", word[:80], "not a digest")
                continue
            if digest in seen:
                for destination in destinations:
                    destination.tally.finished("skipped")  # listed twice
                continue
            seen.add(digest)
            wanting = [destination for destination in destinations if destination.wants(digest)]
            if wanting:
                await pool.submit(self._route, digest, wanting)
        await pool.drain()

    async def _route(self, digest: Digest, wanting: list[Destination]) -> None:
        """Ask each target whether it has the blob; read it once for those that lack it."""
        needed = [d for d in await asyncio.gather(*(self._lacks(d, digest) for d in wanting)) if d is not None]
        if len(needed) == 1:
            await needed[0].queue.put(_Work(digest, None))  # its writer reads it, as it arrives
            return
        if not needed:
            return
        try:
            held = await self._hold(digest)
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            kind, message = _item_failure(error)
            for destination in needed:
                self._fail(destination.tally, kind, digest, message)
            return
        try:
            for destination in needed:
                await destination.queue.put(_Work(digest, held.acquire()))
        finally:
            await held.release()

    async def _lacks(self, destination: Destination, digest: Digest) -> Destination | None:
        try:
            if not await destination.target.has(digest):
                return destination
        except TransferError as error:
            self._break(destination, error)
            return None
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            self._fail(destination.tally, "failed", digest, describe(error))
            return None
        destination.checkpoint.finish(digest, 0, "skipped")
        destination.tally.finished("skipped")
        return None

    async def _hold(self, digest: Digest) -> Shared:
        """The blob read once through the store and verified whole, for several targets. Bytes
        in memory beyond the memory budget go to a file, to wait there for a slow target."""
        opened = await self.store.open(digest, cache=False)
        try:
            blob = await opened.verified()
        finally:
            await opened.close()
        size = blob.size
        if size is None:  # not a verified Bytes/FileBlob: never the case, but never guessed at
            await blob.close()
            raise UpstreamFailed(f"{opened.tier} does not know the size of {digest}")
        if isinstance(blob, FileBlob):
            return Shared(blob, size)
        if self._held_budget.take(size):
            return Shared(blob, size, self._held_budget)
        spool = Spool(digest, self.store.spool_dir, memory_limit=0)
        try:
            async for chunk in blob.chunks():
                await spool.write(chunk)
            await spool.finish()
            return Shared(spool.blob(), size)
        finally:
            spool.release()  # the blob's own handle keeps the file readable
            await blob.close()

    async def _writer(self, destination: Destination) -> None:
        """Write what the queue brings until told to stop; a broken target only drains it."""
        while (work := await destination.queue.get()) is not None:
            try:
                if destination.broken is None:
                    await self._write_one(destination, work)
            except TransferError as error:
                self._break(destination, error)
            finally:
                if work.held is not None:
                    await work.held.release()

    async def _count_hashes(self) -> int | None:
        """The number of hashes, when it can be known before reading them (not from stdin)."""
        spec = self.spec
        if spec.hashes:
            return len(spec.hashes)
        if spec.hashes_file not in (None, "-"):
            assert spec.hashes_file is not None
            return await self._run(_count_lines, spec.hashes_file)
        return None

    async def _hashes(self) -> AsyncIterator[str]:
        spec = self.spec
        if spec.hashes:
            for token in spec.hashes:
                yield token
            return
        assert spec.hashes_file is not None
        stdin = spec.hashes_file == "-"
        file: BinaryIO = (self._stdin or sys.stdin.buffer) if stdin else await self._run(_open_hashes, spec.hashes_file)
        count = 0
        try:
            while lines := await self._run(file.readlines, 1 << 16):
                for line in lines:
                    word = _first_word(line)
                    if word is not None:
                        count += 1
                        yield word
        finally:
            if not stdin:
                file.close()
        for destination in self.destinations:
            destination.tally.total = count

    async def _write_one(self, destination: Destination, work: _Work) -> None:
        digest, tally = work.digest, destination.tally
        try:
            size = await self._export_blob(destination, work)
        except TransferError:
            raise
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            kind, message = _item_failure(error)
            self._fail(tally, kind, digest, message)
        else:
            destination.checkpoint.finish(digest, size, "done")
            tally.finished("done", size)

    async def _export_blob(self, destination: Destination, work: _Work) -> int:
        """Write one blob; once more if its copy went bad mid-way (the store moves on to the
        next tier that has it)."""
        target, tally = destination.target, destination.tally
        for attempt in (1, 2):
            if work.held is not None:
                blob: StoreBlob | Shared = work.held
            else:
                blob = await StoreBlob.open(self.store, work.digest, whole=target.verified_first)
            meter = tally.meter(blob.size)
            try:
                await target.write(work.digest, blob, destination.checkpoint, meter)
                return blob.size
            except (CorruptBlob, UpstreamFailed) as error:
                if attempt == 2 or work.held is not None:
                    raise
                log.warning("%s: %s; reading it again", work.digest, describe(error))
            finally:
                tally.release(meter)
                if isinstance(blob, StoreBlob):
                    await blob.close()
        raise AssertionError("unreachable")

    # -- import --------------------------------------------------------------------------

    def _into_tier(self) -> Tier:
        if not self.into:
            raise UsageError("no tier to import into: name one with --into (no uploads.targets, no writable source)")
        try:
            tier = self.store.tier(self.into)
        except KeyError:
            names = ", ".join(tier.name for tier in self.store.tiers)
            raise UsageError(f"--into {self.into}: no such tier (tiers: {names})") from None
        if not tier.can_store:
            raise UsageError(f"--into {self.into}: a {type(tier).__name__} cannot be written")
        return tier

    def _make_source(self) -> Source:
        location = self.location
        assert self._executor is not None
        if location.kind == "s3":
            client = make_client(location, self.spec.endpoint_url, self.store.tiers, self.spec.jobs * 2 + 4)
            return BucketSource(location, client, self._executor)
        if location.kind == "folder":
            return FolderSource(location, self._executor)
        return TarSource(location, (self._stdin or sys.stdin.buffer) if location.kind == "stream" else None)

    async def _import(self) -> None:
        tier = self._into_tier()
        source = self._make_source()
        checkpoint = self._checkpoint(self.location, tier.name)
        await checkpoint.open()
        self._resuming(self.tally, checkpoint)
        pool = _Pool(self.spec.jobs)
        budget = MemoryBudget(self.spec.memory)
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
                    self._fail(self.tally, "ignored", entry.name, "not a digest; not imported")
                    continue
                recorded = checkpoint.finished.get(entry.name)
                if recorded is not None:
                    self.tally.finished(recorded[1], recorded[0], resumed=True)
                elif source.sequential:
                    await self._import_in_order(entry, digest, tier, checkpoint, pool, budget)
                else:
                    await pool.submit(self._guarded, self._import_one, entry, digest, tier, checkpoint, budget)
            self.tally.total = count
            await pool.drain()
            self._check_fatal()
            complete = True
        finally:
            await pool.cancel()
            try:
                await source.close()
            finally:
                await self._finish(self.tally, checkpoint, complete)

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

    async def _import_one(
        self, entry: Entry, digest: Digest, tier: Tier, checkpoint: Checkpoint, budget: MemoryBudget
    ) -> None:
        if await self._import_skip(entry, digest, tier, checkpoint):
            return
        meter = self.tally.meter(entry.size)
        spool = await self._receive(entry, digest, budget, meter)
        if spool is not None:
            await self._store(entry.name, digest, spool, tier, checkpoint, meter)

    async def _import_in_order(
        self,
        entry: Entry,
        digest: Digest,
        tier: Tier,
        checkpoint: Checkpoint,
        pool: _Pool,
        budget: MemoryBudget,
    ) -> None:
        """An archive member: read it now (the archive moves on after), store it in parallel."""
        if await self._import_skip(entry, digest, tier, checkpoint):
            return
        meter = self.tally.meter(entry.size)
        spool = await self._receive(entry, digest, budget, meter)
        if spool is None:
            return
        try:
            await pool.submit(self._guarded, self._store, entry.name, digest, spool, tier, checkpoint, meter)
        except BaseException:
            spool.release()
            self.tally.release(meter)
            raise

    async def _import_skip(self, entry: Entry, digest: Digest, tier: Tier, checkpoint: Checkpoint) -> bool:
        """True if the tier has the blob already (or asking failed: reported)."""
        try:
            found = await tier.stat(digest)
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            self._fail(self.tally, "failed", entry.name, describe(error))
            return True
        if found is None:
            return False
        checkpoint.finish(entry.name, found.size or 0, "skipped")
        self.tally.finished("skipped")
        return True

    async def _receive(self, entry: Entry, digest: Digest, budget: MemoryBudget, meter: ItemMeter) -> Spool | None:
        """The object's bytes, hashed as they arrive (small in memory, large in a temp file); None
        (reported) if they are not the blob their name says, or could not be read."""
        spool = Spool(digest, self.store.spool_dir, CHUNK_SIZE, budget=budget)
        try:
            async for chunk in entry.chunks():
                await spool.write(chunk)
                meter.moved(len(chunk))
            if entry.size is not None and spool.received != entry.size:
                raise OSError(f"read {spool.received} of {entry.size} bytes")
            await spool.finish()
            return spool
        except CorruptBlob as error:
            self._fail(self.tally, "corrupt", entry.name, f"{error}; not stored")
        except TransferError:
            raise
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            _log_unexpected(error)
            self._fail(self.tally, "failed", entry.name, describe(error))
        finally:
            if not spool.verified:
                spool.release()
                self.tally.release(meter)
        return None

    async def _store(
        self, name: str, digest: Digest, spool: Spool, tier: Tier, checkpoint: Checkpoint, meter: ItemMeter
    ) -> None:
        try:
            await self.store.put(digest, spool, [tier])  # also forgets any "found nowhere"
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            _log_unexpected(error)
            self._fail(self.tally, "failed", name, f"cannot store in {tier.name}: {describe(error)}")
            return
        finally:
            spool.release()
            self.tally.release(meter)
        checkpoint.finish(name, spool.size, "done")
        self.tally.finished("done", spool.size)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await run_on(self._executor, fn, *args)


class StoreBlob:
    """A blob read through the store for export, with its size known before the first byte.

    A trusted hit (the disk cache) is read as it is. A fill is followed as it arrives (the
    store holds its last byte back until the whole copy is verified), or, with ``whole``, waited
    for until verified, for targets that cannot take back what they wrote. Read without filling
    the caches: an export passes over every blob once and must not push the hot ones out of
    the disk cache (SPEC 7)."""

    def __init__(self, opened: Opened, size: int, whole: Blob | None = None) -> None:
        self.opened = opened
        self.size = size
        self._whole = whole  # the verified blob, when waited for

    @classmethod
    async def open(cls, store: Composite, digest: Digest, *, whole: bool) -> StoreBlob:
        opened = await store.open(digest, cache=False)
        try:
            if not whole and opened.size is not None:
                return cls(opened, opened.size)
            blob = await opened.verified()
            if blob.size is None:
                await blob.close()
                raise UpstreamFailed(f"{opened.tier} does not know the size of {digest}")
            return cls(opened, blob.size, blob)
        except BaseException:
            await opened.close()
            raise

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._whole.chunks() if self._whole is not None else self.opened.chunks():
                yield chunk
        except UpstreamFailed as error:
            if _caused_by(error, CorruptBlob):
                raise CorruptBlob(error.detail) from error
            raise

    async def close(self) -> None:
        if self._whole is not None:
            await self._whole.close()
            self._whole = None
        await self.opened.close()


def _item_failure(error: Exception) -> tuple[str, str]:
    """How one blob's failure is counted and said."""
    if isinstance(error, NotFound):
        return "failed", "found in no tier"
    if isinstance(error, CorruptBlob):
        return "corrupt", f"{error}; not exported"
    _log_unexpected(error)
    return "failed", describe(error)


async def _drop_queued(queue: asyncio.Queue[_Work | None]) -> None:
    """Let go of the copies still waiting for a target that stopped."""
    while not queue.empty():
        work = queue.get_nowait()
        if work is not None and work.held is not None:
            await work.held.release()


class _Pool:
    """At most ``size`` tasks at once; ``submit`` waits for a free place."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        # The coroutine is made only once there is a place: a cancelled wait leaves none unawaited.
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("transfer task failed", exc_info=task.exception())

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def describe(error: BaseException) -> str:
    """One line for a failed item."""
    if isinstance(error, ProxyError):
        return error.detail
    if isinstance(error, botocore.exceptions.ClientError):
        message = error.response.get("Error", {}).get("Message", "")
        return f"S3 {error_code(error)}" + (f": {message}" if message else "")
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error) or type(error).__name__


_EXPECTED = (
    ProxyError,
    TierError,
    OSError,
    TimeoutError,
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
)


def _log_unexpected(error: Exception) -> None:
    if not isinstance(error, _EXPECTED):
        log.error("unexpected error in a transfer", exc_info=error)


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_word(line: bytes | str) -> str | None:
    """The digest on a line of a hashes file: the first word (``sha1sum`` output works);
    blank lines and # comments are not items."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    words = text.split(None, 1)
    if not words or words[0].startswith("#"):
        return None
    return words[0]


def _open_hashes(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not a file of hashes") from None


def _count_lines(path: str) -> int:
    count = 0
    with _open_hashes(path) as file:
        for line in file:
            if _first_word(line) is not None:
                count += 1
    return count


__all__ = [
    "Destination",
    "Location",
    "Shared",
    "Snapshot",
    "StoreBlob",
    "Transfer",
    "TransferSpec",
    "default_into",
    "describe",
]
