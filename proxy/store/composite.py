"""The domain: an ordered list of tiers that behaves like one verified blob store.

    store = Composite()
    store.append_cache(DiskTier("./cache"))
    store.append_source(S3Tier("s3://bucket/prefix/"))
    data = await store.get(digest)

A lookup walks the tiers in order. Trusted tiers at the head of the list (the disk cache, which
holds only bytes it verified itself) answer hits directly. Everything else goes through a
``Fill``: one task per digest, shared by every request for it, that streams a tier's copy into a
Spool while hashing it, skips copies that do not verify, and writes the good one into the cache
tiers before the one that had it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from proxy import metrics
from proxy.digest import Digest
from proxy.errors import ConfigError, CorruptBlob, NotFound, TierError, UpstreamFailed
from proxy.store.breaker import Breaker
from proxy.store.fill_locks import FillLocks
from proxy.store.negative import NegativeCache
from proxy.store.spool import MemoryBudget, Spool, SpoolFailed
from proxy.tier import Blob, BytesBlob, FileBlob, Payload, Stat, Tier
from proxy.tiers.api import APIOrigin, ApiTier

log = logging.getLogger(__name__)
SPOOL_MEMORY_ITEM = 16 << 20  # a larger blob is spooled to a file even when memory is free


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    corrupt: int = 0
    bytes: int = 0
    cache_writes: int = 0
    cache_write_errors: int = 0


@dataclass
class Opened:
    """The answer to ``open``: a verified blob ready to send, or a fill still arriving.
    Close it when done: it holds a file, a connection or a place in the fill."""

    digest: Digest
    tier: str
    hit: bool  # from a cache tier (X-Cache: HIT) rather than fetched from a source
    blob: Blob | None = None
    fill: Fill | None = None

    @property
    def size(self) -> int | None:
        if self.blob is not None:
            return self.blob.size
        assert self.fill is not None
        return self.fill.expected_size

    async def close(self) -> None:
        if self.blob is not None:
            await self.blob.close()
        if self.fill is not None:
            self.fill.detach()
            self.fill = None


@dataclass(eq=False)
class Fill:
    """One walk over the tiers for one digest, shared by every request that wants it.

    The fill holds a reference on the copy arriving now, and on the verified one until the
    last attached request detaches, so a request can always pick up the copy it waited for.
    """

    digest: Digest
    spool: Spool | None = None  # the copy now arriving (replaced if it fails to verify)
    tier: Tier | None = None
    expected_size: int | None = None
    attached: int = 0
    finished: bool = False
    result: asyncio.Future[Spool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: asyncio.Event = field(default_factory=asyncio.Event)

    def attach(self) -> None:
        self.attached += 1

    def detach(self) -> None:
        self.attached -= 1
        self._release_if_unused()

    def finish(self) -> None:
        self.finished = True
        self.started.set()
        self._release_if_unused()

    def _release_if_unused(self) -> None:
        if self.finished and self.attached == 0 and self.spool is not None:
            spool, self.spool = self.spool, None
            spool.release()

    async def verified(self) -> Spool:
        """The verified copy, with a reference the caller must release; raises NotFound or
        UpstreamFailed when no tier had a good copy. Only for attached callers."""
        spool = await asyncio.shield(self.result)
        return spool.acquire()


class Composite:
    """An ordered list of tiers behaving as one store; the library API of casproxy."""

    def __init__(
        self,
        tiers: Iterable[Tier] = (),
        *,
        negative_cache: NegativeCache | None = None,
        spool_dir: str | None = None,
        spool_memory: int = 256 << 20,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 30.0,
    ) -> None:
        self.tiers: list[Tier] = []
        self._trusted: list[Tier] | None = None  # the trusted tiers at the head, computed once
        self.stats: dict[str, TierStats] = {}
        self._meters: dict[str, tuple[Any, Any, Any]] = {}  # hits, bytes, misses per tier
        self.breakers: dict[str, Breaker] = {}
        self.negative = negative_cache or NegativeCache()
        self.coalesced = 0
        self._spool_dir = spool_dir
        self._fill_locks: FillLocks | None = None  # from the first disk cache: see proxy.store.fill_locks
        self._spool_budget = MemoryBudget(spool_memory)
        self._breaker = (breaker_threshold, breaker_cooldown)
        self._fills: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        for tier in tiers:
            self.append(tier)

    # -- composition ---------------------------------------------------------------------

    def append(self, tier: Tier | APIOrigin) -> Tier:
        if isinstance(tier, APIOrigin):
            tier = ApiTier(tier)
        if tier.name in self.stats:
            raise ValueError(f"two tiers are named {tier.name!r}")
        self.tiers.append(tier)
        self._trusted = None
        self.stats[tier.name] = TierStats()
        # Prometheus children resolved once: labels() on every hit is a lock and a dict lookup.
        self._meters[tier.name] = (
            metrics.LOOKUPS.labels(tier.name, "hit"),
            metrics.TIER_BYTES.labels(tier.name),
            metrics.LOOKUPS.labels(tier.name, "miss"),
        )
        self.breakers[tier.name] = Breaker(*self._breaker)
        if self._spool_dir is None:
            self._spool_dir = getattr(tier, "spool_dir", None)
        lock_path = getattr(tier, "fill_lock_path", None)
        if self._fill_locks is None and lock_path is not None:
            self._fill_locks = FillLocks(lock_path)
        return tier

    def append_source(self, tier: Tier | APIOrigin) -> Tier:
        tier = self.append(tier)
        tier.role = "source"
        return tier

    def append_cache(self, tier: Tier) -> Tier:
        tier = self.append(tier)
        tier.role = "cache"
        return tier

    @property
    def spool_dir(self) -> str | None:
        return self._spool_dir

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self._started:
                for tier in self.tiers:
                    await self._start_tier(tier)
                self._started = True

    async def _start_tier(self, tier: Tier) -> None:
        """A tier that cannot start yet (a store that is down) fails its calls until it can;
        only a configuration mistake stops the whole store from starting."""
        try:
            await tier.start()
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - the tier reports itself failing on use
            self._breaker_failed(tier)
            log.error("tier %s could not start: %r", tier.name, error)

    async def wait_idle(self) -> None:
        """Wait until every fill in flight has finished writing the caches."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for tier in self.tiers:
            with contextlib.suppress(Exception):
                await tier.close()
        await self.negative.close()
        if self._fill_locks is not None:
            self._fill_locks.close()
        self._started = False

    async def __aenter__(self) -> Composite:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading -------------------------------------------------------------------------

    async def get(self, digest: str) -> bytes:
        """The whole blob, verified; raises NotFound or UpstreamFailed."""
        opened = await self.open(digest)
        try:
            if opened.blob is not None:
                return await opened.blob.read()
            assert opened.fill is not None
            return await read_spool(await opened.fill.verified())
        finally:
            await opened.close()

    async def stream(self, digest: str) -> AsyncIterator[bytes]:
        """The blob in chunks, in bounded memory. A copy that fails verification raises
        CorruptBlob or UpstreamFailed at the end: discard what was received."""
        opened = await self.open(digest)
        try:
            chunks = opened.blob.chunks() if opened.blob is not None else None
            if chunks is None:
                assert opened.fill is not None
                chunks = self.follow(opened.fill)
            async for chunk in chunks:
                yield chunk
        finally:
            await opened.close()

    async def follow(self, fill: Fill, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Tail the copy a fill is receiving now; raise if it turns out bad."""
        spool = fill.spool
        assert spool is not None, "follow() is for attached requests, which keep the spool"
        spool.acquire()
        try:
            async for chunk in spool.chunks(start, end):
                yield chunk
        except SpoolFailed as error:
            raise UpstreamFailed(f"{fill.tier.name if fill.tier else '?'}: {error}") from error
        finally:
            spool.release()

    async def open(self, digest: str) -> Opened:
        """Find the blob: a verified hit, or a fill (shared with concurrent requests)."""
        digest = Digest.parse(digest)
        if not self._started:
            await self.start()
        hit = await self._open_trusted(digest)
        if hit is not None:
            return hit
        fill = self._fills.get(digest)
        if fill is None and await self._remembered_absent(digest):
            raise NotFound(f"{digest} was found nowhere (remembered for {self.negative.ttl:g}s)")
        fill = fill or self._fills.get(digest)  # another request may have started one meanwhile
        if fill is None:
            fill = self._start_fill(digest)
        else:
            self.coalesced += 1
            metrics.COALESCED.labels("process").inc()
        fill.attach()
        try:
            await fill.started.wait()
            if fill.spool is None:  # the walk ended without a copy: this raises why
                await asyncio.shield(fill.result)
        except _InTrustedTier:
            fill.detach()
            hit = await self._open_trusted(digest)
            if hit is None:
                raise NotFound(f"{digest} was found in no tier") from None
            return hit
        except BaseException:
            fill.detach()
            raise
        assert fill.tier is not None
        return Opened(digest, fill.tier.name, fill.tier.role == "cache", fill=fill)

    async def stat(self, digest: str) -> tuple[Tier, Stat]:
        """The cheap existence check (HEAD): which tier has it and, if known, its size."""
        digest = Digest.parse(digest)
        if not self._started:
            await self.start()
        trusted = self._trusted_head()
        for tier in trusted:
            found = await self._ask(tier, tier.stat(digest))
            if found is not None:
                return tier, found
        if digest not in self._fills and await self._remembered_absent(digest):
            raise NotFound(f"{digest} was found nowhere (remembered for {self.negative.ttl:g}s)")
        began = self.negative.now()
        errors: list[str] = []
        for tier in self.tiers[len(trusted) :]:
            try:
                found = await self._ask(tier, tier.stat(digest), errors)
            except _Skipped:
                continue
            if found is not None:
                return tier, found
        await self._nothing_found(digest, errors, began)
        raise AssertionError("unreachable")

    async def contains(self, digest: str) -> bool:
        try:
            await self.stat(digest)
        except NotFound:
            return False
        return True

    async def delete(self, digest: str) -> list[str]:
        """Remove the blob from every cache tier (sources keep it); the tiers it was in."""
        digest = Digest.parse(digest)
        removed = []
        for tier in self.tiers:
            if tier.role == "cache" and await tier.delete(digest):
                removed.append(tier.name)
        return removed

    # -- the walk ------------------------------------------------------------------------

    def _trusted_head(self) -> list[Tier]:
        if self._trusted is None:
            self._trusted = []
            for tier in self.tiers:
                if not tier.trusted:
                    break
                self._trusted.append(tier)
        return self._trusted

    def peek(self, digest: Digest) -> tuple[Tier, bytes] | None:
        """A verified hit held in process memory, counted as a hit; None otherwise. The hot path:
        no await, no timer, no breaker (a trusted local tier's memory cannot hang)."""
        for tier in self._trusted_head():
            blob = tier.peek(digest)
            if isinstance(blob, BytesBlob):
                self._count_hit(tier, len(blob.data))
                return tier, blob.data
        return None

    async def _open_trusted(self, digest: Digest) -> Opened | None:
        trusted = self._trusted_head()
        for tier in trusted:  # the hot path: no awaits, no timers
            blob = tier.peek(digest)
            if blob is not None:
                self._count_hit(tier, blob.size or 0)
                return Opened(digest, tier.name, tier.role == "cache", blob=blob)
        for tier in trusted:
            try:
                blob = await self._ask(tier, tier.open(digest))
            except _Skipped:
                continue
            if blob is not None:
                self._count_hit(tier, blob.size or 0)
                return Opened(digest, tier.name, tier.role == "cache", blob=blob)
            self._count_miss(tier)
        return None

    async def _ask(self, tier: Tier, call: Any, errors: list[str] | None = None, *, settled: bool = True) -> Any:
        """Await one tier call under its timeout and breaker; failures become _Skipped.
        ``settled=False``: the answer is only the start (a body follows), so it does not yet
        count as a success for the breaker."""
        breaker = self.breakers[tier.name]
        if not breaker.allow():
            call.close()
            if errors is not None:
                errors.append(f"{tier.name}: skipped (circuit open after repeated failures)")
            raise _Skipped
        try:
            async with asyncio.timeout(tier.timeout):
                answer = await call
        except (TierError, OSError, TimeoutError) as error:
            self._tier_failed(tier, error, errors)
            raise _Skipped from error
        if settled:
            self._breaker_succeeded(tier)
        return answer

    def _tier_failed(self, tier: Tier, error: BaseException, errors: list[str] | None) -> None:
        text = str(error) or type(error).__name__
        if isinstance(error, TimeoutError):
            text = f"no answer within {tier.timeout:g}s"
        if not text.startswith(tier.name):
            text = f"{tier.name}: {text}"
        self._breaker_failed(tier)
        if isinstance(error, CorruptBlob):
            self.stats[tier.name].corrupt += 1
            metrics.LOOKUPS.labels(tier.name, "corrupt").inc()
            log.error("corrupt copy skipped: %s", text)
        else:
            self.stats[tier.name].errors += 1
            metrics.LOOKUPS.labels(tier.name, "error").inc()
            log.warning("tier failed: %s", text)
        if errors is not None:
            errors.append(text)

    async def _nothing_found(self, digest: Digest, errors: list[str], began: int) -> None:
        if errors:
            raise UpstreamFailed(f"{digest} not found; failing tiers: " + "; ".join(errors))
        await self.negative.add(digest, began)
        raise NotFound(f"{digest} was found in no tier")

    def _start_fill(self, digest: Digest) -> Fill:
        fill = Fill(digest)
        self._fills[digest] = fill
        # The fill is its own task: a client that disconnects does not cancel it.
        task = asyncio.get_running_loop().create_task(self._run_fill(fill), name=f"fill-{digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def _run_fill(self, fill: Fill) -> None:
        digest = fill.digest
        trusted = self._trusted_head()
        began = self.negative.now()
        errors: list[str] = []
        try:
            async with self._exclusive(digest) as waited:
                # A fill that finished just before this one (here or in another process that
                # shares the disk cache) may have cached it already.
                for tier in trusted:
                    with contextlib.suppress(_Skipped):
                        if await self._ask(tier, tier.stat(digest)) is not None:
                            fill.result.set_exception(_InTrustedTier())
                            return
                if waited and await self._remembered_absent(digest):
                    raise NotFound(f"{digest} was found nowhere (remembered for {self.negative.ttl:g}s)")
                for index in range(len(trusted), len(self.tiers)):
                    tier = self.tiers[index]
                    spool = await self._fetch_from(fill, tier, errors)
                    if spool is not None:
                        fill.result.set_result(spool)
                        await self._fill_caches(digest, spool, self.tiers[:index])
                        return
                await self._nothing_found(digest, errors, began)
        except BaseException as error:
            if not fill.result.done():
                fill.result.set_exception(error)
            fill.result.exception()  # mark retrieved: nobody may be waiting
            if not isinstance(error, Exception):
                raise
        finally:
            if self._fills.get(digest) is fill:
                del self._fills[digest]
            fill.finish()

    @contextlib.asynccontextmanager
    async def _exclusive(self, digest: Digest) -> AsyncIterator[bool]:
        """One fill per digest across the processes sharing the disk cache; yields True if
        this one waited for another process's fill (which has cached the blob, or failed)."""
        if self._fill_locks is None or not self._trusted_head():
            yield False
            return
        async with self._fill_locks.hold(digest) as waited:
            if waited:
                metrics.COALESCED.labels("workers").inc()
            yield waited

    async def _remembered_absent(self, digest: Digest) -> bool:
        if await self.negative.contains(digest):
            metrics.NEGATIVE_HITS.inc()
            return True
        return False

    def _count_hit(self, tier: Tier, size: int) -> None:
        stats = self.stats[tier.name]
        stats.hits += 1
        stats.bytes += size
        hits, moved, _ = self._meters[tier.name]
        hits.inc()
        moved.inc(size)

    def _count_miss(self, tier: Tier) -> None:
        self.stats[tier.name].misses += 1
        self._meters[tier.name][2].inc()

    def _breaker_failed(self, tier: Tier) -> None:
        breaker = self.breakers[tier.name]
        breaker.failed()
        if breaker.state != "closed":
            metrics.BREAKER_STATE.labels(tier.name).set(1)

    def _breaker_succeeded(self, tier: Tier) -> None:
        breaker = self.breakers[tier.name]
        if breaker.state != "closed":
            metrics.BREAKER_STATE.labels(tier.name).set(0)
        breaker.succeeded()

    async def _fetch_from(self, fill: Fill, tier: Tier, errors: list[str]) -> Spool | None:
        """Stream one tier's copy into a new spool; the spool if it verified, else None."""
        try:
            # A tier that sends headers and then corrupt or cut-off bodies must still trip.
            blob = await self._ask(tier, tier.open(fill.digest), errors, settled=False)
        except _Skipped:
            return None
        if blob is None:
            self._breaker_succeeded(tier)
            self._count_miss(tier)
            return None
        if fill.spool is not None:
            fill.spool.release()
        spool = Spool(fill.digest, self._spool_dir, SPOOL_MEMORY_ITEM, budget=self._spool_budget)
        fill.spool, fill.tier, fill.expected_size = spool, tier, blob.size
        fill.started.set()
        try:
            async for chunk in _read_ahead(blob.chunks(), tier.timeout):
                await spool.write(chunk)
            if blob.size is not None and spool.received != blob.size:
                raise TierError(f"{tier.name}: sent {spool.received} of {blob.size} bytes")
            await spool.finish()
        except (TierError, OSError, TimeoutError) as error:
            spool.fail(error)
            self._tier_failed(tier, error, errors)
            return None
        except BaseException as error:
            spool.fail(error)
            raise
        finally:
            with contextlib.suppress(Exception):
                await blob.close()
        self._breaker_succeeded(tier)
        self._count_hit(tier, spool.size)
        return spool

    async def _fill_caches(self, digest: Digest, spool: Spool, before: list[Tier]) -> None:
        """Copy a verified blob into the cache tiers before the one that had it. A failure
        here is logged and counted, never passed on: the client already has good bytes."""
        for tier in before:
            if tier.role != "cache":
                continue
            stats = self.stats[tier.name]
            try:
                await tier.put(digest, spool)
                stats.cache_writes += 1
                metrics.CACHE_WRITES.labels(tier.name, "ok").inc()
            except Exception as error:  # noqa: BLE001 - a cache write must never fail the request
                stats.cache_write_errors += 1
                metrics.CACHE_WRITES.labels(tier.name, "error").inc()
                log.warning("could not cache %s in %s: %r", digest, tier.name, error)

    async def put(self, digest: str, payload: Payload, targets: Iterable[Tier]) -> None:
        """Store a verified blob in the given tiers, and forget any "found nowhere"."""
        digest = Digest.parse(digest)
        for tier in targets:
            await tier.put(digest, payload)
        await self.negative.discard(digest)

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "tiers": {
                tier.name: {
                    "kind": type(tier).__name__,
                    "role": tier.role,
                    "breaker": self.breakers[tier.name].state,
                    **vars(self.stats[tier.name]),
                    **tier.describe(),
                }
                for tier in self.tiers
            },
            "in_flight": len(self._fills),
            "coalesced": self.coalesced,
            "negative_cache": {"url": self.negative.url, "hits": self.negative.hits},
            "time": time.time(),
        }


async def _read_ahead(chunks: AsyncIterator[bytes], idle: float) -> AsyncIterator[bytes]:
    """Fetch the next chunk while the caller hashes and stores this one. Each chunk must come
    within ``idle`` seconds: a stalled upstream costs at most that."""
    source = aiter(chunks)

    async def next_chunk() -> bytes | None:
        async with asyncio.timeout(idle):
            return await anext(source, None)

    pending = asyncio.ensure_future(next_chunk())
    try:
        while (chunk := await pending) is not None:
            pending = asyncio.ensure_future(next_chunk())
            yield chunk
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending


class _Skipped(Exception):
    """A tier call failed or was skipped by its breaker; the walk goes on."""


class _InTrustedTier(Exception):
    """The fill found the blob already in a trusted cache tier; read it from there."""


async def read_spool(spool: Spool) -> bytes:
    """All of a verified spool's bytes; releases the caller's reference."""
    try:
        if spool.data is not None:
            return spool.data
        file = spool.open()
        assert file is not None
        return await FileBlob(file, spool.size).read()
    finally:
        spool.release()
