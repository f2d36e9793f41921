"""The printed tables and the JSON file: every measure next to its target."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hits import SizeResult


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    value: float | None  # None: the section did not run or failed
    shown: str  # value formatted for the table
    target: str  # e.g. ">= 0.5x"; "" for measures reported without a target
    ok: bool | None  # None: no target, or no value

    @property
    def status(self) -> str:
        if self.value is None:
            return "not run"
        if self.ok is None:
            return "info"
        return "met" if self.ok else "MISSED"

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "target": self.target, "status": self.status}


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
}


Target = tuple[str, float, str]  # (comparison, limit, unit shown), e.g. (">=", 0.5, "x")


def measure(key: str, label: str, value: float | None, shown: str, target: Target | None = None) -> Measure:
    """A measure checked against ``target``, whose limit is in the same unit as ``value``."""
    ok = None
    text = ""
    if target is not None:
        op, limit, unit = target
        text = f"{op} {limit:g}{unit}"
        if value is not None:
            ok = _COMPARE[op](value, limit)
    return Measure(key, label, value, shown if value is not None else "-", text, ok)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(line, flush=True)


def print_hits(results: Sequence[SizeResult], connections: int, duration: float) -> None:
    rows = []
    for r in results:
        rows.append(
            [
                r.size,
                f"{r.median('nginx', 'requests_per_s'):.0f}",
                f"{r.median('casproxy', 'requests_per_s'):.0f}",
                f"{r.ratio('requests_per_s'):.2f}x",
                f"{r.median('nginx', 'mib_per_s'):.1f}",
                f"{r.median('casproxy', 'mib_per_s'):.1f}",
                f"{r.ratio('mib_per_s'):.2f}x",
                f"{r.median('nginx', 'p99_ms'):.2f}",
                f"{r.median('casproxy', 'p99_ms'):.2f}",
                str(r.errors()),
            ]
        )
    headers = [
        "size",
        "nginx req/s",
        "casproxy req/s",
        "ratio",
        "nginx MiB/s",
        "casproxy MiB/s",
        "ratio",
        "nginx p99 ms",
        "casproxy p99 ms",
        "errors",
    ]
    rounds = len(results[0].nginx) if results else 0
    title = f"Cache hits (wrk -t2 -c{connections} -d{duration:g}s, median of {rounds} alternating rounds)"
    print_table(headers, rows, title)


def print_measures(measures: Sequence[Measure]) -> None:
    rows = [[m.label, m.shown, m.target or "-", m.status] for m in measures]
    print_table(["measure", "value", "target", "status"], rows, "Summary")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
