"""Loaded by every Python process bench/soak.py starts with ``--probe`` (via PYTHONPATH): in a
casproxy worker, a daemon thread that once a minute writes what grew since the first minute to
``$SOAK_PROBE_DIR/probe-PID.txt``: the object types gc tracks, counted, that grew most, and, when tracemalloc
is on (PYTHONTRACEMALLOC), the source lines whose live allocations grew most. Not part of casproxy.
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

_INTERVAL = 60.0
_TOP = 15


def _type_counts() -> collections.Counter[str]:
    return collections.Counter(type(thing).__qualname__ for thing in gc.get_objects())


def _report(path: Path) -> None:
    time.sleep(_INTERVAL)  # the first minute loads modules and fills caches: not growth
    first_counts = _type_counts()
    first_snapshot = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
    minute = 1
    while True:
        time.sleep(_INTERVAL)
        minute += 1
        counts = _type_counts()
        grown = sorted(((counts[name] - first_counts[name], name) for name in counts), reverse=True)[:_TOP]
        lines = [f"== minute {minute} (growth since minute 1): {sum(counts.values())} gc objects"]
        lines += [f"  {delta:+8d} {counts[name]:8d} {name}" for delta, name in grown if delta > 0]
        if first_snapshot is not None:
            stats = tracemalloc.take_snapshot().compare_to(first_snapshot, "lineno")
            lines += [f"  {stat}" for stat in stats[:_TOP]]
        with path.open("a") as out:
            out.write("\n".join(lines) + "\n")


def _start() -> None:
    folder = os.environ.get("SOAK_PROBE_DIR")
    # Only the workers, which multiprocessing spawns with "--multiprocessing-fork" (not the
    # supervisor, nor its resource tracker).
    if folder is None or "--multiprocessing-fork" not in sys.argv:
        return
    path = Path(folder) / f"probe-{os.getpid()}.txt"
    threading.Thread(target=_report, args=(path,), name="soak-probe", daemon=True).start()


_start()
