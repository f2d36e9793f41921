"""Peak RSS of ``proxy.client.Client.get`` and ``download`` for one large blob.

    .venv/bin/python bench/client_memory.py [--size-mib 200]

Starts ``casproxy serve`` on a free loopback port over a temp folder, uploads one random blob,
then reads it back in a fresh process per way (so each peak is its own) and prints the peak RSS
above the process's RSS before the read, and its ratio to the blob's size.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent

READ = r"""
import re, sys
from pathlib import Path
from proxy.client import Client
def peak() -> int:  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
url, digest, way, out = sys.argv[1:5]
with Client(url) as client:
    client.missing([digest])  # session and loop up before the baseline
    before = peak()
    if way == "get":
        data = client.get(digest)
    else:
        client.download(digest, out)
    after = peak()
print(before, after)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=200)
    size = parser.parse_args().size_mib << 20
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        port = free_port()
        (folder / "config.toml").write_text(
            f'[server]\nport = {port}\naccess_log = false\n[[tiers]]\nname = "disk"\nkind = "disk"\n'
            f'path = "{folder / "cache"}"\nsize_limit = "2 GiB"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")} | {"PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "-c", "config.toml"],
            cwd=folder,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"{url}/healthz", timeout=1)
                    break
                except requests.ConnectionError:
                    assert time.monotonic() < deadline, "casproxy did not start"
                    time.sleep(0.1)
            blob = folder / "blob"
            with blob.open("wb") as out:  # in pieces: this process's memory is not what is measured
                for _ in range(size >> 20):
                    out.write(os.urandom(1 << 20))
            digest = subprocess.check_output(["sha1sum", str(blob)], text=True).split()[0]
            with blob.open("rb") as body:
                assert requests.put(f"{url}/sha1/{digest}", data=body, timeout=120).status_code == 201
            blob.unlink()
            print(f"one blob of {size >> 20} MiB; peak RSS, and its growth during the read")
            for way in ("get", "download"):
                command = [sys.executable, "-c", READ, url, digest, way, str(folder / "out")]
                before, top = map(int, subprocess.check_output(command, env=env, text=True).split())
                grown = top - before
                print(f"  {way:9} peak {top / 1e6:5.0f} MB, {grown / 1e6:5.0f} MB for the read: {grown / size:.2f}x")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
