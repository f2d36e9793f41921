"""casproxy benchmark: one command, every measure, one table with the targets.

    .venv/bin/python bench/run.py            # full run, ~5 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # short run, under 2 minutes
    .venv/bin/python bench/run.py --only hits,restart

See bench/README.md for what each measure means and how to read it.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import requests
from harness import (
    NGINX_CHOICE,
    PROCESSES,
    GiB,
    MiB,
    disk_tier,
    fs_tier,
    log,
    running,
    start_casproxy,
    start_nginx,
)
from hashing import HashResult, measure_hashing
from hits import SizeResult, bench_hits, make_blobs, warm
from memory import MemoryResult, concurrent_hits, stream_cold
from misses import (
    BUCKET,
    MISS_SIZES,
    CoalesceResult,
    MissResult,
    measure_coalescing,
    measure_misses,
    moto_server,
    s3_client,
    s3_proxy_tiers,
    upload,
)
from pyspy import profile_hits
from report import Measure, measure, print_hits, print_measures, write_json
from restart import RestartResult, measure_restart

BENCH_DIR = Path(__file__).resolve().parent
SECTIONS = ("hits", "memory", "miss", "coalesce", "restart", "hash")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: 2 s rounds, fewer blobs and trials")
    parser.add_argument("--rounds", type=int, help="wrk rounds per server and size (default 3; at least 3)")
    parser.add_argument("--duration", type=float, help="seconds per wrk round (default 10, quick 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for hit rounds (default 32)")
    parser.add_argument("--blobs-per-size", type=int, default=4, help="distinct blobs per hit size (default 4)")
    parser.add_argument("--miss-count", type=int, help="cold blobs per size in the miss test (default 20, quick 5)")
    parser.add_argument("--coalesce-clients", type=int, default=100, help="concurrent cold GETs (default 100)")
    parser.add_argument("--coalesce-trials", type=int, help="coalescing trials (default 3, quick 1)")
    parser.add_argument("--memory-clients", type=int, default=200, help="wrk connections for the RSS test")
    parser.add_argument("--stream-size", type=int, default=1, help="GiB streamed cold in the RSS test (default 1)")
    parser.add_argument("--restart-entries", type=int, default=1_000_000, help="disk cache entries (default 1M)")
    parser.add_argument("--restart-trials", type=int, default=3)
    parser.add_argument(
        "--cache-dir", type=Path, default=BENCH_DIR / ".cache", help="where the restart cache is kept between runs"
    )
    parser.add_argument(
        "--moto",
        choices=("process", "thread"),
        default="process",
        help="moto S3 in its own process (default) or in a thread of this one",
    )
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--profile", action="store_true", help="also py-spy the proxy under 4 KiB hits (not timed)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "latest.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    args = parser.parse_args(argv)
    args.rounds = max(3, args.rounds or 3)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.miss_count = args.miss_count or (5 if args.quick else 20)
    args.coalesce_trials = args.coalesce_trials or (1 if args.quick else 3)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


# -- sections ----------------------------------------------------------------------------


class Run:
    """One benchmark run: its options, temp dir, and what each section produced."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.blobs_dir = workdir / "blobs"
        self.hit_cache = workdir / "cache"
        self.blobs: dict[str, list[str]] = {}
        self.hit_cache_warm = False

    def wants(self, section: str) -> bool:
        return section in self.args.sections

    def section(self, name: str, body: Callable[[], Any]) -> None:
        """Run one section; a failure is recorded and the next section still runs."""
        if not self.wants(name):
            return
        log(f"\n== {name}")
        start = time.perf_counter()
        try:
            self.results[name] = body()
        except Exception as error:  # noqa: BLE001 - one broken section must not hide the others
            self.errors[name] = f"{type(error).__name__}: {error}"
            log(f"  FAILED: {self.errors[name]}\n{traceback.format_exc()}")
        log(f"  ({time.perf_counter() - start:.0f} s)")

    def hits(self) -> list[SizeResult]:
        args = self.args
        log(f"  {NGINX_CHOICE}")
        log("  casproxy: 1 worker, access_log=false, disk tier then fs source on the same folder as nginx")
        nginx = start_nginx(self.workdir, self.blobs_dir, self.blobs["4KiB"][0])
        proxy = start_casproxy(self.workdir, "casproxy", [disk_tier(self.hit_cache), fs_tier(self.blobs_dir)])
        with running(nginx), running(proxy):
            warm(proxy, [h for hashes in self.blobs.values() for h in hashes])
            self.hit_cache_warm = True
            results = bench_hits(self.blobs, nginx, proxy, self.workdir, args.rounds, args.duration, args.connections)
            if args.profile:
                out = self.args.output.parent / "profile-4KiB.txt"
                profile_hits(proxy, self.blobs["4KiB"], self.workdir, out, args.connections, 10)
        return results

    def memory(self) -> list[MemoryResult]:
        if not self.hit_cache_warm:  # --only memory: fill the hit cache with a throwaway process
            with running(
                start_casproxy(self.workdir, "casproxy-warm", [disk_tier(self.hit_cache), fs_tier(self.blobs_dir)])
            ) as proxy:
                warm(proxy, self.blobs["1MiB"])
        seconds = 3 if self.args.quick else 5
        return [
            stream_cold(self.workdir, self.args.stream_size * GiB),
            concurrent_hits(
                self.workdir, self.blobs_dir, self.hit_cache, self.blobs["1MiB"], self.args.memory_clients, seconds
            ),
        ]

    def s3_sections(self) -> None:
        """Miss overhead and coalescing share one moto server and one S3-backed proxy."""
        if not (self.wants("miss") or self.wants("coalesce")):
            return
        log(f"\n== S3 (moto in a {self.args.moto})")
        with moto_server(self.workdir, self.args.moto) as endpoint:
            client = s3_client(endpoint)
            client.create_bucket(Bucket=BUCKET)
            tiers = s3_proxy_tiers(self.workdir, endpoint, "casproxy-s3")
            with running(start_casproxy(self.workdir, "casproxy-s3", tiers, upload_targets=["s3"])) as proxy:
                self.section("miss", lambda: self.misses(proxy, client))
                self.section("coalesce", lambda: self.coalesce(proxy, client))

    def misses(self, proxy: Any, client: Any) -> list[MissResult]:
        results = []
        for label, size in MISS_SIZES.items():
            hashes = upload(client, size, self.args.miss_count)
            results.append(measure_misses(proxy, client, label, hashes))
        return results

    def coalesce(self, proxy: Any, client: Any) -> list[CoalesceResult]:
        results = []
        for _ in range(self.args.coalesce_trials):
            single, many = upload(client, 8 * MiB, 2)
            results.append(measure_coalescing(proxy, (single, many), self.args.coalesce_clients))
        return results

    def run(self) -> None:
        if self.wants("hits") or self.wants("memory"):
            self.blobs = make_blobs(self.blobs_dir, self.args.blobs_per_size)
        self.section("hits", self.hits)
        self.section("memory", self.memory)
        self.s3_sections()
        self.section(
            "restart",
            lambda: measure_restart(
                self.workdir, self.args.cache_dir, self.args.restart_entries, self.args.restart_trials
            ),
        )
        self.section("hash", lambda: measure_hashing(self.workdir, 256 * MiB, 3))


# -- summary -----------------------------------------------------------------------------


def summarize(run: Run) -> list[Measure]:
    args = run.args
    return [*_hit_measures(run.results.get("hits")), *_other_measures(run.results, args)]


def _hit_measures(results: list[SizeResult] | None) -> list[Measure]:
    by_size = {r.size: r for r in results or []}
    measures = []
    for size, metric, unit, limit in (
        ("4KiB", "requests_per_s", "req/s", 0.5),
        ("100KiB", "requests_per_s", "req/s", 0.5),
        ("1MiB", "mib_per_s", "MiB/s", 1.0),
        ("10MiB", "mib_per_s", "MiB/s", 1.0),
    ):
        r = by_size.get(size)
        value = r.ratio(metric) if r else None
        shown = f"{value:.2f}x ({r.median('casproxy', metric):.0f} vs {r.median('nginx', metric):.0f})" if r else ""
        label = f"{size} hits: {unit} casproxy/nginx"
        measures.append(measure(f"hit_{size}", label, value, shown, (">=", limit, "x")))
    return measures


def _other_measures(results: dict[str, Any], args: argparse.Namespace) -> list[Measure]:
    measures = []
    misses = {m.size: m for m in results.get("miss", [])}
    for size in MISS_SIZES:
        m = misses.get(size)
        value = m.ratio_total if m else None
        shown = f"{value:.2f}x ({sum(m.proxy_s):.2f} s vs {sum(m.direct_s):.2f} s)" if m else ""
        label = f"miss {size} x{args.miss_count}: casproxy/boto3 time"
        measures.append(measure(f"miss_{size}", label, value, shown, ("<=", 1.15, "x")))
    measures += _coalesce_measures(results.get("coalesce"), args.coalesce_clients)
    memory = {m.case: m for m in results.get("memory", [])}
    stream = memory.get("stream_cold")
    value = stream.peak_rss / MiB if stream else None
    label = f"peak RSS streaming {args.stream_size} GiB cold"
    shown = f"{value:.1f} MiB" if value is not None else ""
    measures.append(measure("rss_stream", label, value, shown, ("<=", 150, " MiB")))
    hits = memory.get("concurrent_hits")
    value = hits.peak_rss / MiB if hits else None
    label = f"peak RSS, {args.memory_clients} clients of 1 MiB hits"
    shown = f"{value:.1f} MiB" if value is not None else ""
    measures.append(measure("rss_hits", label, value, shown))
    restart: RestartResult | None = results.get("restart")
    value = restart.median_s if restart else None
    label = f"restart, {args.restart_entries:,} entries: first 200"
    shown = ""
    if restart:
        baseline = statistics.median(restart.baseline_seconds)
        shown = f"{restart.median_s * 1e3:.0f} ms (1-entry cache {baseline * 1e3:.0f} ms)"
    measures.append(measure("restart", label, value, shown, ("<", 1, " s")))
    hashing: HashResult | None = results.get("hash")
    value = hashing.ratio if hashing else None
    shown = f"{value:.2f}x" if hashing else ""
    measures.append(measure("hash", "verification: Spool/hashlib throughput", value, shown, (">=", 0.9, "x")))
    # The same with the spool file on tmpfs: what hashing costs without the disk write.
    tmpfs = hashing.ratio_for("tmpfs") if hashing and "tmpfs" in hashing.spool_s else None
    shown = f"{tmpfs:.2f}x" if tmpfs is not None else ""
    measures.append(measure("hash_tmpfs", "verification, spool file on tmpfs", tmpfs, shown))
    return measures


def _coalesce_measures(results: list[CoalesceResult] | None, clients: int) -> list[Measure]:
    hot_ratio = None
    shown_hot = ""
    if not results:
        fetches = ratio = None
        shown_fetches = shown_ratio = ""
    else:
        # Context for the wall target: the same clients reading the blob once it is cached,
        # i.e. what moving the bytes costs without any upstream fetch.
        hot_ratio = statistics.median(r.wall_concurrent_s / r.wall_concurrent_hits_s for r in results)
        hot = statistics.median(r.wall_concurrent_hits_s for r in results) * 1e3
        shown_hot = f"{hot_ratio:.2f}x (hot wall {hot:.0f} ms)"
        fetches = float(max(r.upstream_fetches for r in results))
        ratio = statistics.median(r.ratio for r in results)
        shown_fetches = ", ".join(str(r.upstream_fetches) for r in results) + f" (max of {len(results)})"
        wall = statistics.median(r.wall_concurrent_s for r in results) * 1e3
        single = statistics.median(r.wall_single_s for r in results) * 1e3
        shown_ratio = f"{ratio:.2f}x ({wall:.0f} ms vs {single:.0f} ms)"
    return [
        measure("coalesce_fetches", f"{clients} cold GETs: upstream fetches", fetches, shown_fetches, ("==", 1, "")),
        measure("coalesce_wall", f"{clients} cold GETs: wall / one cold GET", ratio, shown_ratio, ("<=", 1.5, "x")),
        measure("coalesce_vs_hot", f"{clients} cold GETs: wall / {clients} hot GETs", hot_ratio, shown_hot),
    ]


# -- the run -----------------------------------------------------------------------------


def _version(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "--version"]),
        "git_commit": _version(["git", "-C", str(BENCH_DIR), "rev-parse", "HEAD"]),
        "requests": getattr(requests, "__version__", "?"),
        "nginx_config": NGINX_CHOICE,
    }


def _check_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install -y nginx wrk")


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP become SystemExit so that finally blocks stop every child process.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _check_tools()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    atexit.register(PROCESSES.stop_all)
    workdir = Path(tempfile.mkdtemp(prefix="casproxy-bench-"))
    started = datetime.datetime.now(datetime.UTC)
    log(f"casproxy bench: temp dir {workdir}; sections {', '.join(args.sections)}")
    run = Run(args, workdir)
    try:
        run.run()
    finally:
        PROCESSES.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    measures = summarize(run)
    if "hits" in run.results:
        print_hits(run.results["hits"], args.connections, args.duration)
    print_measures(measures)
    payload = {
        "started": started.isoformat(),
        "seconds": (datetime.datetime.now(datetime.UTC) - started).total_seconds(),
        "argv": sys.argv,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(),
        "moto": args.moto,
        "summary": {m.key: m.as_dict() for m in measures},
        "results": {name: _as_json(value) for name, value in run.results.items()},
        "errors": run.errors,
    }
    write_json(args.output, payload)
    log(f"\nwrote {args.output}" + (f"; FAILED sections: {', '.join(run.errors)}" if run.errors else ""))
    return 1 if run.errors else 0


def _as_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_as_json(v) for v in value]
    as_dict = getattr(value, "as_dict", None)
    return as_dict() if callable(as_dict) else value


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # children are already stopped by main's finally
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
