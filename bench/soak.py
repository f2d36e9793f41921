"""Memory over time: mixed load on ``workers = 2`` for N minutes, printing each worker's RSS and
open file descriptors once a minute, to see whether they level off (not a timed test).

    .venv/bin/python bench/soak.py --minutes 10
    .venv/bin/python bench/soak.py --minutes 30 --rate 300 --probe   # paced; what grows, per worker

The load, from a few concurrent client loops: GETs of hot blobs (memory and disk hits), GETs and
HEADs of blobs found nowhere (a new digest each time: negative cache entries), uploads of new
blobs (spool, cache fill, queue), first reads of blobs that only the fs source holds (fills),
ranged GETs, and ``POST /sha1/missing``.

``--rate`` paces the clients to about that many requests a second in all (default: as fast as
they go, which takes every core). ``--probe`` loads bench/soak_probe/sitecustomize.py into the
workers: once a minute each writes, to ``probe-PID.txt`` in the work folder, the object types
whose count grew most since minute 1 and (with ``--probe tracemalloc``) the source lines whose
allocations grew most; the workers run slower and larger under tracemalloc.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import random
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from harness import MiB, casproxy_config, disk_tier, free_port, fs_tier, log, running, spawn_casproxy, wait_until_ok


def blob(index: int, size: int) -> tuple[bytes, str]:
    data = hashlib.sha512(f"soak-{index}".encode()).digest() * (size // 64 + 1)
    data = data[:size]
    return data, hashlib.sha1(data).hexdigest()


class Pacer:
    """Spaces the starts of requests, over all client loops, ``1 / rate`` seconds apart."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1 / rate if rate else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        self.next = max(self.next + self.interval, now)  # behind: no burst to catch up
        if self.next > now:
            await asyncio.sleep(self.next - now)


class Load:
    def __init__(self, url: str, source: Path, pacer: Pacer) -> None:
        self.url = url
        self.pacer = pacer
        self.source = source
        self.hot = [blob(i, random.choice([1000, 40_000, 300_000])) for i in range(200)]
        self.fresh = itertools.count(1_000_000)
        self.requests = 0
        self.statuses: dict[int, int] = {}

    def next_fresh(self, size: int) -> tuple[bytes, str]:
        return blob(next(self.fresh), size)

    async def seed(self, session: aiohttp.ClientSession) -> None:
        for data, digest in self.hot:
            async with session.put(f"{self.url}/sha1/{digest}", data=data) as response:
                response.raise_for_status()

    async def one(self, session: aiohttp.ClientSession) -> None:
        await self.pacer.wait()
        roll = random.random()
        if roll < 0.55:  # hot hits
            _, digest = random.choice(self.hot)
            request = session.get(f"{self.url}/sha1/{digest}")
        elif roll < 0.65:  # ranged hit
            _, digest = random.choice(self.hot)
            request = session.get(f"{self.url}/sha1/{digest}", headers={"Range": "bytes=10-99"})
        elif roll < 0.75:  # found nowhere: a negative entry each
            _, digest = self.next_fresh(100)
            request = session.request(random.choice(["GET", "HEAD"]), f"{self.url}/sha1/{digest}")
        elif roll < 0.85:  # upload of a new blob
            data, digest = self.next_fresh(random.choice([2000, 100_000]))
            request = session.put(f"{self.url}/sha1/{digest}", data=data)
        elif roll < 0.95:  # a blob only the source holds: a fill into the disk cache
            data, digest = self.next_fresh(random.choice([5000, 500_000]))
            await asyncio.to_thread((self.source / digest).write_bytes, data)
            request = session.get(f"{self.url}/sha1/{digest}")
        else:
            hashes = [random.choice(self.hot)[1] for _ in range(20)] + [self.next_fresh(10)[1] for _ in range(5)]
            request = session.post(f"{self.url}/sha1/missing", json={"hashes": hashes})
        async with request as response:
            await response.read()
            self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        self.requests += 1

    async def loop(self, session: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            await self.one(session)


def _cells(worker: psutil.Process) -> str:
    memory = worker.memory_info()
    # SQLite maps its database: those pages count in RSS but are the OS's file cache.
    anon = memory.rss - memory.shared
    return f"{memory.rss / MiB:>9.1f} {anon / MiB:>6.1f} {worker.num_fds():>4}"


def workers_of(supervisor: int) -> list[psutil.Process]:
    """The worker processes (not multiprocessing's resource tracker, also a child)."""
    children = psutil.Process(supervisor).children()
    return sorted((p for p in children if "resource_tracker" not in " ".join(p.cmdline())), key=lambda p: p.pid)


async def soak(args: argparse.Namespace, workdir: Path) -> None:
    minutes, concurrency, hot_cache = args.minutes, args.concurrency, args.hot_cache
    source = workdir / "blobs"
    source.mkdir()
    cache = disk_tier(workdir / "cache")
    if hot_cache is not None:
        cache["memory_limit"] = hot_cache
    tiers = [cache, fs_tier(source)]
    config = workdir / "soak.toml"
    port = free_port()
    # As deployed: two workers, and the access log on (one line per request, to the log file).
    server = casproxy_config(port, tiers, ["local"]).replace("access_log = false", "access_log = true")
    config.write_text(server.replace("[server]\n", "[server]\nworkers = 2\n", 1))
    env = None
    if args.probe is not None:
        env = {"PYTHONPATH": str(Path(__file__).with_name("soak_probe")), "SOAK_PROBE_DIR": str(workdir)}
        if args.probe == "tracemalloc":
            env["PYTHONTRACEMALLOC"] = "1"
    server = spawn_casproxy(workdir, "soak", config, port, env)
    with running(server):
        wait_until_ok(f"{server.url}/healthz", server.proc, server.log_path)
        load = Load(server.url, source, Pacer(args.rate))
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            await load.seed(session)
            began = time.monotonic()
            pace = f", paced to {args.rate:g} req/s" if args.rate else ""
            pids = [p.pid for p in workers_of(server.pid)]
            log(f"soak: {minutes:g} min, {concurrency} clients{pace}, workers {pids}")
            titles = [f"{'rss w' + str(i):>9} {'anon':>6} {'fds':>4}" for i in (0, 1)]
            log(f"{'min':>4} {'req/s':>7}  " + "  ".join(titles) + "   (MiB; anon: rss less file-backed pages)")
            done = 0
            for minute in range(1, int(minutes) + 1):
                until = began + minute * 60
                await asyncio.gather(*(load.loop(session, until) for _ in range(concurrency)))
                rate = (load.requests - done) / 60
                done = load.requests
                cells = [_cells(worker) for worker in workers_of(server.pid)]
                log(f"{minute:>4} {rate:>7.0f}  " + "  ".join(cells))
            log(f"statuses: {dict(sorted(load.statuses.items()))}")
    for probe in sorted(workdir.glob("probe-*.txt")):
        log(f"--- {probe.name}\n{probe.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8, help="client loops")
    parser.add_argument(
        "--hot-cache", default=None, help="the disk tier's memory_limit, e.g. '8 MiB' (default: its default)"
    )
    parser.add_argument("--rate", type=float, default=None, help="requests a second in all (default: unpaced)")
    parser.add_argument(
        "--probe",
        nargs="?",
        const="gc",
        choices=["gc", "tracemalloc"],
        help="per worker, once a minute: object types (gc) or source lines (tracemalloc) that grew most",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder, removed after")
    args = parser.parse_args()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(soak(args, args.workdir))
        return
    with tempfile.TemporaryDirectory(prefix="casproxy-soak-", dir=os.environ.get("TMPDIR")) as folder:
        asyncio.run(soak(args, Path(folder)))


if __name__ == "__main__":
    main()
