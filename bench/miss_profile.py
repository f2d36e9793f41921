"""Where a cold miss goes: sequential cold GETs through casproxy (an http tier in front of an
nginx origin, default memory limits) and from the origin direct, pinned as bench/peers.py pins
them; with --profile, py-spy samples casproxy's threads meanwhile (raw format; the busiest
frames are printed).

    .venv/bin/python bench/miss_profile.py --size-mib 8 --count 20
    .venv/bin/python bench/miss_profile.py --size-mib 8 --count 30 --profile results/miss.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import requests
from harness import PROCESSES, MiB, log
from peers import CLIENT_CPUS, casproxy, get_timed, origin, ready, write_blob
from pyspy import find_py_spy


def busiest(raw: Path, count: int = 15) -> list[tuple[int, str]]:
    """The innermost frames with the most samples, idle threads left out."""
    leaves: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) < 2 or frames[-1].startswith(("_worker (concurrent", "EpollSelector.select")):
            continue
        leaves[f"{frames[0].split(':')[-1].strip()}: {frames[-1]}"] += int(samples)
    return [(samples, frame) for frame, samples in leaves.most_common(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=float, default=8)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--profile", type=Path, help="py-spy raw output file")
    args = parser.parse_args()
    os.sched_setaffinity(0, CLIENT_CPUS)
    with tempfile.TemporaryDirectory() as temp:
        workdir = Path(temp)
        blobs = workdir / "blobs"
        blobs.mkdir()
        probe = write_blob(blobs, 16)
        the_origin = ready(origin(workdir, blobs), probe)
        http = {"name": "origin", "kind": "http", "role": "source", "url": f"{the_origin.url}/sha1/{{hash}}"}
        proxy = ready(casproxy(workdir, "casproxy", http, memory={}), probe)
        digests = [write_blob(blobs, int(args.size_mib * MiB)) for _ in range(args.count)]
        session = requests.Session()
        recorder = None
        if args.profile:
            py_spy = find_py_spy()
            assert py_spy, "py-spy is not installed: .venv/bin/pip install py-spy"
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            command = [py_spy, "record", "-r", "500", "--threads", "--format", "raw", "-o", str(args.profile)]
            recorder = PROCESSES.spawn([*command, "-p", str(proxy.pid)], workdir / "py-spy.log")
        try:
            proxied = []
            for digest in digests:
                seconds, response = get_timed(session, f"{proxy.url}/sha1/{digest}")
                assert response.headers["X-Cache"] == "MISS", "a cold miss was not one"
                proxied.append(seconds)
            direct = [get_timed(session, f"{the_origin.url}/sha1/{digest}")[0] for digest in digests]
        finally:
            if recorder is not None:
                recorder.send_signal(2)  # py-spy writes its file on SIGINT
                recorder.wait(60)
            PROCESSES.stop_all()
    casproxy_ms, direct_ms = statistics.median(proxied) * 1000, statistics.median(direct) * 1000
    log(f"{args.size_mib:g} MiB cold misses (medians of {args.count}): casproxy {casproxy_ms:.1f} ms")
    log(f"  origin direct {direct_ms:.1f} ms")
    if args.profile:
        for samples, frame in busiest(args.profile):
            log(f"  {samples:6d}  {frame}")


if __name__ == "__main__":
    main()
