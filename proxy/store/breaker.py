"""A per-tier circuit breaker: after repeated failures, skip the tier for a cool-down, then
let one request probe it."""

from __future__ import annotations

import time
from typing import Literal

State = Literal["closed", "open", "half-open"]


class Breaker:
    """Counts consecutive failures; ``threshold`` of them open it for ``cooldown`` seconds.

    After the cool-down one caller at a time may probe (``allow`` returns True once): its
    success closes the breaker, its failure opens it for another cool-down. A probe that never
    reports back (its caller was cancelled) gives up its turn after a cool-down, so the breaker
    cannot stay shut for good.
    """

    def __init__(self, threshold: int = 5, cooldown: float = 30.0) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, not {threshold}")
        if cooldown < 0:
            raise ValueError(f"cooldown must not be negative, not {cooldown}")
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self.trips = 0  # times it opened, for /stats
        self._probe_since: float | None = None

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        if time.monotonic() - self.opened_at >= self.cooldown:
            return "half-open"
        return "open"

    @property
    def retry_in(self) -> float:
        """Seconds until the next probe may go out (0 when closed or due)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown - time.monotonic())

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = time.monotonic()
        if self._probe_since is not None and now - self._probe_since < max(self.cooldown, 1.0):
            return False  # one probe at a time; the rest keep skipping
        self._probe_since = now
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probe_since = None

    def failed(self) -> None:
        self.failures += 1
        self._probe_since = None
        if self.failures >= self.threshold:
            if self.opened_at is None:
                self.trips += 1
            self.opened_at = time.monotonic()
