"""A per-tier circuit breaker: after repeated failures, skip the tier for a cool-down, then
let one request probe it."""

from __future__ import annotations

import time
from typing import Literal

State = Literal["closed", "open", "half-open"]


class Breaker:
    def __init__(self, threshold: int = 5, cooldown: float = 30.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        if time.monotonic() - self.opened_at >= self.cooldown:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self._probing:
            self._probing = True  # one probe at a time; the rest keep skipping
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failed(self) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()
