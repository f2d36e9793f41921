"""The store's facade: an ordered list of tiers that behaves like one verified blob store.

    store = Composite()
    store.append_cache(DiskTier("./cache"))
    store.append_source(S3Tier("s3://bucket/prefix/"))
    data = await store.get(digest)

A lookup walks the tiers in order (proxy.store.walk). Trusted tiers at the head of the list (the
disk cache, which holds only bytes it verified itself) answer hits directly. Everything else goes
through a fill (proxy.store.fills), shared by every request for the digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from proxy.digest import Digest
from proxy.errors import ConfigError, CorruptBlob, NotFound
from proxy.store.breaker import Breaker
from proxy.store.claims import Claims
from proxy.store.fills import Fills, InTrustedTier
from proxy.store.negative import NegativeCache
from proxy.store.opened import Arriving, Found, Opened
from proxy.store.spool import Room
from proxy.store.stats import TierMeter, TierStats
from proxy.store.walk import CorruptCopies, Skipped, Walk
from proxy.tier import BytesBlob, FileBlob, Payload, Stat, Tier
from proxy.tiers.api import APIOrigin, ApiTier

log = logging.getLogger(__name__)


class Composite:
    """An ordered list of tiers behaving as one store; the library API of casproxy."""

    def __init__(
        self,
        tiers: Iterable[Tier | APIOrigin] = (),  # SPEC 4: an APIOrigin is wrapped, as by append()
        *,
        negative_cache: NegativeCache | None = None,
        spool_dir: str | None = None,
        spool_memory: int = 256 << 20,
        max_blob_size: int | None = None,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 30.0,
        corrupt_memory: int = 10_000,
        claims: Claims | None = None,
    ) -> None:
        self.negative = negative_cache or NegativeCache()
        self.claims = claims  # coalescing across instances (coalesce.url); None: per machine
        # A corrupt copy is remembered as long as a "found nowhere" is (SPEC 4).
        corrupt = CorruptCopies(self.negative.ttl, corrupt_memory)
        self._walk = Walk(breaker_threshold, breaker_cooldown, corrupt)
        self._fills = Fills(self._walk, self.negative, spool_memory, max_blob_size, claims)
        self._fills.spool_dir = spool_dir
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        for tier in tiers:
            self.append(tier)

    # -- composition ---------------------------------------------------------------------

    def append(self, tier: Tier | APIOrigin) -> Tier:
        if isinstance(tier, APIOrigin):
            tier = ApiTier(tier)
        self._walk.append(tier)
        if tier.state_dir is not None:
            self._fills.use_state_dir(tier)
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
    def tiers(self) -> list[Tier]:
        return self._walk.tiers

    @property
    def breakers(self) -> dict[str, Breaker]:
        return self._walk.breakers

    @property
    def stats(self) -> dict[str, TierStats]:
        return {name: meter.stats for name, meter in self._walk.meters.items()}

    @property
    def coalesced(self) -> int:
        return self._fills.coalesced

    @property
    def spool_dir(self) -> str | None:
        return self._fills.spool_dir

    @property
    def spool_room(self) -> Room | None:
        """How a spool in ``spool_dir`` makes room as its file grows (the disk cache evicts)."""
        return self._fills.room

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
                if self.claims is not None:
                    await self.claims.start()
                self._started = True

    async def _start_tier(self, tier: Tier) -> None:
        """A tier that cannot start yet (a store that is down) fails its calls until it can;
        only a configuration mistake stops the whole store from starting."""
        try:
            await tier.start()
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - the tier reports itself failing on use
            self._walk.failed(tier)
            log.error("tier %s could not start: %r", tier.name, error)

    async def wait_idle(self) -> None:
        """Wait until every fill in flight has finished writing the caches."""
        await self._fills.wait_idle()

    async def settle(self, grace: float) -> None:
        """Let the fills in flight finish for up to ``grace`` seconds, then abandon the rest:
        their requests fail, and what they held (threads, connections) is released."""
        await self._fills.settle(grace)

    async def close(self) -> None:
        await self._fills.close()
        for tier in self.tiers:
            with contextlib.suppress(Exception):
                await tier.close()
        await self.negative.close()
        if self.claims is not None:
            await self.claims.close()
        self._started = False

    async def __aenter__(self) -> Composite:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading -------------------------------------------------------------------------

    async def get(self, digest: str, *, cache: bool = True) -> bytes:
        """The whole blob, verified; raises NotFound or UpstreamFailed."""
        async with await self.open(digest, cache=cache) as opened:
            return await opened.read()

    async def stream(self, digest: str, *, cache: bool = True) -> AsyncIterator[bytes]:
        """The blob in chunks, in bounded memory. A copy that fails verification raises
        CorruptBlob or UpstreamFailed at the end: discard what was received."""
        async with await self.open(digest, cache=cache) as opened:
            async for chunk in opened.chunks():
                yield chunk

    async def open(self, digest: str, *, cache: bool = True) -> Opened:
        """Find the blob: whole in a trusted tier, or arriving in a fill shared with concurrent
        requests. ``cache=False``: a copy found in a source is not written into the cache tiers
        (a bulk read, e.g. an export, must not push the hot blobs out)."""
        digest = Digest.parse(digest)
        if not self._started:
            await self.start()
        found = await self._open_trusted(digest)
        if found is not None:
            return found
        try:
            fill = await self._fills.join(digest, cache=cache)
        except InTrustedTier:
            found = await self._open_trusted(digest)
            if found is None:
                raise NotFound(f"{digest} was found in no tier") from None
            return found
        assert fill.tier is not None
        return Arriving(digest, fill.tier.name, fill.tier.role == "cache", fill)

    async def stat(self, digest: str) -> tuple[Tier, Stat]:
        """The cheap existence check (HEAD): which tier has it and, if known, its size."""
        digest = Digest.parse(digest)
        if not self._started:
            await self.start()
        walk = self._walk
        trusted = walk.trusted_head()
        for tier in trusted:
            with contextlib.suppress(Skipped):
                found = await walk.ask(tier, tier.stat(digest))
                if found is not None:
                    return tier, found
        if not self._fills.running(digest) and await self._fills.remembered_absent(digest):
            raise NotFound(f"{digest} was found nowhere (remembered for {self.negative.ttl:g}s)")
        began = self.negative.now()
        errors: list[str] = []
        for tier in self.tiers[len(trusted) :]:
            if walk.corrupt.remembered(tier.name, digest):
                continue  # its copy cannot be served: not counted, so a client uploads a good one
            with contextlib.suppress(Skipped):
                found = await walk.ask(tier, tier.stat(digest), errors)
                if found is not None:
                    return tier, found
        await self._fills.nothing_found(digest, errors, began)
        raise AssertionError("unreachable")

    async def contains(self, digest: str) -> bool:
        try:
            await self.stat(digest)
        except NotFound:
            return False
        return True

    def peek(self, digest: Digest) -> tuple[Tier, bytes] | None:
        """A verified hit held in process memory, counted as a hit; None otherwise. The hot path:
        no await, no timer, no breaker (a trusted local tier's memory cannot hang)."""
        for tier in self._walk.trusted_head():
            blob = tier.peek(digest)
            if isinstance(blob, BytesBlob):
                self._walk.meters[tier.name].hit(len(blob.data))
                return tier, blob.data
        return None

    async def _open_trusted(self, digest: Digest) -> Found | None:
        walk = self._walk
        trusted = walk.trusted_head()
        for tier in trusted:  # the hot path: no awaits, no timers
            blob = tier.peek(digest)
            if blob is not None:
                walk.meters[tier.name].hit(blob.size or 0)
                return Found(digest, tier.name, tier.role == "cache", blob)
        for tier in trusted:
            try:
                blob = await walk.ask(tier, tier.open(digest))
            except Skipped:
                continue
            if blob is not None:
                walk.meters[tier.name].hit(blob.size or 0)
                if isinstance(blob, FileBlob) and blob.check is not None:
                    blob.check = _counting(blob.check, walk.meters[tier.name])
                return Found(digest, tier.name, tier.role == "cache", blob)
            walk.meters[tier.name].miss()
        return None

    # -- writing -------------------------------------------------------------------------

    async def put(self, digest: str, payload: Payload, targets: Iterable[Tier]) -> None:
        """Store a verified blob in the given tiers, and forget any "found nowhere"."""
        digest = Digest.parse(digest)
        for tier in targets:
            await tier.put(digest, payload)
        await self.negative.discard(digest)

    async def delete(self, digest: str) -> list[str]:
        """Remove the blob from every cache tier (sources keep it); the tiers it was in."""
        digest = Digest.parse(digest)
        removed = []
        for tier in self.tiers:
            if tier.role == "cache" and await tier.delete(digest):
                removed.append(tier.name)
        return removed

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "tiers": {
                tier.name: {
                    "kind": type(tier).__name__,
                    "role": tier.role,
                    "breaker": self.breakers[tier.name].state,
                    **self._walk.meters[tier.name].stats.counts(),
                    **tier.describe(),
                }
                for tier in self.tiers
            },
            "in_flight": len(self._fills),
            "coalesced": self.coalesced,
            "negative_cache": {"url": self.negative.url, "hits": self.negative.hits},
            "coalesce": self.claims.describe() if self.claims is not None else None,
            "time": time.time(),
        }


def _counting(check: Callable[[], asyncio.Future[None]], meter: TierMeter) -> Callable[[], asyncio.Future[None]]:
    """A trusted file's check (run while it is sent) that counts a mismatch against its tier: the
    send began as a hit, so nothing else above sees it fail."""

    def counted() -> asyncio.Future[None]:
        checked = check()

        def count(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and isinstance(future.exception(), CorruptBlob):
                meter.corrupt()

        checked.add_done_callback(count)
        return checked

    return counted
