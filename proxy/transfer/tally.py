"""Counting a transfer as it runs, and the snapshot of it that progress displays and a job API
report: done, skipped, failed, corrupt, total (None until known), bytes, rate, eta_s, errors."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_ERRORS = 100  # the most recent item errors a snapshot keeps (the count is exact)


@dataclass(frozen=True)
class Snapshot:
    kind: str
    state: str  # pending | running | done | failed | cancelled
    total: int | None  # items to go through; None until the list has been read to its end
    done: int  # written to the target (including ``resumed``: by an earlier run of the same spec)
    skipped: int  # the target had them already
    failed: int
    corrupt: int  # bytes that do not hash to their name: reported, never stored
    ignored: int  # import: names that are not digests
    resumed: int
    bytes: int  # bytes of the items done, and of those in flight so far
    rate: float  # bytes per second moved by this run
    items_rate: float  # items per second finished by this run
    eta_s: float | None
    elapsed_s: float
    errors: tuple[str, ...]  # the most recent item errors
    error_count: int

    @property
    def processed(self) -> int:
        return self.done + self.skipped + self.failed + self.corrupt + self.ignored

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.corrupt == 0 and self.state != "failed"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = list(self.errors)
        return data


class ItemMeter:
    """The progress of one item in flight."""

    def __init__(self, tally: Tally, size: int) -> None:
        self.tally = tally
        self.size = size
        self.sent = 0

    def moved(self, size: int) -> None:
        self.sent += size
        self.tally.moved += size

    def reused(self, size: int) -> None:
        self.sent += size
        self.tally.reused += size


class Tally:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.total: int | None = None
        self.done = self.skipped = self.failed = self.corrupt = self.ignored = self.resumed = 0
        self.moved = 0  # bytes this run sent
        self.reused = 0  # bytes of resumed uploads that an earlier run sent
        self.done_bytes = 0  # bytes of items done (by this run or an earlier one)
        self.errors: deque[str] = deque(maxlen=MAX_ERRORS)
        self.error_count = 0
        self.started = time.monotonic()
        self.stopped: float | None = None
        self._finished_here = 0  # items this run finished (for the items rate)
        self._in_flight: set[ItemMeter] = set()
        self._sized = 0  # items of known size this run worked on, and their bytes (for the ETA)
        self._sized_bytes = 0

    # -- counting ------------------------------------------------------------------------

    def meter(self, size: int | None) -> ItemMeter:
        meter = ItemMeter(self, size or 0)
        self._in_flight.add(meter)
        if size is not None:
            self._sized += 1
            self._sized_bytes += size
        return meter

    def release(self, meter: ItemMeter) -> None:
        self._in_flight.discard(meter)

    def finished(self, state: str, size: int = 0, *, resumed: bool = False) -> None:
        if state == "done":
            self.done += 1
            self.done_bytes += size
        else:
            self.skipped += 1
        if resumed:
            self.resumed += 1
        else:
            self._finished_here += 1

    def error(self, kind: str, message: str) -> None:
        if kind == "corrupt":
            self.corrupt += 1
        elif kind == "ignored":
            self.ignored += 1
        else:
            self.failed += 1
        self._finished_here += 1
        self.errors.append(message)
        self.error_count += 1

    def stop(self) -> None:
        self.stopped = time.monotonic()

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self, state: str) -> Snapshot:
        elapsed = (self.stopped or time.monotonic()) - self.started
        rate = self.moved / elapsed if elapsed > 0 else 0.0
        items_rate = self._finished_here / elapsed if elapsed > 0 else 0.0
        in_flight = sum(meter.sent for meter in self._in_flight)
        processed = self.done + self.skipped + self.failed + self.corrupt + self.ignored
        return Snapshot(
            kind=self.kind,
            state=state,
            total=self.total,
            done=self.done,
            skipped=self.skipped,
            failed=self.failed,
            corrupt=self.corrupt,
            ignored=self.ignored,
            resumed=self.resumed,
            bytes=self.done_bytes + in_flight,
            rate=rate,
            items_rate=items_rate,
            eta_s=self._eta(processed, rate, items_rate) if state == "running" else None,
            elapsed_s=elapsed,
            errors=tuple(self.errors),
            error_count=self.error_count,
        )

    def _eta(self, processed: int, rate: float, items_rate: float) -> float | None:
        """Bytes left in flight plus the items not started yet at the average size so far, at
        the rate so far; by items alone while nothing has a size (all skipped, say)."""
        if self.total is None:
            return None
        waiting = max(0, self.total - processed - len(self._in_flight))
        average = self._sized_bytes / self._sized if self._sized else 0.0
        if average > 0 and rate > 0:
            left = sum(max(0, meter.size - meter.sent) for meter in self._in_flight) + waiting * average
            return left / rate
        if items_rate > 0:
            return (waiting + len(self._in_flight)) / items_rate
        return None
