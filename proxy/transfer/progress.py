"""Showing a transfer's progress on stderr: tqdm bars on a terminal (one per target of an export
to several), weighted by bytes, with rate and time left; a status line every few seconds
otherwise (logs, CI); and a summary at the end, printed after the bars are gone."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from proxy.transfer.tally import Snapshot

PERMILLE = 1000  # a bar's steps: its position is the fraction of the bytes done


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
    """``export: 1200/10000 blobs, 4.7 MiB of ~39 MiB, 1.2 MiB/s, 310 blobs/s, eta 28s (skipped 3)``"""
    return f"{_label(snap)}: {_progress(snap)}"


def status_lines(snap: Snapshot) -> list[str]:
    """One status line, or one per target of an export to several."""
    if len(snap.targets) > 1:
        return [status_line(target) for target in snap.targets]
    return [status_line(snap)]


def summary_line(snap: Snapshot) -> str:
    """``export: done 10000 (120 by an earlier run), skipped 0, failed 0, corrupt 0; 39.1 MiB
    this run in 12s, 3.2 MiB/s, 813 blobs/s; 1.2 MiB by earlier runs``"""
    done = f"done {snap.done}" + (f" ({snap.resumed} by an earlier run)" if snap.resumed else "")
    line = f"{_label(snap)}: {done}, skipped {snap.skipped}, failed {snap.failed}, corrupt {snap.corrupt}"
    if snap.ignored:
        line += f", ignored {snap.ignored} (names that are not digests)"
    line += f"; {human_size(snap.run_bytes)} this run in {human_duration(snap.elapsed_s)}, {_rates(snap)}"
    if snap.earlier_bytes:
        line += f"; {human_size(snap.earlier_bytes)} by earlier runs"
    return line


def summary_lines(snap: Snapshot) -> list[str]:
    """The summary, and one per target of an export to several."""
    lines = [summary_line(snap)]
    if len(snap.targets) > 1:
        lines += [f"  {summary_line(target)}" for target in snap.targets]
    return lines


def _label(snap: Snapshot) -> str:
    """``export``, or ``export to TARGET`` for one target's part of an export to several."""
    return (
        f"{snap.kind} to {snap.location}" if snap.kind == "export" and snap.location and not snap.targets else snap.kind
    )


def _progress(snap: Snapshot) -> str:
    total = "?" if snap.total is None else str(snap.total)
    size = human_size(snap.bytes)
    if snap.total_bytes is not None:
        size += f" of {'' if snap.state != 'running' else '~'}{human_size(snap.total_bytes)}"
    line = f"{snap.processed}/{total} blobs, {size}, {_rates(snap)}"
    if snap.eta_s is not None:
        line += f", eta {human_duration(snap.eta_s)}"
    counts = [(name, getattr(snap, name)) for name in ("skipped", "failed", "corrupt", "ignored")]
    shown = ", ".join(f"{name} {count}" for name, count in counts if count)
    if snap.state == "failed" and snap.errors:
        shown = ", ".join(filter(None, [shown, "stopped"]))
    return f"{line} ({shown})" if shown else line


def _rates(snap: Snapshot) -> str:
    return f"{human_size(snap.rate)}/s, {snap.items_rate:.0f} blobs/s"


def _escape(text: str) -> str:
    """``text`` as a tqdm format with one ``{}`` kept for the bar."""
    return text.replace("{", "{{").replace("}", "}}").replace("{{}}", "{}", 1)


class ProgressView:
    """Draws snapshots on ``stream``. Anything else printed meanwhile goes through ``message``
    so it does not garble the bars."""

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
        self._bars: list[tqdm[Any]] = []
        self._last = time.monotonic()

    def message(self, text: str) -> None:
        if self._bars:
            self._bars[0].write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, snap: Snapshot) -> None:
        if self.tty:
            parts = snap.targets if len(snap.targets) > 1 else (snap,)
            for position, part in enumerate(parts):
                self._draw_bar(position, part)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            for line in status_lines(snap):
                print(line, file=self.stream, flush=True)

    def _draw_bar(self, position: int, snap: Snapshot) -> None:
        text = f"{_label(snap)}: {{}}{_progress(snap)}"
        fraction = snap.fraction
        layout = _escape(text).format("{percentage:3.0f}%|{bar}| " if fraction is not None else "")
        while len(self._bars) <= position:
            self._bars.append(
                tqdm(
                    file=self.stream,
                    dynamic_ncols=True,
                    leave=False,
                    position=len(self._bars),
                    total=PERMILLE,
                    bar_format=layout,
                )
            )
        bar = self._bars[position]
        bar.bar_format = layout
        bar.n = round((fraction or 0.0) * PERMILLE)
        bar.refresh()

    def close(self, snap: Snapshot) -> None:
        """Remove the bars (all their lines), then print the summary."""
        for bar in reversed(self._bars):
            bar.clear()
            bar.close()
        self._bars = []
        for line in summary_lines(snap):
            print(line, file=self.stream, flush=True)

    async def follow(self, snapshot: Callable[[], Snapshot]) -> None:
        """Redraw until cancelled: 5 times a second on a terminal, else every ``interval``."""
        tick = 0.2 if self.tty else min(self.interval, 1.0)
        while True:
            await asyncio.sleep(tick)
            self.update(snapshot())


class MessageHandler(logging.Handler):
    """Log records (a tier failing, a corrupt copy skipped) as messages above the bars."""

    def __init__(self, view: ProgressView) -> None:
        super().__init__(logging.WARNING)
        self.view = view
        self.setFormatter(logging.Formatter("casproxy: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.view.message(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the transfer
            self.handleError(record)
