"""Peak resident memory (VmHWM) of the proxy: streaming one very large cold blob, and
serving many concurrent hits. Each case gets a fresh process, so VmHWM is its own."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
from harness import MiB, disk_tier, fs_tier, log, running, start_casproxy, vm_peak_rss, vm_rss
from loadgen import rotation_script, run_wrk


@dataclass
class MemoryResult:
    case: str
    peak_rss: int
    rss_at_start: int
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_big_blob(folder: Path, size: int) -> str:
    """A ``size``-byte file named by its sha1, written in blocks (never held whole). A fresh
    random block every 64 MiB is plenty: nothing on the path compresses or dedups."""
    folder.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha1()
    temp = folder / "big.tmp"
    with open(temp, "wb") as out:
        block = b""
        for offset in range(0, size, 4 * MiB):
            if offset % (64 * MiB) == 0:
                block = os.urandom(4 * MiB)
            piece = block[: min(len(block), size - offset)]
            hasher.update(piece)
            out.write(piece)
    digest = hasher.hexdigest()
    temp.rename(folder / digest)
    return digest


def stream_cold(workdir: Path, size: int) -> MemoryResult:
    source = workdir / "big-blobs"
    digest = write_big_blob(source, size)
    tiers = [disk_tier(workdir / "big-cache"), fs_tier(source)]
    with running(start_casproxy(workdir, "casproxy-big", tiers)) as proxy:
        at_start = vm_rss(proxy.pid)
        hasher = hashlib.sha1()
        received = 0
        with requests.get(f"{proxy.url}/sha1/{digest}", stream=True, timeout=600) as response:
            response.raise_for_status()
            cache = response.headers.get("X-Cache")
            for chunk in response.iter_content(MiB):
                hasher.update(chunk)
                received += len(chunk)
        peak = vm_peak_rss(proxy.pid)
    if hasher.hexdigest() != digest or received != size:
        raise RuntimeError(f"1 GiB stream: got {received} bytes hashing to {hasher.hexdigest()}, want {digest}")
    # Give the 1 GiB back before the next section (the cache holds a hard link to it).
    os.unlink(source / digest)
    shutil.rmtree(workdir / "big-cache", ignore_errors=True)
    log(f"  memory: streaming {size / MiB:.0f} MiB cold ({cache}): peak RSS {peak / MiB:.1f} MiB")
    return MemoryResult("stream_cold", peak, at_start, {"size": size, "x_cache": cache})


def concurrent_hits(
    workdir: Path, blobs: Path, cache: Path, hashes: Sequence[str], connections: int, duration: float
) -> MemoryResult:
    """A fresh process on the warm hit cache, then wrk with ``connections`` clients."""
    tiers = [disk_tier(cache), fs_tier(blobs)]
    with running(start_casproxy(workdir, "casproxy-mem", tiers)) as proxy:
        at_start = vm_rss(proxy.pid)
        script = rotation_script(workdir / "rotate-memory.lua", [f"/sha1/{h}" for h in hashes])
        result = run_wrk(proxy.url, script, connections, duration)
        peak = vm_peak_rss(proxy.pid)
    log(
        f"  memory: {connections} clients of 1 MiB hits: peak RSS {peak / MiB:.1f} MiB "
        f"({result.requests_per_s:.0f} req/s, errors {result.errors})"
    )
    return MemoryResult("concurrent_hits", peak, at_start, {"connections": connections, "wrk": result.as_dict()})
