"""The ordered walk over the tiers: each call under its tier's deadline and circuit breaker,
each failure charged to the tier that failed.

A call that fails, times out, or is skipped by an open breaker raises ``Skipped``: the walk goes
on to the next tier, and the reasons are gathered for the one error a caller sees when no
tier answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import TypeVar

from proxy import metrics
from proxy.digest import Digest
from proxy.errors import CorruptBlob, TierError
from proxy.store.breaker import Breaker
from proxy.store.stats import TierMeter
from proxy.tier import Tier

log = logging.getLogger(__name__)
T = TypeVar("T")


class Skipped(Exception):
    """A tier call failed or was skipped by its breaker; the walk goes on."""


class CorruptCopies:
    """Copies found corrupt, by tier and digest, remembered for ``ttl`` seconds like a negative
    entry: HEAD and /missing stop counting them (a GET still asks: the copy may be repaired, and
    the answer names why it failed). At most ``limit`` are kept (the oldest forgotten first), so
    a tier that lies about everything costs bounded memory."""

    def __init__(self, ttl: float = 30.0, limit: int = 10_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._until: OrderedDict[tuple[str, Digest], float] = OrderedDict()

    def add(self, tier: str, digest: Digest) -> None:
        if self.ttl <= 0 or self.limit <= 0:
            return
        key, now = (tier, digest), time.monotonic()
        self._until.pop(key, None)
        self._until[key] = now + self.ttl
        while len(self._until) > self.limit or next(iter(self._until.values())) <= now:  # oldest first
            self._until.popitem(last=False)

    def remembered(self, tier: str, digest: Digest) -> bool:
        if not self._until:  # the common case: one dict check
            return False
        key = (tier, digest)
        until = self._until.get(key)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)


class Walk:
    """The tiers in lookup order, with a breaker and a meter each."""

    def __init__(
        self, breaker_threshold: int = 5, breaker_cooldown: float = 30.0, corrupt: CorruptCopies | None = None
    ) -> None:
        self.tiers: list[Tier] = []
        self.corrupt = corrupt or CorruptCopies()
        self.breakers: dict[str, Breaker] = {}
        self.meters: dict[str, TierMeter] = {}
        self._breaker = (breaker_threshold, breaker_cooldown)
        self._trusted: list[Tier] | None = None  # the trusted tiers at the head, computed once

    def append(self, tier: Tier) -> None:
        if tier.name in self.meters:
            raise ValueError(f"two tiers are named {tier.name!r}")
        self.tiers.append(tier)
        self.breakers[tier.name] = Breaker(*self._breaker)
        self.meters[tier.name] = TierMeter(tier.name)
        self._trusted = None

    def trusted_head(self) -> list[Tier]:
        """The trusted tiers before the first untrusted one: their hits need no verifying."""
        if self._trusted is None:
            self._trusted = []
            for tier in self.tiers:
                if not tier.trusted:
                    break
                self._trusted.append(tier)
        return self._trusted

    async def ask(
        self, tier: Tier, call: Coroutine[object, object, T], errors: list[str] | None = None, *, settled: bool = True
    ) -> T:
        """Await one tier call under its timeout and breaker; failures become Skipped (their
        reason appended to ``errors``). ``settled=False``: the answer is only the start (a body
        follows), so it does not count as a success for the breaker yet."""
        if not self.breakers[tier.name].allow():
            call.close()
            if errors is not None:
                errors.append(f"{tier.name}: skipped (circuit open after repeated failures)")
            raise Skipped
        try:
            async with asyncio.timeout(tier.timeout):
                answer = await call
        except Exception as error:  # anything a tier raises is that tier failing
            self.failed(tier, error, errors)
            raise Skipped from error
        if settled:
            self.succeeded(tier)
        return answer

    def failed(self, tier: Tier, error: BaseException | None = None, errors: list[str] | None = None) -> None:
        """Charge a failure to ``tier``: its breaker, its counters, the log and ``errors``.
        Without an error (a tier that could not start) only the breaker counts it."""
        breaker = self.breakers[tier.name]
        breaker.failed()
        if breaker.state != "closed":
            metrics.BREAKER_STATE.labels(tier.name).set(1)
        if error is None:
            return
        text = str(error) or type(error).__name__
        if not isinstance(error, TierError | OSError):  # a bug in a tier (an api origin's, say)
            text = f"{type(error).__name__}: {text}"
        if isinstance(error, TimeoutError):
            text = f"no answer within {tier.timeout:g}s"
        if not text.startswith(tier.name):
            text = f"{tier.name}: {text}"
        if isinstance(error, CorruptBlob):
            self.meters[tier.name].corrupt()
            log.error("corrupt copy skipped: %s", text)
        else:
            self.meters[tier.name].error()
            log.warning("tier failed: %s", text)
        if errors is not None:
            errors.append(text)

    def succeeded(self, tier: Tier) -> None:
        breaker = self.breakers[tier.name]
        if breaker.state != "closed":
            metrics.BREAKER_STATE.labels(tier.name).set(0)
        breaker.succeeded()
