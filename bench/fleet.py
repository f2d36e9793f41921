"""A fleet missing together: K casproxy instances x M clients over D cold digests behind one slow
origin that counts its fetches, with and without ``coalesce.url``; then the takeover time after
the holder of a claim is killed mid-fill.

    .venv/bin/python bench/fleet.py                                   # 3 x 20 clients, 20 x 1 MiB digests
    .venv/bin/python bench/fleet.py --instances 4 --clients 50 --digests 50 --size 256KiB

Each instance has its own disk cache, then a bucket every instance shares (moto's S3 in its own
process; role cache), then the origin (an aiohttp app in this process answering after
``--origin-delay``, as an API origin would). Every client asks its instance for every digest, in
its own random order, all at once; every body is hashed and checked. The origin's fetches per
digest and the wall time are printed for each mode. A redis-server (from PATH) is started on a
free port for the coalescing run.

Takeover: one more cold digest, asked by every client; the origin holds its first fetch, the
instance that made it is SIGKILLed, and the time from the kill until every client of the other
instances has the right bytes is printed (it is bounded by the claim's lease, 5 s, since a dead
holder is noticed when its lease runs out).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import boto3
from aiohttp import web
from harness import PROCESSES, KiB, MiB, Server, child_env, free_port, log, spawn_casproxy, wait_until_ok
from misses import moto_server

INSTANCE_HEADER = "X-Casproxy-Instance"


@dataclass
class Origin:
    """Counts fetches by digest; answers after ``delay``; holds fetches while ``hold`` is clear."""

    blobs: dict[str, bytes]
    delay: float
    fetches: list[tuple[str, str]] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    hold: asyncio.Event | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["hash"]
        data = self.blobs.get(digest)
        if data is None:
            raise web.HTTPNotFound()
        self.fetches.append((digest, request.headers.get(INSTANCE_HEADER, "?")))
        self.started.set()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[: 64 * KiB])
        if self.hold is not None:
            await self.hold.wait()
        else:
            await asyncio.sleep(self.delay)
        await response.write(data[64 * KiB :])
        return response


@asynccontextmanager
async def serving(origin: Origin) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/blobs/{hash}", origin.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/blobs/{{hash}}"
    finally:
        if origin.hold is not None:
            origin.hold.set()
        await runner.cleanup()


def start_redis(workdir: Path) -> tuple[str, Server]:
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("bench/fleet.py: redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    log_path = workdir / "redis.log"
    args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = PROCESSES.spawn(args, log_path)
    deadline = time.monotonic() + 10
    while "Ready to accept connections" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"redis-server did not start; see {log_path}")
        time.sleep(0.02)
    return f"redis://127.0.0.1:{port}/0", Server("redis", f"redis://127.0.0.1:{port}", proc, log_path)


def start_fleet(workdir: Path, count: int, bucket: str, endpoint: str, origin: str, redis: str | None) -> list[Server]:
    servers = []
    for index in range(count):
        port = free_port()
        home = workdir / f"instance-{index}"
        home.mkdir(parents=True)
        coalesce = f'[coalesce]\nurl = "{redis}"\n' if redis else ""
        config = home / "config.toml"
        config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\naccess_log = false\n{coalesce}'
            f'[[tiers]]\nname = "disk"\nkind = "disk"\nrole = "cache"\npath = "{home / "cache"}"\nmin_free = 0\n'
            f'[[tiers]]\nname = "bucket"\nkind = "s3"\nrole = "cache"\nurl = "s3://{bucket}/"\n'
            f'endpoint_url = "{endpoint}"\nregion = "us-east-1"\n'
            f'[[tiers]]\nname = "origin"\nkind = "http"\nrole = "source"\nurl = "{origin}"\n'
            f'headers = {{ "{INSTANCE_HEADER}" = "{index}" }}\n'
        )
        servers.append(spawn_casproxy(home, f"casproxy-{index}", config, port))
    for server in servers:
        wait_until_ok(f"{server.url}/healthz", server.proc, server.log_path, timeout=60)
    return servers


async def fetch(session: aiohttp.ClientSession, url: str, digest: str) -> bool:
    hasher = hashlib.sha1()
    try:
        async with session.get(f"{url}/sha1/{digest}") as response:
            async for chunk in response.content.iter_chunked(MiB):
                hasher.update(chunk)
            return response.status == 200 and hasher.hexdigest() == digest
    except aiohttp.ClientError:
        return False


async def cold_round(servers: list[Server], clients: int, digests: list[str]) -> tuple[float, int]:
    """Every client of every instance asks for every digest; (wall seconds, wrong or failed)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(url: str) -> int:
            order = random.sample(digests, len(digests))
            return sum([not await fetch(session, url, digest) for digest in order])

        began = time.perf_counter()
        failed = await asyncio.gather(*(client(server.url) for server in servers for _ in range(clients)))
        return time.perf_counter() - began, sum(failed)


async def takeover(servers: list[Server], clients: int, origin: Origin, size: int) -> tuple[float, int, int]:
    """(seconds from the kill until every survivor's client has the blob, wrong answers among
    the survivors' clients, origin fetches of the digest)."""
    data = os.urandom(size)
    digest = hashlib.sha1(data).hexdigest()
    origin.blobs[digest] = data
    origin.hold, origin.started = asyncio.Event(), asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        asks = {
            index: [asyncio.ensure_future(fetch(session, server.url, digest)) for _ in range(clients)]
            for index, server in enumerate(servers)
        }
        await asyncio.wait_for(origin.started.wait(), 60)
        holder = int(origin.fetches[-1][1])
        os.kill(servers[holder].pid, signal.SIGKILL)
        killed = time.perf_counter()
        origin.hold.set()
        survivors = [ask for index, tasks in asks.items() if index != holder for ask in tasks]
        answers = await asyncio.gather(*survivors)
        seconds = time.perf_counter() - killed
        await asyncio.gather(*asks[holder])
    servers[holder].proc.wait()
    return seconds, answers.count(False), sum(1 for fetched, _ in origin.fetches if fetched == digest)


async def run(args: argparse.Namespace, workdir: Path) -> None:
    size = args.size
    with moto_server(workdir, "process") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        redis_url, redis = start_redis(workdir)
        for mode in ("per machine", "coalesce.url"):
            blobs = {hashlib.sha1(data).hexdigest(): data for data in (os.urandom(size) for _ in range(args.digests))}
            origin = Origin(dict(blobs), args.origin_delay)
            bucket = f"fleet-{mode.replace(' ', '-').replace('.', '-')}"
            s3.create_bucket(Bucket=bucket)
            async with serving(origin) as origin_url:
                home = workdir / bucket
                servers = start_fleet(
                    home, args.instances, bucket, endpoint, origin_url, redis_url if mode != "per machine" else None
                )
                try:
                    wall, failed = await cold_round(servers, args.clients, list(blobs))
                    per_digest = Counter(digest for digest, _ in origin.fetches)
                    counts = [per_digest[digest] for digest in blobs]
                    log(
                        f"{mode:>12}: {args.instances} instances x {args.clients} clients x {args.digests} cold "
                        f"digests of {size // KiB} KiB: origin fetches per digest min {min(counts)} "
                        f"mean {statistics.mean(counts):.2f} max {max(counts)}; wall {wall:.2f} s; "
                        f"wrong or failed answers {failed}"
                    )
                    if mode == "coalesce.url":
                        for _ in range(args.takeovers):
                            seconds, wrong, fetches = await takeover(servers, args.clients, origin, size)
                            log(
                                f"    takeover: holder SIGKILLed mid-fill; every survivor's client served "
                                f"{seconds:.2f} s later; origin fetches {fetches}; wrong answers {wrong}"
                            )
                            dead = next(server for server in servers if server.proc.poll() is not None)
                            servers.remove(dead)
                finally:
                    for server in servers:
                        PROCESSES.stop(server.proc)
        PROCESSES.stop(redis.proc)


def parse_size(text: str) -> int:
    units = {"KiB": KiB, "MiB": MiB}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--clients", type=int, default=20, help="per instance")
    parser.add_argument("--digests", type=int, default=20)
    parser.add_argument("--size", type=parse_size, default=MiB, help="bytes, or e.g. 256KiB, 1MiB")
    parser.add_argument("--origin-delay", type=float, default=0.5, help="seconds before the origin's body")
    parser.add_argument("--takeovers", type=int, default=1, help="holders to kill (each leaves one fewer)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args()
    os.environ.update(child_env())
    workdir = Path(tempfile.mkdtemp(prefix="casproxy-fleet-"))
    try:
        asyncio.run(run(args, workdir))
    finally:
        PROCESSES.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
