"""The floor under a Python hot hit: a bare asyncio Protocol with httptools answering every
request with prebuilt 4 KiB (no routing, no store, no log, no metrics), pinned like
bench/peers.py pins its servers. What casproxy's fast path costs above it is Python it could
still shed; what this costs is the kernel's and the event loop's share.

    .venv/bin/python bench/floor.py                  # asyncio and uvloop, 3 rounds of 3 s
    .venv/bin/python bench/floor.py --serve PORT asyncio    # (the server itself)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httptools
from harness import PROCESSES, cpu_seconds, free_port, log
from loadgen import parse_wrk

BODY = os.urandom(4096)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\nContent-Type: application/octet-stream\r\n\r\n" + BODY


class Bare(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def on_message_complete(self) -> None:
        self.transport.write(RESPONSE)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Bare, "127.0.0.1", port)
    await server.serve_forever()


def measure(loop: str, rounds: int, seconds: int) -> tuple[float, float]:
    """Median req/s and server CPU µs per request."""
    port = free_port()
    args = ["taskset", "-c", "0", sys.executable, __file__, "--serve", str(port), loop]
    server = PROCESSES.spawn(args, Path(os.devnull))
    deadline = time.monotonic() + 10
    while subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode:
        assert time.monotonic() < deadline, "the bare server did not start"
        time.sleep(0.05)
    rates, costs = [], []
    for _ in range(rounds):
        began = cpu_seconds(server.pid)
        wrk = ["taskset", "-c", "1", "wrk", "-t1", "-c50", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"]
        run = parse_wrk(subprocess.run(wrk, capture_output=True, text=True, check=True).stdout)
        rates.append(run.requests_per_s)
        costs.append((cpu_seconds(server.pid) - began) / run.requests * 1e6)
    PROCESSES.stop(server)
    return statistics.median(rates), statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "LOOP"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        port, loop = int(args.serve[0]), args.serve[1]
        if loop == "uvloop":
            import uvloop

            uvloop.install()
        asyncio.run(serve(port))
        return
    try:
        for loop in ("asyncio", "uvloop"):
            rate, cost = measure(loop, args.rounds, args.seconds)
            log(f"bare httptools protocol on {loop}: {rate:,.0f} req/s, {cost:.1f} µs of server CPU a request")
    finally:
        PROCESSES.stop_all()


if __name__ == "__main__":
    main()
