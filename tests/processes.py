"""A real ``casproxy serve`` in a child process, for tests of what only processes show:
kill -9, restarts, several workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def casproxy(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` run to its end, as an operator runs it: a process of its own (its
    files opened afresh), none of the test's CASPROXY_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}
    command = [sys.executable, "-m", "proxy", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


class ProxyProcess:
    """``python -m proxy serve -c CONFIG`` as a child process, logging to a file."""

    def __init__(self, config: Path, port: int, log: Path, *args: str) -> None:
        self.config = config
        self.args = args
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}
        env["PYTHONPATH"] = str(REPO)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "-c", str(self.config), *self.args],
                cwd=self.config.parent,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_healthy(self, session: aiohttp.ClientSession, limit: float) -> float:
        """Seconds until /healthz answers 200; fails if the process dies or it takes too long."""
        assert self.process is not None
        began = time.monotonic()
        while True:
            assert self.process.poll() is None, f"proxy exited:\n{self.log.read_text()}"
            try:
                async with session.get(f"{self.url}/healthz") as response:
                    if response.status == 200:
                        return time.monotonic() - began
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() - began < limit, f"no /healthz within {limit}s:\n{self.log.read_text()}"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        # pytest shows a test's captured output when it fails: the server's side of the story.
        if self.log.exists():
            print(f"--- {self.log} ---\n{self.log.read_text(errors='replace')[-20_000:]}")
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


async def wait_until(condition: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
