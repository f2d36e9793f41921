"""Restart time: from ``casproxy serve`` being spawned to the first 200 for a blob in a disk
cache of a million entries. The cache takes a while to build, so it is kept between runs."""

from __future__ import annotations

import http.client
import json
import shutil
import sqlite3
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diskcache
from harness import PROCESSES, disk_tier, fs_tier, log, sha1_hex, spawn_casproxy, write_casproxy_config

from proxy.tiers.disk.index import RawDisk

CACHE_FORMAT = 1  # bump when the way entries are built changes, to rebuild kept caches
_INSERT = (
    "INSERT INTO Cache(key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value)"
    " VALUES (?, ?, ?, NULL, ?, 0, NULL, 0, ?, NULL, ?)"
)


def entry_value(index: int) -> bytes:
    """Entry ``index``'s bytes: 64 distinct bytes, so the key is the real sha1 of the value."""
    return index.to_bytes(8, "big") * 8


def build_cache(path: Path, entries: int) -> None:
    """A diskcache directory laid out exactly as the disk tier keeps it, with ``entries``
    small blobs stored in SQLite. Rows go in with one executemany in key order and without
    diskcache's per-row count triggers: ~15 s for a million instead of ~90 s through set()."""
    path.mkdir(parents=True, mode=0o700)
    diskcache.Cache(str(path), disk=RawDisk, eviction_policy="least-recently-used", statistics=False).close()
    now = time.time()
    values = {sha1_hex(entry_value(i)): entry_value(i) for i in range(entries)}
    db = sqlite3.connect(path / "cache.db", isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        db.execute("BEGIN")
        triggers = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'Cache'")
        saved = triggers.fetchall()
        for name, _ in saved:
            db.execute(f"DROP TRIGGER {name}")
        rows = ((key, 1, now, now, diskcache.core.MODE_RAW, values[key]) for key in sorted(values))
        db.executemany(_INSERT, rows)
        # Values live in the database, so their size column is 0 and only the count moves.
        db.execute("UPDATE Settings SET value = value + ? WHERE key = 'count'", (entries,))
        for _, sql in saved:
            db.execute(sql)
        db.execute("COMMIT")
    finally:
        db.close()
    with diskcache.Cache(str(path), disk=RawDisk, eviction_policy="least-recently-used", statistics=False) as cache:
        if len(cache) != entries:
            raise RuntimeError(f"built cache has {len(cache)} entries, want {entries}")


def ensure_cache(root: Path, entries: int) -> tuple[Path, float | None]:
    """The kept cache of ``entries`` entries under ``root``; (path, build seconds or None if reused)."""
    path = root / f"restart-{entries}"
    marker = root / f"restart-{entries}.json"
    want = {"entries": entries, "format": CACHE_FORMAT}
    try:
        if json.loads(marker.read_text()) == want and (path / "cache.db").exists():
            return path, None
    except (OSError, ValueError):
        pass
    shutil.rmtree(path, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    log(f"  restart: building a {entries:,}-entry disk cache in {path} (kept for later runs)")
    start = time.perf_counter()
    build_cache(path, entries)
    marker.write_text(json.dumps(want))  # written last: a half-built cache is rebuilt
    return path, time.perf_counter() - start


def _get_once(port: int, path: str) -> tuple[int, bytes] | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except ConnectionRefusedError:
        return None
    finally:
        connection.close()


def time_to_first_200(workdir: Path, cache: Path, index: int, name: str) -> float:
    """Spawn the proxy and poll (2 ms apart) until the blob answers 200 with its bytes."""
    value = entry_value(index)
    digest = sha1_hex(value)
    empty_source = workdir / "restart-source"
    empty_source.mkdir(exist_ok=True)
    config, port = write_casproxy_config(workdir, name, [disk_tier(cache), fs_tier(empty_source)])
    start = time.perf_counter()
    server = spawn_casproxy(workdir, name, config, port)
    try:
        while True:
            answer = _get_once(port, f"/sha1/{digest}")
            elapsed = time.perf_counter() - start
            if answer is not None:
                status, body = answer
                if status != 200 or body != value:
                    raise RuntimeError(f"restart probe: {status} with {len(body)} bytes, want 200 with the blob")
                return elapsed
            if server.proc.poll() is not None or elapsed > 60:
                raise RuntimeError(f"proxy did not answer within {elapsed:.0f}s (exit {server.proc.returncode})")
            time.sleep(0.002)
    finally:
        PROCESSES.stop(server.proc)


@dataclass
class RestartResult:
    entries: int
    seconds: list[float]
    baseline_seconds: list[float]  # the same with a one-entry cache: process start alone
    build_s: float | None
    cache_path: str
    db_bytes: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "median_s": self.median_s,
            "baseline_median_s": statistics.median(self.baseline_seconds),
        }


def measure_restart(workdir: Path, cache_root: Path, entries: int, trials: int) -> RestartResult:
    cache, build_s = ensure_cache(cache_root, entries)
    small = workdir / "restart-small-cache"
    build_cache(small, 1)
    seconds, baseline = [], []
    for trial in range(trials):  # alternate, so drift hits both alike
        seconds.append(time_to_first_200(workdir, cache, entries // 2, f"casproxy-restart-{trial}"))
        baseline.append(time_to_first_200(workdir, small, 0, f"casproxy-restart-small-{trial}"))
    result = RestartResult(entries, seconds, baseline, build_s, str(cache), (cache / "cache.db").stat().st_size)
    log(
        f"  restart: {entries:,} entries: first 200 after {result.median_s * 1e3:.0f} ms (median of {trials}); "
        f"1-entry cache {statistics.median(baseline) * 1e3:.0f} ms"
    )
    return result
