"""Counting a transfer as it runs, and the snapshot of it that progress displays and a job API
report: done, skipped, failed, corrupt, total (None until known), bytes, rate, eta_s, errors.
An export to several targets counts each target on its own; ``combine`` adds them up."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

MAX_ERRORS = 100  # the most recent item errors a snapshot keeps (the count is exact)


@dataclass(frozen=True)
class Snapshot:
    kind: str
    state: str  # pending | running | done | failed | cancelled
    location: str  # the target (export) or source (import); "" for several targets together
    total: int | None  # items to go through; None until the list has been read to its end
    done: int  # written to the target (including ``resumed``: by an earlier run of the same spec)
    skipped: int  # the target had them already
    failed: int
    corrupt: int  # bytes that do not hash to their name: reported, never stored
    ignored: int  # import: names that are not digests
    resumed: int
    bytes: int  # bytes of the items done, and of those in flight so far
    earlier_bytes: int  # of ``bytes``: those done by earlier runs of the same spec
    total_bytes: int | None  # all the bytes to move: known (an import's listing) or estimated
    rate: float  # bytes per second moved by this run
    items_rate: float  # items per second finished by this run
    eta_s: float | None
    elapsed_s: float
    errors: tuple[str, ...]  # the most recent item errors
    error_count: int
    targets: tuple[Snapshot, ...] = ()  # an export's, one per target (when more than one)

    @property
    def processed(self) -> int:
        return self.done + self.skipped + self.failed + self.corrupt + self.ignored

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.corrupt == 0 and self.state != "failed"

    @property
    def run_bytes(self) -> int:
        """Bytes this run moved (or is moving)."""
        return self.bytes - self.earlier_bytes

    @property
    def fraction(self) -> float | None:
        """How far along, by bytes (one large blob weighs its size), else by items."""
        if self.total_bytes:
            return min(1.0, self.bytes / self.total_bytes)
        if self.total:
            return min(1.0, self.processed / self.total)
        return None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = list(self.errors)
        data["targets"] = [target.as_json() for target in self.targets]
        return data


def combine(kind: str, state: str, parts: Sequence[Snapshot]) -> Snapshot:
    """Several targets' snapshots as one: counts and bytes added up (an item is a blob at a
    target), time left that of the slowest; ``targets`` keeps each."""
    if len(parts) == 1:
        return Snapshot(**{**_fields(parts[0]), "state": state, "targets": (parts[0],)})

    def total(name: str) -> Any:
        values = [getattr(part, name) for part in parts]
        return None if any(value is None for value in values) else sum(values)

    etas = [part.eta_s for part in parts if part.eta_s is not None]
    errors = [f"{part.location}: {line}" for part in parts for line in part.errors]
    return Snapshot(
        kind=kind,
        state=state,
        location="",
        total=total("total"),
        **{name: sum(getattr(part, name) for part in parts) for name in _SUMMED},
        total_bytes=total("total_bytes"),
        eta_s=max(etas) if etas and state == "running" else None,
        elapsed_s=max(part.elapsed_s for part in parts),
        errors=tuple(errors[-MAX_ERRORS:]),
        error_count=sum(part.error_count for part in parts),
        targets=tuple(parts),
    )


_SUMMED = ("done", "skipped", "failed", "corrupt", "ignored", "resumed", "bytes", "earlier_bytes", "rate", "items_rate")


def _fields(snapshot: Snapshot) -> dict[str, Any]:
    return {name: getattr(snapshot, name) for name in Snapshot.__dataclass_fields__}


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
    def __init__(self, kind: str, location: str = "") -> None:
        self.kind = kind
        self.location = location
        self.total: int | None = None
        self.total_bytes: int | None = None  # when known up front (an import's listing)
        self.done = self.skipped = self.failed = self.corrupt = self.ignored = self.resumed = 0
        self.moved = 0  # bytes this run sent
        self.reused = 0  # bytes of resumed uploads that an earlier run sent
        self.done_bytes = 0  # bytes of items done (by this run or an earlier one)
        self.earlier_bytes = 0  # of those, by an earlier run
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
            self.earlier_bytes += size
            if size:
                self._sized += 1
                self._sized_bytes += size
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

    @property
    def problems(self) -> int:
        """Items that failed or were corrupt: what a rerun would retry."""
        return self.failed + self.corrupt

    def stop(self) -> None:
        self.stopped = time.monotonic()

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self, state: str) -> Snapshot:
        elapsed = (self.stopped or time.monotonic()) - self.started
        rate = self.moved / elapsed if elapsed > 0 else 0.0
        items_rate = self._finished_here / elapsed if elapsed > 0 else 0.0
        in_flight = sum(meter.sent for meter in self._in_flight)
        processed = self.done + self.skipped + self.failed + self.corrupt + self.ignored
        in_flight_left = sum(max(0, meter.size - meter.sent) for meter in self._in_flight)
        return Snapshot(
            kind=self.kind,
            state=state,
            location=self.location,
            total=self.total,
            done=self.done,
            skipped=self.skipped,
            failed=self.failed,
            corrupt=self.corrupt,
            ignored=self.ignored,
            resumed=self.resumed,
            bytes=self.done_bytes + in_flight,
            earlier_bytes=self.earlier_bytes,
            total_bytes=self._total_bytes(processed, self.done_bytes + in_flight + in_flight_left),
            rate=rate,
            items_rate=items_rate,
            eta_s=self._eta(processed, rate, items_rate) if state == "running" else None,
            elapsed_s=elapsed,
            errors=tuple(self.errors),
            error_count=self.error_count,
        )

    def _total_bytes(self, processed: int, known: int) -> int | None:
        """All the bytes to move: as listed, else those known so far plus the items not started
        at the average size so far (None until the number of items is known)."""
        if self.total_bytes is not None:
            return self.total_bytes
        if self.total is None:
            return None
        waiting = max(0, self.total - processed - len(self._in_flight))
        if waiting and not self._sized:
            return None  # no size seen yet to guess from
        average = self._sized_bytes / self._sized if self._sized else 0.0
        return known + int(waiting * average)

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
