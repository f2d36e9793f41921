"""Showing a transfer's progress on stderr: a tqdm bar on a terminal (items, bytes, rate, time
left), a one-line status every few seconds otherwise (logs, CI), and a summary line at the end."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from proxy.transfer.tally import Snapshot

_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} blobs{postfix}"
_BAR_NO_TOTAL = "{desc}: {n_fmt} blobs{postfix}"


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def status_line(snap: Snapshot) -> str:
    """``export: 1200/10000 blobs, 4.7 MiB, 1.2 MiB/s, 310 blobs/s, eta 28s (skipped 3, failed 1)``"""
    total = "?" if snap.total is None else str(snap.total)
    line = f"{snap.kind}: {snap.processed}/{total} blobs, {_rates(snap)}"
    if snap.eta_s is not None:
        line += f", eta {human_duration(snap.eta_s)}"
    counts = [(name, getattr(snap, name)) for name in ("skipped", "failed", "corrupt", "ignored")]
    shown = ", ".join(f"{name} {count}" for name, count in counts if count)
    return f"{line} ({shown})" if shown else line


def summary_line(snap: Snapshot) -> str:
    """``export: done 10000, skipped 0, failed 0, corrupt 0; 39.1 MiB in 12s, 3.2 MiB/s, 813 blobs/s``"""
    done = f"done {snap.done}" + (f" ({snap.resumed} by an earlier run)" if snap.resumed else "")
    line = f"{snap.kind}: {done}, skipped {snap.skipped}, failed {snap.failed}, corrupt {snap.corrupt}"
    if snap.ignored:
        line += f", ignored {snap.ignored} (names that are not digests)"
    return f"{line}; {human_size(snap.bytes)} in {human_duration(snap.elapsed_s)}, {_rates(snap, moved=True)}"


def _rates(snap: Snapshot, moved: bool = False) -> str:
    size = "" if moved else f"{human_size(snap.bytes)}, "
    return f"{size}{human_size(snap.rate)}/s, {snap.items_rate:.0f} blobs/s"


class ProgressView:
    """Draws snapshots on ``stream``. Anything else printed meanwhile goes through ``message``
    so it does not garble the bar."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval: float = 5.0,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self._bar: tqdm[Any] | None = None
        self._last = time.monotonic()

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, snap: Snapshot) -> None:
        if self.tty:
            self._draw_bar(snap)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            print(status_line(snap), file=self.stream, flush=True)

    def _draw_bar(self, snap: Snapshot) -> None:
        bar = self._bar
        if bar is None:
            bar = self._bar = tqdm(desc=snap.kind, file=self.stream, dynamic_ncols=True, leave=False, delay=1e9)
        bar.total = snap.total
        bar.bar_format = _BAR if snap.total is not None else _BAR_NO_TOTAL
        bar.n = snap.processed
        postfix = _rates(snap)
        if snap.eta_s is not None:
            postfix += f", eta {human_duration(snap.eta_s)}"
        problems = snap.failed + snap.corrupt
        if problems:
            postfix += f", {problems} failed"
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def close(self, snap: Snapshot) -> None:
        """Remove the bar and print the summary."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        print(summary_line(snap), file=self.stream, flush=True)

    async def follow(self, snapshot: Callable[[], Snapshot]) -> None:
        """Redraw until cancelled: 5 times a second on a terminal, else every ``interval``."""
        tick = 0.2 if self.tty else min(self.interval, 1.0)
        while True:
            await asyncio.sleep(tick)
            self.update(snapshot())


class MessageHandler(logging.Handler):
    """Log records (a tier failing, a corrupt copy skipped) as messages above the bar."""

    def __init__(self, view: ProgressView) -> None:
        super().__init__(logging.WARNING)
        self.view = view
        self.setFormatter(logging.Formatter("casproxy: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.view.message(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the transfer
            self.handleError(record)
