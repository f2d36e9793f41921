"""Verification throughput: proxy.store.spool.Spool taking a blob in 1 MiB chunks (it hashes as it
writes, spilling to a temp file past its memory limit) against one hashlib call on the same bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import MiB, log

from proxy.digest import Digest
from proxy.store.spool import Spool


@dataclass
class HashResult:
    size: int
    hashlib_s: list[float]
    # Spool timings by where its temp file lives: "disk" (the temp dir, like the disk tier's
    # spool folder: the measure) and "tmpfs" (/dev/shm: hashing cost without the disk write).
    spool_s: dict[str, list[float]]

    def ratio_for(self, where: str) -> float:
        """Spool throughput as a fraction of hashlib's (1.0 = verifying costs nothing extra)."""
        return statistics.median(self.hashlib_s) / statistics.median(self.spool_s[where])

    @property
    def ratio(self) -> float:
        return self.ratio_for("disk")

    def mib_per_s(self, seconds: list[float]) -> float:
        return self.size / MiB / statistics.median(seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "hashlib_mib_per_s": self.mib_per_s(self.hashlib_s),
            "spool_mib_per_s": {where: self.mib_per_s(s) for where, s in self.spool_s.items()},
            "ratio": {where: self.ratio_for(where) for where in self.spool_s},
        }


async def _spool_once(chunks: Sequence[bytes], digest: Digest, directory: Path) -> float:
    start = time.perf_counter()
    spool = Spool(digest, directory=str(directory))
    try:
        for chunk in chunks:
            await spool.write(chunk)
        await spool.finish()
        elapsed = time.perf_counter() - start
    finally:
        spool.release()  # removes the temp file
    if not spool.verified:
        raise RuntimeError("spool did not verify the buffer")
    return elapsed


def _hashlib_once(buffer: bytes, digest: str) -> float:
    start = time.perf_counter()
    actual = hashlib.sha1(buffer).hexdigest()
    elapsed = time.perf_counter() - start
    if actual != digest:
        raise RuntimeError("hashlib disagrees with itself")
    return elapsed


def measure_hashing(workdir: Path, size: int, rounds: int) -> HashResult:
    buffer = os.urandom(size)
    digest = Digest(hashlib.sha1(buffer).hexdigest())
    chunks = [buffer[offset : offset + MiB] for offset in range(0, size, MiB)]  # sliced before the clock
    directories = {"disk": workdir / "spool-bench"}
    if Path("/dev/shm").is_dir():
        directories["tmpfs"] = Path(tempfile.mkdtemp(prefix="casproxy-bench-", dir="/dev/shm"))
    result = HashResult(size, [], {where: [] for where in directories})
    try:
        for _ in range(rounds):  # interleaved, so drift hits all alike
            result.hashlib_s.append(_hashlib_once(buffer, digest))
            for where, directory in directories.items():
                directory.mkdir(exist_ok=True)
                result.spool_s[where].append(asyncio.run(_spool_once(chunks, digest, directory)))
    finally:
        if "tmpfs" in directories:
            shutil.rmtree(directories["tmpfs"], ignore_errors=True)
    spools = ", ".join(f"{where} {result.mib_per_s(s):.0f} MiB/s" for where, s in result.spool_s.items())
    log(
        f"  hash: hashlib {result.mib_per_s(result.hashlib_s):.0f} MiB/s; Spool with its file on {spools} "
        f"({result.ratio:.2f}x on disk)"
    )
    return result
