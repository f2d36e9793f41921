"""Fills: one walk over the untrusted tiers per digest, shared by every request that wants it.

A fill is its own task, so a client that disconnects does not cancel it. It streams a tier's copy
into a Spool while hashing it, skips copies that do not verify, and writes the good one into the
cache tiers before the one that had it. Across processes sharing a disk cache, the fill locks
make the others wait for this one and then find the blob cached; across machines sharing a
Redis, a claim (proxy.store.claims) makes the others wait and then read it from a shared cache
tier. So a fleet asks a source once per digest: one claim per machine, one fill per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from proxy import metrics
from proxy.blocking import run
from proxy.digest import Digest
from proxy.errors import CorruptBlob, InsufficientStorage, NotFound, TierError, TooLarge, UpstreamFailed
from proxy.store.claims import Claim, Claims
from proxy.store.fill_locks import FillLocks
from proxy.store.negative import NegativeCache
from proxy.store.pace import paced
from proxy.store.spool import HASH_INLINE_MAX, MemoryBudget, Room, Spool, SpoolFailed, SpoolUnwritable
from proxy.store.walk import Skipped, Walk
from proxy.tier import Tier

log = logging.getLogger(__name__)
SPOOL_MEMORY_ITEM = 1 << 20  # a larger blob is spooled to a file as it arrives: its commit is a link
SPOOL_DIR = "spool"  # in the state folder: temp files next to the cache, so a commit is a hard link
FILL_LOCKS = "fills.lock"  # in the state folder: see proxy.store.fill_locks


class Uncacheable(InsufficientStorage):
    """A tier has the blob but this machine can hold it neither on disk nor in memory: its
    readers get it passed through (``Opened.chunks``), never whole (``Opened.verified``)."""


class InTrustedTier(Exception):
    """The fill found the blob already in a trusted cache tier; read it from there."""


@dataclass(eq=False)
class Fill:
    """One walk for one digest. ``result`` is the verified copy, set once the first cache tier
    has committed it (or failed to). The fill holds a reference on the copy arriving now, and
    on the verified one until the last attached request detaches, so a request can always pick
    up the copy it waited for."""

    digest: Digest
    cache: bool  # write the copy into the cache tiers (any request that joins may ask for it)
    walk: Walk
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

    async def verified_spool(self) -> Spool:
        """The verified copy, with a reference the caller must release; raises NotFound or
        UpstreamFailed when no tier had a good copy. Only for attached callers."""
        spool = await asyncio.shield(self.result)
        return spool.acquire()

    async def follow(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Tail the copy arriving now; raise UpstreamFailed if it turns out bad."""
        spool = self.spool
        assert spool is not None, "follow() is for attached requests, which keep the spool"
        spool.acquire()
        offset = start
        try:
            async for chunk in spool.chunks(start, end):
                offset += len(chunk)
                last = spool.verified and offset >= (spool.size if end is None else min(end, spool.size))
                if last and not self.result.done():
                    # The chunk that ends the answer waits for the first cache's commit (see
                    # Fills._run), so the client's next GET is a hit; a failed commit ends it too.
                    await asyncio.wait([self.result])
                yield chunk
        except SpoolFailed as error:
            if not isinstance(error.__cause__, SpoolUnwritable) or self.tier is None:
                raise UpstreamFailed(f"{self.tier.name if self.tier else '?'}: {error}") from error
            # This machine could not keep the copy (its disk is full): the rest comes straight
            # from the tier, verified, uncached (SPEC 4).
            async for chunk in pass_through(self.walk, self.tier, self.digest, offset, end):
                yield chunk
        finally:
            spool.release()


class Fills:
    """The fills in flight in this process, by digest."""

    def __init__(
        self,
        walk: Walk,
        negative: NegativeCache,
        spool_memory: int,
        max_blob_size: int | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.walk = walk
        self.max_blob_size = max_blob_size
        self.negative = negative
        self.claims = claims
        self.spool_dir: str | None = None
        self.room: Room | None = None  # makes room in spool_dir as a spool grows (its tier's)
        self.locks: FillLocks | None = None
        self.coalesced = 0
        self._budget = MemoryBudget(spool_memory)
        self._fills: dict[Digest, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._fills)

    def use_state_dir(self, tier: Tier) -> None:
        """Spool into, and lock fills through, a tier's private folder (the first one offered);
        the tier makes room there as spools grow (the disk cache evicts)."""
        assert tier.state_dir is not None
        if self.spool_dir is None:
            self.spool_dir = os.path.join(tier.state_dir, SPOOL_DIR, str(os.getpid()))
            self.room = tier.make_room
        if self.locks is None:
            self.locks = FillLocks(os.path.join(tier.state_dir, FILL_LOCKS))

    async def join(self, digest: Digest, *, cache: bool = True) -> Fill:
        """Attach to the digest's fill, started if none runs, once its copy starts arriving.
        Raises NotFound or UpstreamFailed (nothing attached), or InTrustedTier."""
        fill = self._fills.get(digest)
        if fill is None and await self.remembered_absent(digest):
            raise NotFound(f"{digest} was found nowhere (remembered for {self.negative.ttl:g}s)")
        fill = fill or self._fills.get(digest)  # another request may have started one meanwhile
        if fill is None:
            fill = self._start(digest, cache)
        else:
            self.coalesced += 1
            metrics.COALESCED.labels("process").inc()
        fill.cache |= cache
        fill.attach()
        try:
            await fill.started.wait()
            if fill.spool is None:  # the walk ended without a copy: this raises why
                await asyncio.shield(fill.result)
        except BaseException:
            fill.detach()
            raise
        return fill

    def running(self, digest: Digest) -> bool:
        return digest in self._fills

    async def remembered_absent(self, digest: Digest) -> bool:
        if await self.negative.contains(digest):
            metrics.NEGATIVE_HITS.inc()
            return True
        return False

    async def nothing_found(self, digest: Digest, errors: list[str], began: int) -> None:
        """Raise why a walk that began at ``began`` found nothing, remembering a plain miss."""
        if errors:
            raise UpstreamFailed(f"{digest} not found; failing tiers: " + "; ".join(errors))
        await self.negative.add(digest, began)
        raise NotFound(f"{digest} was found in no tier")

    async def wait_idle(self) -> None:
        """Wait until every fill in flight has finished writing the caches."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def settle(self, grace: float) -> None:
        """Let the fills in flight finish for up to ``grace`` seconds, then cancel the rest (a
        stopping server must not wait on a tier that trickles)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.wait_idle()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.settle(0)
        if self.locks is not None:
            self.locks.close()

    def _start(self, digest: Digest, cache: bool) -> Fill:
        fill = Fill(digest, cache, self.walk)
        self._fills[digest] = fill
        # The fill is its own task: a client that disconnects does not cancel it.
        task = asyncio.get_running_loop().create_task(self._run(fill), name=f"fill-{digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill

    async def _run(self, fill: Fill) -> None:
        digest = fill.digest
        tiers = self.walk.tiers
        trusted = self.walk.trusted_head()
        began = self.negative.now()
        errors: list[str] = []
        try:
            async with self._exclusive(digest) as waited:
                # A fill that finished just before this one (here or in another process that
                # shares the disk cache) may have cached it already.
                for tier in trusted:
                    with contextlib.suppress(Skipped):
                        if await self.walk.ask(tier, tier.stat(digest)) is not None:
                            fill.result.set_exception(InTrustedTier())
                            return
                if waited and await self.remembered_absent(digest):
                    raise NotFound(f"{digest} was found nowhere (remembered for {self.negative.ttl:g}s)")
                sources = next((i for i in range(len(trusted), len(tiers)) if tiers[i].role == "source"), len(tiers))
                found = await self._fetch_first(fill, range(len(trusted), sources), errors)
                shared = self._shared(range(len(trusted), sources))
                claim = self._claim(fill, shared) if found is None else None
                try:
                    while found is None and claim is not None:
                        mine = await claim.take()
                        if mine and not claim.held:
                            break  # no claim to be had (Redis unavailable, coalesce.wait spent)
                        # Holding the claim: a fill that ended between our look and our claim
                        # may have filled the shared tiers. Not holding it: another instance's
                        # claim has just ended; it filled them, or failed.
                        found = await self._fetch_first(fill, shared, errors)
                        if mine:
                            break
                        if found is None and await self.remembered_absent(digest):
                            raise NotFound(f"{digest} was found nowhere (remembered for {self.negative.ttl:g}s)")
                    if found is None:
                        found = await self._fetch_first(fill, range(sources, len(tiers)), errors)
                    if found is None:
                        await self.nothing_found(digest, errors, began)
                        return
                    index, spool = found
                    # The first cache commits before any client has the whole blob (the result,
                    # and the last chunk of a stream, wait for it): a GET that follows a
                    # completed one is a hit. All commit before the claim is released: its
                    # waiters read the shared tier.
                    caches = [tier for tier in tiers[:index] if tier.role == "cache"] if fill.cache else []
                    if caches:
                        await self._cache_in(caches[0], digest, spool)
                    fill.result.set_result(spool)
                    for tier in caches[1:]:
                        await self._cache_in(tier, digest, spool)
                finally:
                    if claim is not None:
                        await claim.release()
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
        if self.locks is None or not self.walk.trusted_head():
            yield False
            return
        async with self.locks.hold(digest) as waited:
            if waited:
                metrics.COALESCED.labels("workers").inc()
            yield waited

    def _shared(self, indexes: range) -> list[int]:
        """The cache tiers other instances read and this fill can write: where a claim's
        waiters find what its holder fetched."""
        tiers = self.walk.tiers
        return [i for i in indexes if tiers[i].role == "cache" and tiers[i].shared and tiers[i].can_store]

    def _claim(self, fill: Fill, shared: list[int]) -> Claim | None:
        """A fleet claim for a fill about to ask the sources; None if no other instance could
        read its copy (no coalesce.url, no shared cache tier, or a fill that caches nothing)."""
        if self.claims is None or not fill.cache or not shared:
            return None
        return self.claims.claim(fill.digest)

    async def _fetch_first(self, fill: Fill, indexes: range | list[int], errors: list[str]) -> tuple[int, Spool] | None:
        """The first verified copy among the tiers at ``indexes``, with its tier's index."""
        for index in indexes:
            spool = await self._fetch_from(fill, self.walk.tiers[index], errors)
            if spool is not None:
                return index, spool
        return None

    async def _fetch_from(self, fill: Fill, tier: Tier, errors: list[str]) -> Spool | None:
        """Stream one tier's copy into a new spool; the spool if it verified, else None."""
        try:
            # A tier that sends headers and then corrupt or cut-off bodies must still trip.
            blob = await self.walk.ask(tier, tier.open(fill.digest), errors, settled=False)
        except Skipped:
            return None
        if blob is None:
            self.walk.succeeded(tier)
            self.walk.meters[tier.name].miss()
            return None
        if fill.spool is not None:
            fill.spool.release()
        # A blob known to be larger goes to the file from its first byte, not via memory.
        memory = SPOOL_MEMORY_ITEM if blob.size is None or blob.size <= SPOOL_MEMORY_ITEM else 0
        spool = Spool(
            fill.digest, self.spool_dir, memory, max_size=self.max_blob_size, budget=self._budget, room=self.room
        )
        fill.spool, fill.tier, fill.expected_size = spool, tier, blob.size
        fill.started.set()
        try:
            if blob.size is not None:
                await spool.expect(blob.size)
            async for chunk in paced(blob.chunks(), tier.name, tier.timeout, tier.min_rate):
                await spool.write(chunk)
            if blob.size is not None and spool.received != blob.size:
                raise TierError(f"{tier.name}: sent {spool.received} of {blob.size} bytes")
            await spool.finish()
        except TooLarge:  # an endless upstream, or a bomb decoded from it
            grown = TierError(f"{tier.name}: the blob is larger than server.max_blob_size ({self.max_blob_size} bytes)")
            spool.fail(grown)
            self.walk.failed(tier, grown, errors)
            return None
        except SpoolUnwritable as error:  # this machine's fault: never charged to the tier
            spool.fail(error)
            log.error("could not spool %s from %s, passing it through uncached: %s", fill.digest, tier.name, error)
            # Every later tier would meet the same full disk: the walk ends here.
            raise Uncacheable(f"{fill.digest} cannot be kept here now ({error})") from error
        except Exception as error:  # noqa: BLE001 - anything from a tier is that tier failing
            spool.fail(error)
            if isinstance(error, CorruptBlob):
                self.walk.corrupt.add(tier.name, fill.digest)
            self.walk.failed(tier, error, errors)
            return None
        except BaseException as error:
            spool.fail(error)
            raise
        finally:
            with contextlib.suppress(Exception):
                await blob.close()
        self.walk.succeeded(tier)
        self.walk.meters[tier.name].hit(spool.size)
        return spool

    async def _cache_in(self, tier: Tier, digest: Digest, spool: Spool) -> None:
        """Copy a verified blob into a cache tier. A failure is logged and counted, never
        passed on: the client gets good bytes either way."""
        try:
            await tier.put(digest, spool)
        except Exception as error:  # noqa: BLE001 - a cache write must never fail the request
            self.walk.meters[tier.name].cache_write(ok=False)
            log.warning("could not cache %s in %s: %r", digest, tier.name, error)
        else:
            self.walk.meters[tier.name].cache_write(ok=True)


async def pass_through(walk: Walk, tier: Tier, digest: Digest, start: int, end: int | None) -> AsyncIterator[bytes]:
    """Bytes [start, end) of ``tier``'s copy, read again from its beginning and hashed whole,
    kept nowhere: for one reader when this machine cannot keep the copy. The last byte is held
    back until the copy verifies; a tier failing here is charged to that tier."""
    try:
        blob = await walk.ask(tier, tier.open(digest), settled=False)
    except Skipped as error:
        raise UpstreamFailed(f"{tier.name}: failed while passing {digest} through") from error
    if blob is None:
        raise UpstreamFailed(f"{tier.name}: no longer has {digest}")
    hasher = hashlib.new(digest.algorithm)
    offset, held = 0, b""
    try:
        async for chunk in paced(blob.chunks(), tier.name, tier.timeout, tier.min_rate):
            if len(chunk) >= HASH_INLINE_MAX:
                await run(hasher.update, chunk)
            else:
                hasher.update(chunk)
            lo, hi = max(start - offset, 0), len(chunk) if end is None else min(end - offset, len(chunk))
            offset += len(chunk)
            if lo < hi:
                out = held + chunk[lo:hi]
                held, out = out[-1:], out[:-1]
                if out:
                    yield out
        if hasher.hexdigest() != digest:
            raise CorruptBlob(f"{tier.name}: bytes hash to {hasher.hexdigest()}, not {digest}")
    except Exception as error:
        walk.failed(tier, error)
        raise UpstreamFailed(f"{tier.name}: {error}") from error
    finally:
        with contextlib.suppress(Exception):
            await blob.close()
    walk.succeeded(tier)
    if held:
        yield held
