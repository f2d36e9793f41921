"""casproxy side by side with the tools a user would pick instead, in one run, pinned.

Every server runs on core 0 (``taskset -c 0``); wrk and this script's own client on core 1.
Rounds alternate between servers so that drift on a shared machine hits all alike; every
figure is a median. The peers:

- nginx static: the blob folder served by nginx (1 worker, sendfile, buffered access log);
- nginx proxy_cache and Varnish, each in front of the same nginx origin, which serves the
  blob folder and logs every request (so origin fetches can be counted);
- casproxy as configured by default (access log on, metrics on, fast path on), with a disk
  cache tier and either an fs source on the folder (hits) or an http source to the origin
  (misses); plus casproxy with ``fast_path = false`` to show what the fast path gives.

    .venv/bin/python bench/peers.py            # ~6 minutes
    .venv/bin/python bench/peers.py --quick    # ~2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import requests
from harness import (
    PROCESSES,
    MiB,
    Server,
    child_env,
    cpu_seconds,
    free_port,
    log,
    sha1_hex,
    vm_peak_rss,
    wait_until_ok,
)
from loadgen import rotation_script, run_wrk

SERVER_CPUS = "0"
CLIENT_CPUS = {1}
HIT_SIZES = {"4 KiB": 4 << 10, "1 MiB": MiB, "10 MiB": 10 * MiB}
CASPROXY = Path(sys.executable).with_name("casproxy")


def pinned(args: Sequence[str], cpus: str | None = SERVER_CPUS) -> list[str]:
    return ["taskset", "-c", cpus, *args] if cpus else list(args)


def write_blob(folder: Path, size: int) -> str:
    data = os.urandom(size)
    digest = sha1_hex(data)
    (folder / digest).write_bytes(data)
    return digest


# -- the servers -------------------------------------------------------------------------


def nginx(workdir: Path, name: str, location: str, *, access_log: str, extra_http: str = "") -> Server:
    port = free_port()
    temp = workdir / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = workdir / f"{name}.conf"
    conf.write_text(f"""{user}worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    {extra_http}
    server {{
        listen 127.0.0.1:{port};
        location /sha1/ {{ {location} }}
    }}
}}
""")
    log_path = workdir / f"{name}.log"
    proc = PROCESSES.spawn(pinned(["nginx", "-c", str(conf), "-g", "daemon off;"]), log_path)
    return Server(name, f"http://127.0.0.1:{port}", proc, log_path)


def origin(workdir: Path, blobs: Path) -> Server:
    # Unbuffered access log: the coalescing measure counts the origin's fetches from it.
    return nginx(workdir, "origin", f"alias {blobs}/;", access_log=f"{workdir}/origin-access.log")


def static(workdir: Path, blobs: Path) -> Server:
    return nginx(workdir, "nginx", f"alias {blobs}/;", access_log=f"{workdir}/nginx-access.log combined buffer=64k")


def proxy_cache(workdir: Path, upstream: Server) -> Server:
    cache = workdir / "nginx-proxy-cache"
    return nginx(
        workdir,
        "proxy_cache",
        'proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; '
        "proxy_cache blobs; proxy_cache_valid 200 1h; proxy_cache_lock on; proxy_cache_lock_timeout 60s; "
        "add_header X-Cache $upstream_cache_status;",
        access_log=f"{workdir}/proxy_cache-access.log combined buffer=64k",
        extra_http=(
            f"proxy_cache_path {cache} levels=1:2 keys_zone=blobs:16m max_size=8g inactive=1h use_temp_path=off;\n"
            f"    upstream origin {{ server {upstream.url.removeprefix('http://')}; keepalive 32; }}"
        ),
    )


def varnish(workdir: Path, upstream: Server) -> Server:
    port = free_port()
    log_path = workdir / "varnish.log"
    args = ["varnishd", "-F", "-j", "none", "-n", str(workdir / "varnish"), "-a", f"127.0.0.1:{port}"]
    args += ["-b", upstream.url.removeprefix("http://"), "-s", "malloc,1G", "-p", "default_ttl=3600"]
    proc = PROCESSES.spawn(pinned(args), log_path)
    return Server("varnish", f"http://127.0.0.1:{port}", proc, log_path)


def casproxy(
    workdir: Path,
    name: str,
    source: dict[str, Any],
    cpus: str | None = SERVER_CPUS,
    binary: Path = CASPROXY,
    **server: Any,
) -> Server:
    port = free_port()
    memory = server.pop("memory", {"memory_limit": "512 MiB", "memory_item_limit": "16 MiB"})
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in server.items()]
    disk = {"name": "disk", "kind": "disk", "role": "cache", "path": str(workdir / f"casproxy-{port}-cache"), **memory}
    for tier in (disk, source):
        lines += ["[[tiers]]", *(f"{key} = {json.dumps(value)}" for key, value in tier.items())]
    lines += ["[uploads]", 'targets = ["origin"]' if source["name"] == "origin" else 'targets = ["local"]']
    stem = f"casproxy-{port}"
    config = workdir / f"{stem}.toml"
    config.write_text("\n".join(lines) + "\n")
    log_path = workdir / f"{stem}.log"  # the access log goes here: every request is logged
    proc = PROCESSES.spawn(pinned([str(binary), "serve", "-c", str(config)], cpus), log_path, env=child_env())
    return Server(name, f"http://127.0.0.1:{port}", proc, log_path)


def ready(server: Server, digest: str) -> Server:
    wait_until_ok(f"{server.url}/sha1/{digest}", server.proc, server.log_path)
    return server


# -- measures ----------------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    unit: str
    values: dict[str, float]  # server name -> median
    reference: str  # the server casproxy is compared with; "": the target bounds casproxy's own value
    target: str  # e.g. ">= 0.8" (casproxy / reference, or casproxy's value), "" for information
    higher_is_better: bool = True

    def ratio(self) -> float | None:
        mine, theirs = self.values.get("casproxy"), self.values.get(self.reference)
        return mine / theirs if mine is not None and theirs else None

    def met(self) -> str:
        value = self.ratio() if self.reference else self.values.get("casproxy")
        if not self.target or value is None:
            return "info"
        op, bound = self.target.split()
        ok = value >= float(bound) if op == ">=" else value <= float(bound)
        return "met" if ok else "MISSED"


def wrk_rounds(
    servers: Sequence[Server], paths: Sequence[str], workdir: Path, rounds: int, duration: float, metric: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Medians of ``metric`` and of the server's CPU time per request (µs, its whole process
    tree): on a shared machine the second barely moves when the first swings with the load.
    Logs how busy wrk's core was: near 100 %, the client, not the server, set the pace."""
    script = rotation_script(workdir / f"rotate-{len(paths)}-{paths[0][-8:]}.lua", list(paths))
    for server in servers:  # a discarded warm-up each: page cache, memory caches, connections
        run_wrk_pinned(server.url, script, 1)
    results: dict[str, list[float]] = {s.name: [] for s in servers}
    cpu: dict[str, list[float]] = {s.name: [] for s in servers}
    client: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(rounds):
        for server in servers:
            began, wrk_began = cpu_seconds(server.pid), _children_cpu()
            run = run_wrk_pinned(server.url, script, duration)
            if run.errors:
                log(f"    {server.name}: {run.errors} errors")
            results[server.name].append(getattr(run, metric))
            cpu[server.name].append((cpu_seconds(server.pid) - began) / max(run.requests, 1) * 1e6)
            client[server.name].append((_children_cpu() - wrk_began) / max(round(duration), 1) * 100)
    log("    wrk's core busy: " + ", ".join(f"{name} {busy:.0f} %" for name, busy in _medians(client).items()))
    return _medians(results), _medians(cpu)


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (wrk runs are waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _medians(values: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(numbers) for name, numbers in values.items()}


def run_wrk_pinned(url: str, script: Path, duration: float) -> Any:
    # wrk inherits this process's affinity (core 1): one thread, 50 connections, as in issue 12
    return run_wrk(url, script, 50, duration, threads=1)


def get_timed(session: requests.Session, url: str) -> tuple[float, requests.Response]:
    began = time.perf_counter()
    response = session.get(url, stream=True, timeout=120)
    for _ in response.iter_content(MiB):
        pass
    elapsed = time.perf_counter() - began
    response.raise_for_status()
    return elapsed, response


def sequential_misses(servers: Sequence[Server], blobs: Path, size: int, count: int) -> dict[str, float]:
    """Median ms of one cold GET per fresh blob; servers take turns blob by blob."""
    times: dict[str, list[float]] = {s.name: [] for s in servers}
    sessions = {s.name: requests.Session() for s in servers}
    for server in servers:  # open the keep-alive connections first
        sessions[server.name].get(f"{server.url}/sha1/{'0' * 40}", timeout=10)
    for _ in range(count):
        for server in servers:
            digest = write_blob(blobs, size)
            elapsed, _ = get_timed(sessions[server.name], f"{server.url}/sha1/{digest}")
            times[server.name].append(elapsed * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def big_miss(servers: Sequence[Server], blobs: Path, size: int) -> dict[str, float]:
    """Seconds to the last byte of one cold blob of ``size``, each server its own blob."""
    result = {}
    for server in servers:
        digest = write_blob(blobs, size)
        with requests.Session() as session:
            result[server.name], _ = get_timed(session, f"{server.url}/sha1/{digest}")
    return result


async def _concurrent(url: str, clients: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def one() -> None:
            async with session.get(url) as response:
                assert response.status == 200
                async for _ in response.content.iter_chunked(MiB):
                    pass

        began = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        return time.perf_counter() - began


Medians = dict[str, float]


def coalescing(servers: Sequence[Server], blobs: Path, workdir: Path, clients: int) -> tuple[Medians, Medians]:
    """100 concurrent cold GETs of one 8 MiB blob: wall seconds, and fetches the origin saw."""
    walls, fetches = {}, {}
    for server in servers:
        digest = write_blob(blobs, 8 * MiB)
        walls[server.name] = asyncio.run(_concurrent(f"{server.url}/sha1/{digest}", clients))
        fetches[server.name] = float((workdir / "origin-access.log").read_text().count(digest))
    return walls, fetches


def second_get_hits(server: Server, blobs: Path, count: int) -> float:
    """Of ``count`` fresh 1 MiB blobs, how many second GETs (right after the first completed) were HITs."""
    hits = 0
    with requests.Session() as session:
        for _ in range(count):
            digest = write_blob(blobs, MiB)
            get_timed(session, f"{server.url}/sha1/{digest}")
            _, second = get_timed(session, f"{server.url}/sha1/{digest}")
            hits += second.headers.get("X-Cache") == "HIT"
    return float(hits)


# -- the run -----------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> list[Row]:
    os.sched_setaffinity(0, CLIENT_CPUS)  # this client and the wrk it starts; servers are pinned to core 0
    blobs = workdir / "blobs"
    blobs.mkdir()
    probe = write_blob(blobs, 16)
    quick = args.quick
    rounds, duration = (3, 1.0) if quick else (5, 3.0)
    rows: list[Row] = []
    the_origin = ready(origin(workdir, blobs), probe)
    nginx_static = ready(static(workdir, blobs), probe)
    pcache = ready(proxy_cache(workdir, the_origin), probe)
    varnishd = ready(varnish(workdir, the_origin), probe)
    fs = {"name": "local", "kind": "fs", "role": "source", "path": str(blobs)}
    hot = ready(casproxy(workdir, "casproxy", fs), probe)
    slow = ready(casproxy(workdir, "casproxy fast_path=false", fs, fast_path=False), probe)
    # memory_limit 0: every hit is read from the disk (sendfile, checked alongside)
    disk_only = ready(casproxy(workdir, "casproxy disk", fs, memory={"memory_limit": "0"}), probe)

    log("hot hits (wrk -t1 -c50 on core 1, servers on core 0)")
    for label, size in HIT_SIZES.items():
        paths = [f"/sha1/{write_blob(blobs, size)}" for _ in range(4)]
        metric = "requests_per_s" if size < MiB else "mib_per_s"
        unit = "req/s" if size < MiB else "MiB/s"
        servers = [nginx_static, hot, slow, pcache, varnishd]
        values, cpu = wrk_rounds(servers, paths, workdir, rounds, duration, metric)
        rows.append(
            Row(
                f"hot hit {label}",
                unit,
                _named(values),
                "nginx static",
                {"4 KiB": ">= 0.8", "1 MiB": ">= 1.2", "10 MiB": ">= 1.0"}[label],
            )
        )
        rows.append(Row(f"  server CPU per {label} hit", "µs", _named(cpu), "nginx static", "", False))
        log(f"  {label}: " + ", ".join(f"{k} {v:,.0f} ({cpu[k]:,.0f} µs CPU)" for k, v in values.items()))
    paths = [f"/sha1/{write_blob(blobs, MiB)}" for _ in range(4)]
    values, cpu = wrk_rounds([nginx_static, disk_only], paths, workdir, rounds, duration, "mib_per_s")
    rows.append(
        Row(
            "hit on disk, not in memory, 1 MiB",
            "MiB/s",
            {"nginx static": values["nginx"], "casproxy": values["casproxy disk"]},
            "nginx static",
            ">= 0.8",
        )
    )
    rows.append(
        Row(
            "  server CPU per such hit",
            "µs",
            {"nginx static": cpu["nginx"], "casproxy": cpu["casproxy disk"]},
            "nginx static",
            "",
            False,
        )
    )
    for server in (hot, slow, disk_only, nginx_static):
        PROCESSES.stop(server.proc)

    log("cold misses through an http tier to the nginx origin (sequential, keep-alive client on core 1)")
    http = {"name": "origin", "kind": "http", "role": "source", "url": f"{the_origin.url}/sha1/{{hash}}"}
    miss = ready(casproxy(workdir, "casproxy", http, memory={}), probe)  # default memory limits
    peers = [miss, pcache, varnishd, the_origin]
    for label, size, count in (("4 KiB", 4 << 10, 20 if quick else 100), ("8 MiB", 8 * MiB, 5 if quick else 20)):
        values = sequential_misses(peers, blobs, size, count)
        rows.append(Row(f"cold miss {label}", "ms", _named(values), "nginx proxy_cache", "<= 1.1", False))
        log(f"  {label}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in values.items()))
    values = big_miss(peers, blobs, (64 if quick else 256) * MiB)
    big = "64 MiB" if quick else "256 MiB"
    rows.append(Row(f"cold miss {big}, time to last byte", "s", _named(values), "nginx proxy_cache", "<= 1.1", False))
    rows.append(
        Row(
            f"casproxy peak RSS (after the {big} miss)",
            "MiB",
            {"casproxy": vm_peak_rss(miss.pid) / MiB},
            "",
            "<= 100",
            False,
        )
    )
    walls, fetches = coalescing([miss, pcache, varnishd], blobs, workdir, 100)
    rows.append(Row("100 concurrent cold GETs of 8 MiB: wall", "s", _named(walls), "varnish", "<= 1.0", False))
    rows.append(Row("100 concurrent cold GETs of 8 MiB: origin fetches", "", _named(fetches), "", "<= 1", False))
    count = 10 if quick else 50
    rows.append(
        Row(
            f"second GET of a fresh 1 MiB blob is a HIT (of {count})",
            "",
            {"casproxy": second_get_hits(miss, blobs, count)},
            "",
            f">= {count}",
            True,
        )
    )
    for server in (miss, pcache, varnishd, the_origin):
        PROCESSES.stop(server.proc)

    log("workers: 2 vs 1 on both cores (wrk unpinned too), 4 KiB hot hits")
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    one = ready(casproxy(workdir, "casproxy workers=1", fs, cpus=None), probe)
    two = ready(casproxy(workdir, "casproxy workers=2", fs, cpus=None, workers=2), probe)
    paths = [f"/sha1/{write_blob(blobs, 4 << 10)}" for _ in range(4)]
    values, _ = wrk_rounds([one, two], paths, workdir, rounds, duration, "requests_per_s")
    rows.append(
        Row(
            "4 KiB hot hits, workers=2 vs workers=1",
            "req/s",
            {"casproxy": values["casproxy workers=2"], "workers=1": values["casproxy workers=1"]},
            "workers=1",
            ">= 1.7",
        )
    )
    return rows


def _named(values: dict[str, float]) -> dict[str, float]:
    names = {"origin": "origin direct", "proxy_cache": "nginx proxy_cache", "nginx": "nginx static"}
    return {names.get(k, k): v for k, v in values.items()}


def table(rows: Sequence[Row]) -> str:
    columns = ["casproxy", "casproxy fast_path=false", "nginx static", "nginx proxy_cache", "varnish", "origin direct"]
    columns = [c for c in columns if any(c in r.values for r in rows)] + ["workers=1"]
    head = ["measure", "unit", *columns, "ratio", "target", ""]
    lines = [head]
    for row in rows:
        ratio = row.ratio()
        cells = [_fmt(row.values.get(c)) for c in columns]
        lines.append([row.measure, row.unit, *cells, f"{ratio:.2f}" if ratio else "", row.target, row.met()])
    lines.insert(1, ["---"] * len(head))
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s rounds, fewer blobs, a 64 MiB big miss")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "peers.json"))
    args = parser.parse_args(argv)
    for tool in ("nginx", "varnishd", "wrk", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench/peers.py needs {tool} (scripts/bench installs it)", file=sys.stderr)
            return 1
    workdir = Path(tempfile.mkdtemp(prefix="casproxy-peers-"))
    began = time.monotonic()
    try:
        rows = run(args, workdir)
    finally:
        PROCESSES.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(table(rows))
    print(f"({time.monotonic() - began:.0f} s; servers on core {SERVER_CPUS}, clients on core 1; medians)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps([row.__dict__ for row in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
