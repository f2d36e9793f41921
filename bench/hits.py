"""Cache hits: casproxy's disk tier against nginx serving the same folder, size by size,
in alternating wrk rounds so that drift on a shared machine hits both alike."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from harness import KiB, MiB, Server, log, sha1_hex
from loadgen import WrkResult, rotation_script, run_wrk

SIZES: dict[str, int] = {"4KiB": 4 * KiB, "100KiB": 100 * KiB, "1MiB": MiB, "10MiB": 10 * MiB}


def make_blobs(folder: Path, per_size: int) -> dict[str, list[str]]:
    """``per_size`` random blobs of every size, each file named by its sha1: {size: [hash]}."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs: dict[str, list[str]] = {}
    for label, size in SIZES.items():
        hashes = []
        for _ in range(per_size):
            data = os.urandom(size)
            digest = sha1_hex(data)
            (folder / digest).write_bytes(data)
            hashes.append(digest)
        blobs[label] = hashes
    return blobs


def warm(proxy: Server, hashes: Sequence[str]) -> int:
    """GET each blob until it is a HIT from the disk tier with the right bytes, or the hit
    benchmark would measure misses. The first GET is a MISS filled from the source. The
    proxy writes the cache after answering, so a GET right behind it can still join the
    fill (a MISS): retry briefly. Returns how many second GETs were not yet HITs."""
    late = 0
    with requests.Session() as session:
        for digest in hashes:
            first = session.get(f"{proxy.url}/sha1/{digest}", timeout=60)
            first.raise_for_status()
            if first.headers.get("X-Cache") != "MISS":
                raise RuntimeError(f"{digest}: first GET was {first.headers.get('X-Cache')!r}, not a MISS")
            for attempt in range(50):
                second = session.get(f"{proxy.url}/sha1/{digest}", timeout=60)
                second.raise_for_status()
                if sha1_hex(second.content) != digest:
                    raise RuntimeError(f"{digest}: GET returned wrong bytes")
                if second.headers.get("X-Cache") == "HIT" and second.headers.get("X-Cache-Tier") == "disk":
                    break
                late += attempt == 0
                time.sleep(0.02)
            else:
                raise RuntimeError(f"{digest}: still {second.headers.get('X-Cache')!r} after 50 GETs, never a HIT")
    if late:
        log(f"  warm: {late} of {len(hashes)} GETs right after the MISS were not HITs yet (cache write in flight)")
    return late


@dataclass
class SizeResult:
    size: str
    nginx: list[WrkResult] = field(default_factory=list)
    casproxy: list[WrkResult] = field(default_factory=list)

    def median(self, server: str, metric: str) -> float:
        rounds: list[WrkResult] = getattr(self, server)
        return statistics.median(float(getattr(r, metric)) for r in rounds)

    def ratio(self, metric: str) -> float:
        """Median of the per-round casproxy/nginx ratios: each pair ran back to back."""
        pairs = zip(self.casproxy, self.nginx, strict=True)
        return statistics.median(float(getattr(c, metric)) / float(getattr(n, metric)) for c, n in pairs)

    def errors(self) -> int:
        return sum(r.errors for r in self.nginx + self.casproxy)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "rounds": {"nginx": [r.as_dict() for r in self.nginx], "casproxy": [r.as_dict() for r in self.casproxy]},
            "median": {
                server: {m: self.median(server, m) for m in ("requests_per_s", "mib_per_s", "p99_ms")}
                for server in ("nginx", "casproxy")
            },
            "ratio": {m: self.ratio(m) for m in ("requests_per_s", "mib_per_s", "p99_ms")},
            "errors": self.errors(),
        }


def bench_size(
    label: str,
    hashes: Sequence[str],
    nginx: Server,
    proxy: Server,
    workdir: Path,
    rounds: int,
    duration: float,
    connections: int,
) -> SizeResult:
    script = rotation_script(workdir / f"rotate-{label}.lua", [f"/sha1/{h}" for h in hashes])
    # A short discarded run each: fills nginx's page cache and the proxy's in-memory LRU
    # the way a long-running server would have them.
    for server in (nginx, proxy):
        run_wrk(server.url, script, connections, 1)
    result = SizeResult(label)
    for index in range(rounds):
        for server, runs in ((nginx, result.nginx), (proxy, result.casproxy)):
            run = run_wrk(server.url, script, connections, duration)
            runs.append(run)
            log(
                f"  {label:>6} round {index + 1}/{rounds} {server.name:<8} {run.requests_per_s:>9.0f} req/s "
                f"{run.mib_per_s:>8.1f} MiB/s  p99 {run.p99_ms:>7.2f} ms"
                + (f"  ERRORS {run.errors}" if run.errors else "")
            )
    return result


def bench_hits(
    blobs: dict[str, list[str]],
    nginx: Server,
    proxy: Server,
    workdir: Path,
    rounds: int,
    duration: float,
    connections: int,
) -> list[SizeResult]:
    return [
        bench_size(label, hashes, nginx, proxy, workdir, rounds, duration, connections)
        for label, hashes in blobs.items()
    ]
