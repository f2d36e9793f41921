"""Running an export or an import against a Composite.

    transfer = Transfer(TransferSpec("export", target="s3://bucket/blobs/", hashes=(...)), store)
    task = asyncio.create_task(transfer.run())
    transfer.snapshot()          # progress, at any time
    task.cancel()                # pause: the checkpoint keeps what is done
    await Transfer(same_spec, store).run()   # resume: does only what is left

Export reads every blob through the store (so every byte is verified, and a blob found in a
source also lands in the caches before it) and writes it to the target; import verifies each
object of the source against the digest in its name and stores the good ones in one tier. Up to
``jobs`` items are in flight at once, blob bytes in memory are bounded by ``memory``; a failing
item is reported and the run goes on; only a broken target (TransferError) stops it.
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
from typing import Any, BinaryIO, TypeVar

import botocore.exceptions

from proxy.config import Config
from proxy.digest import Digest
from proxy.errors import BadDigest, CorruptBlob, NotFound, ProxyError, TierError, UpstreamFailed
from proxy.policy import default_targets, state_dir
from proxy.store.composite import Composite
from proxy.store.opened import Opened
from proxy.store.spool import MemoryBudget, Spool
from proxy.tier import CHUNK_SIZE, Blob, Tier
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
from proxy.transfer.tally import ItemMeter, Snapshot, Tally
from proxy.transfer.tarball import TarSource, TarTarget

log = logging.getLogger(__name__)
T = TypeVar("T")
PREFETCH = 100_000  # source entries listed ahead, so the total is known early for most sources


def default_into(config: Config, store: Composite) -> str | None:
    """The tier an import writes to by default: the first upload target."""
    if config.uploads.targets:
        return config.uploads.targets[0]
    targets = default_targets(store.tiers)
    return targets[0].name if targets else None


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
        self.location = parse_location(spec.location)
        self.into = spec.into or default_into
        self.state = "pending"
        self.tally = Tally(spec.kind)
        self.checkpoint_path: str | None = None
        self._state_dir = state_dir
        self._stdin = stdin
        self._stdout = stdout
        self._report = report
        self._fatal: TransferError | None = None
        self._executor: ThreadPoolExecutor | None = None

    def snapshot(self) -> Snapshot:
        return self.tally.snapshot(self.state)

    async def run(self) -> Snapshot:
        """Run to the end; the final snapshot. Raises UsageError/TransferError if the transfer
        cannot start or its target breaks, and CancelledError (after saving the checkpoint)
        when cancelled."""
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
            self._executor.shutdown(wait=False)
        snapshot = self.tally.snapshot("done")
        self.state = "done" if snapshot.ok else "failed"
        return self.snapshot()

    # -- shared --------------------------------------------------------------------------

    def _checkpoint(self, into: str | None = None) -> Checkpoint:
        identity = {"kind": self.spec.kind, "location": self.location.identity, "into": into}
        path = self.spec.checkpoint
        if path is None and self.location.resumable:
            name = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
            folder = self._state_dir or state_dir(self.store.tiers)
            path = os.path.join(folder, "transfers", f"{self.spec.kind}-{name}.sqlite")
        self.checkpoint_path = path
        return Checkpoint(path, identity)

    def _fail(self, kind: str, name: str, message: str) -> None:
        line = f"{name}: {message}"
        self.tally.error(kind, line)
        if self._report is not None:
            self._report(line)

    async def _finish(self, checkpoint: Checkpoint, complete: bool) -> None:
        if complete and self.tally.failed == 0 and self.tally.corrupt == 0:
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

    def _make_target(self) -> Target:
        location, spec = self.location, self.spec
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
                budget=ByteBudget(spec.memory),
            )
        if location.kind == "folder":
            return FolderTarget(location, self._executor)
        return TarTarget(location, self._stdout or sys.stdout.buffer)

    async def _export(self) -> None:
        target = self._make_target()
        checkpoint = self._checkpoint()
        await checkpoint.open()
        pool = _Pool(self.spec.jobs)
        complete = False
        try:
            await target.start(await self._count_hashes())
            seen: set[Digest] = set()
            async for word in self._hashes():
                if self._fatal is not None:
                    break
                try:
                    digest = Digest.parse(word)
                except BadDigest:
                    self._fail("failed", word[:80], "not a digest")
                    continue
                if digest in seen:
                    self.tally.finished("skipped")  # listed twice
                    continue
                seen.add(digest)
                recorded = checkpoint.finished.get(digest)
                if recorded is not None:
                    self.tally.finished(recorded[1], recorded[0], resumed=True)
                    continue
                await pool.submit(self._guarded, self._export_one, digest, target, checkpoint)
            await pool.drain()
            self._check_fatal()
            complete = True
        finally:
            await pool.cancel()
            try:
                await target.close(complete)
            finally:
                await self._finish(checkpoint, complete)

    async def _count_hashes(self) -> int | None:
        """The number of hashes, when it can be known before reading them (not from stdin)."""
        spec = self.spec
        if spec.hashes:
            self.tally.total = len(spec.hashes)
        elif spec.hashes_file not in (None, "-"):
            assert spec.hashes_file is not None
            self.tally.total = await self._run(_count_lines, spec.hashes_file)
        return self.tally.total

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
        self.tally.total = count

    async def _export_one(self, digest: Digest, target: Target, checkpoint: Checkpoint) -> None:
        try:
            if await target.has(digest):
                checkpoint.finish(digest, 0, "skipped")
                self.tally.finished("skipped")
                return
            size = await self._export_blob(digest, target, checkpoint)
        except NotFound:
            self._fail("failed", digest, "found in no tier")
        except CorruptBlob as error:
            self._fail("corrupt", digest, f"{error}; not exported")
        except TransferError:
            raise
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            _log_unexpected(error)
            self._fail("failed", digest, describe(error))
        else:
            checkpoint.finish(digest, size, "done")
            self.tally.finished("done", size)

    async def _export_blob(self, digest: Digest, target: Target, checkpoint: Checkpoint) -> int:
        """Write one blob; once more if its copy went bad mid-way (the store moves on to the
        next tier that has it)."""
        for attempt in (1, 2):
            blob = await StoreBlob.open(self.store, digest, whole=target.verified_first)
            meter = self.tally.meter(blob.size)
            try:
                await target.write(digest, blob, checkpoint, meter)
                return blob.size
            except (CorruptBlob, UpstreamFailed) as error:
                if attempt == 2:
                    raise
                log.warning("%s: %s; reading it again", digest, describe(error))
            finally:
                self.tally.release(meter)
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
        if type(tier).put is Tier.put:
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
        checkpoint = self._checkpoint(tier.name)
        await checkpoint.open()
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
                    self._fail("ignored", entry.name, "not a digest; not imported")
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
                await self._finish(checkpoint, complete)

    async def _prefetch(self, entries: AsyncIterator[Entry]) -> AsyncIterator[Entry]:
        """List ahead of the transfers (up to PREFETCH entries): the total is known as soon as
        the listing ends, not when the last item is started."""
        queue: asyncio.Queue[Entry | None] = asyncio.Queue(PREFETCH)
        count = 0

        async def lister() -> None:
            nonlocal count
            async for entry in entries:
                count += 1
                await queue.put(entry)
            self.tally.total = count
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
            self._fail("failed", entry.name, describe(error))
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
            self._fail("corrupt", entry.name, f"{error}; not stored")
        except TransferError:
            raise
        except Exception as error:  # noqa: BLE001 - one item's failure is reported, the run goes on
            _log_unexpected(error)
            self._fail("failed", entry.name, describe(error))
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
            self._fail("failed", name, f"cannot store in {tier.name}: {describe(error)}")
            return
        finally:
            spool.release()
            self.tally.release(meter)
        checkpoint.finish(name, spool.size, "done")
        self.tally.finished("done", spool.size)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class StoreBlob:
    """A blob read through the store for export, with its size known before the first byte.

    A trusted hit (the disk cache) is read as it is. A fill is followed as it arrives (the
    store holds its last byte back until the whole copy is verified), or, with ``whole``, waited
    for until verified, for targets that cannot take back what they wrote."""

    def __init__(self, opened: Opened, size: int, whole: Blob | None = None) -> None:
        self.opened = opened
        self.size = size
        self._whole = whole  # the verified blob, when waited for

    @classmethod
    async def open(cls, store: Composite, digest: Digest, *, whole: bool) -> StoreBlob:
        opened = await store.open(digest)
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


__all__ = ["Location", "Snapshot", "StoreBlob", "Transfer", "TransferSpec", "default_into", "describe"]
