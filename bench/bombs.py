"""Peak memory of a real ``casproxy serve`` fed compression bombs (issue 11 item 10).

    python bench/bombs.py [REPO]     # REPO: the checkout to run (default: this one)

Prints the server's resident set before and its peak (VmHWM) after each bomb, and the answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import requests

MiB = 1 << 20


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise LookupError(field)


def bomb(decoded: int) -> bytes:
    """One gzip member (concatenated members are refused as trailing data)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(64 * MiB)
    return b"".join(compressor.compress(zeros) for _ in range(decoded // len(zeros))) + compressor.flush()


def main() -> None:
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (Path(tmp) / "local").mkdir()
        Path(tmp, "config.toml").write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {port}\nmax_upload_size = "256 MiB"\n'
            '[uploads]\ntargets = ["local"]\n[auth]\nupload_tokens = ["up"]\n'
            f'[[tiers]]\nname = "disk"\nkind = "disk"\nrole = "cache"\npath = "{tmp}/cache"\n'
            f'[[tiers]]\nname = "local"\nkind = "fs"\npath = "{tmp}/local"\n'
        )
        env = {**os.environ, "PYTHONPATH": str(repo)}
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "-c", f"{tmp}/config.toml"],
            cwd=repo,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if requests.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.05)
            print(f"{repo}: idle RSS {rss(server.pid, 'VmRSS')} MiB", flush=True)
            up = {"Authorization": "Bearer up"}
            slot = requests.post(f"{base}/bulk-data", json={"content_encoding": "gzip"}, headers=up, timeout=10)
            post = slot.json()[0]["presignedPost"]
            body = bomb(2048 * MiB)
            began = time.monotonic()
            answer = requests.post(
                post["url"], data=json.loads(post["fields"]), files={"file": ("b", body)}, timeout=120
            )
            print(
                f"bulk form POST, {len(body) / MiB:.1f} MiB gzip -> 2 GiB: {answer.status_code} in "
                f"{time.monotonic() - began:.1f}s, peak RSS {rss(server.pid, 'VmHWM')} MiB",
                flush=True,
            )
            body = bomb(10240 * MiB)
            began = time.monotonic()
            answer = requests.put(
                f"{base}/sha1/{'0' * 40}", data=body, headers={**up, "Content-Encoding": "gzip"}, timeout=120
            )
            print(
                f"PUT, {len(body) / MiB:.1f} MiB gzip -> 10 GiB, max_upload_size 256 MiB: {answer.status_code} in "
                f"{time.monotonic() - began:.1f}s, peak RSS {rss(server.pid, 'VmHWM')} MiB",
                flush=True,
            )
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
