"""Optional (--profile): where casproxy spends its time on small hits, sampled by py-spy
during an extra wrk run that is not counted in the results (sampling costs CPU)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from harness import PROCESSES, Server, log
from loadgen import rotation_script, run_wrk


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_hits(proxy: Server, hashes: list[str], workdir: Path, out: Path, connections: int, seconds: int) -> Path:
    py_spy = find_py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    script = rotation_script(workdir / "rotate-profile.lua", [f"/sha1/{h}" for h in hashes])
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [py_spy, "record", "--threads", "--format", "raw", "-o", str(out), "-p", str(proxy.pid), "-d", str(seconds)]
    recorder = PROCESSES.spawn(args, workdir / "py-spy.log")
    try:
        run_wrk(proxy.url, script, connections, seconds)
        recorder.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        PROCESSES.stop(recorder)
    log(f"  profile: {out} (collapsed stacks; feed to flamegraph.pl or speedscope)")
    print_top(out)
    return out


_IDLE_LEAVES = ("EpollSelector.select", "_worker (concurrent/futures/thread.py")


def print_top(path: Path, count: int = 15) -> None:
    """Where the event loop thread spends its busy samples: by own (self) time and inclusive.
    Other threads (executors) and the loop's wait in epoll are left out."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        if not samples.isdigit() or "MainThread" not in frames[0]:
            continue
        n = int(samples)
        if frames[-1].startswith(_IDLE_LEAVES):
            idle += n
            continue
        busy += n
        own[frames[-1]] += n
        for frame in set(frames[1:]):
            inclusive[frame] += n
    if not busy:
        return
    log(f"  event loop busy in {100 * busy / (busy + idle):.0f}% of {busy + idle} samples; of the busy ones:")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        log(f"  top {count} by {title}:")
        # The trunk (main, run_forever, ...) is in every sample and says nothing.
        shown = [(frame, n) for frame, n in counter.most_common() if n < 0.95 * busy][:count]
        for frame, n in shown:
            log(f"    {100 * n / busy:5.1f}%  {frame}")
