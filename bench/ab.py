"""Hot hits, checkout A against checkout B (and nginx static), in alternating pinned rounds:
what a change to the hit path gives, in req/s and in server CPU per request.

    .venv/bin/python bench/ab.py --size 4KiB before=/path/to/main after=.
    .venv/bin/python bench/ab.py --size 1MiB --nginx --disk memory_limit=0 main=/work/main mine=.
    .venv/bin/python bench/ab.py 'uvloop=.@event_loop="uvloop"' asyncio=.
    .venv/bin/python bench/ab.py --mix 100 before=/path/to/main after=.

``--mix N`` makes one request in N one for a blob nobody has (aiohttp's 404), as a client
checking for blobs between its reads: each such request is aiohttp's to answer on that
keep-alive connection, and the hits after it show what the connection costs from then on.

Each NAME=CHECKOUT[@KEY=VALUE,...] runs ``CHECKOUT/.venv/bin/casproxy serve`` (its own virtualenv,
so its own code) as bench/peers.py runs casproxy (an fs source, a disk cache, the access log
on), with the ``[server]`` keys given; ``--disk KEY=VALUE`` sets disk tier options (default:
the tier's defaults). Servers on core 0, wrk (``-t1 -c50``) on core 1; medians of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import peers
from harness import PROCESSES, Server, cpu_seconds, log, start_nginx, wait_until_ok
from loadgen import rotation_script, run_wrk
from peers import write_blob

from proxy.units import parse_size


def toml_values(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, each VALUE a TOML value (2, false, "uvloop", "16 MiB")."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        try:
            if not equals:
                raise ValueError("no '='")
            values[key] = tomllib.loads(f"value = {value}")["value"]
        except (ValueError, tomllib.TOMLDecodeError) as error:
            want = "KEY=VALUE, VALUE a TOML value such as 2, false or '\"16 MiB\"'"
            raise SystemExit(f"ab.py: {pair!r}: want {want} ({error})") from None
    return values


def casproxy(workdir: Path, spec: str, blobs: Path, disk: dict[str, Any]) -> Server:
    """NAME=CHECKOUT[@KEY=VALUE,...]: that checkout's own casproxy, as peers.py starts one."""
    name, _, rest = spec.partition("=")
    checkout, _, keys = rest.partition("@")
    source = {"name": "local", "kind": "fs", "role": "source", "path": str(blobs)}
    binary = Path(checkout).resolve() / ".venv" / "bin" / "casproxy"
    server = toml_values([pair for pair in keys.split(",") if pair])
    return peers.casproxy(workdir, name, source, binary=binary, memory=disk, **server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("servers", nargs="+", metavar="NAME=CHECKOUT[@KEY=VALUE,...]")
    parser.add_argument("--size", default="4KiB", help="blob size (default 4KiB)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--nginx", action="store_true", help="also nginx static on the same files, first")
    parser.add_argument("--mix", type=int, default=0, metavar="N", help="one request in N a 404 (0: none)")
    parser.add_argument(
        "--disk", action="append", default=[], metavar="KEY=VALUE", help="a disk tier option, e.g. memory_limit=0"
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # wrk inherits core 1
    with tempfile.TemporaryDirectory(prefix="casproxy-ab-") as folder:
        workdir = Path(folder)
        blobs = workdir / "blobs"
        blobs.mkdir()
        hashes = [write_blob(blobs, parse_size(args.size)) for _ in range(4)]
        try:
            servers = [start_nginx(workdir, blobs, hashes[0])] if args.nginx else []
            servers += [casproxy(workdir, spec, blobs, toml_values(args.disk)) for spec in args.servers]
            for server in servers:
                wait_until_ok(f"{server.url}/sha1/{hashes[0]}", server.proc, server.log_path)
            paths = [f"/sha1/{h}" for h in hashes]
            if args.mix:  # N-1 hits in turn, then one blob nobody has
                paths = [paths[i % len(paths)] for i in range(args.mix - 1)] + [f"/sha1/{'0' * 40}"]
            script = rotation_script(workdir / "rotate.lua", paths)
            for server in servers:  # a warm-up each: memory caches, page cache, connections
                run_wrk(server.url, script, 50, 1, threads=1)
            rates: dict[str, list[float]] = {s.name: [] for s in servers}
            costs: dict[str, list[float]] = {s.name: [] for s in servers}
            for _ in range(args.rounds):
                for server in servers:
                    began = cpu_seconds(server.pid)
                    run = run_wrk(server.url, script, 50, args.seconds, threads=1)
                    rates[server.name].append(run.requests_per_s)
                    costs[server.name].append((cpu_seconds(server.pid) - began) / max(run.requests, 1) * 1e6)
            first = statistics.median(rates[servers[0].name])
            for server in servers:
                rate, cost = statistics.median(rates[server.name]), statistics.median(costs[server.name])
                mib = rate * parse_size(args.size) / (1 << 20)
                ratio = rate / first
                log(f"{server.name:>12}: {rate:10,.0f} req/s {mib:8,.0f} MiB/s ({ratio:.2f}x), {cost:.1f} µs CPU a hit")
        finally:
            PROCESSES.stop_all()


if __name__ == "__main__":
    main()
