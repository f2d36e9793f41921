"""A real redis-server on a free port, for tests of state shared between proxies (the
``redis_server`` fixture). It keeps nothing on disk and can be killed, paused, and started again
on the same port mid-test.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port

INSTALL_HINT = "redis-server is not installed: scripts/test installs it (or apt-get install redis-server)"


class RedisServer:
    def __init__(self, executable: str, port: int, folder: Path) -> None:
        self.executable = executable
        self.port = port
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        assert self.process is None, "already running"
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.folder}/redis.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {timeout}s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed, connections drop."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: it still accepts connections (the kernel does) but answers nothing, like
        a Redis stuck in a long command or behind a broken network."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def keys(self, pattern: str = "*") -> dict[str, float]:
        """The keys matching ``pattern`` and their remaining TTL in seconds (-1: none)."""
        with redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True) as client:
            ttls = {key: int(client.pttl(key)) for key in client.keys(pattern)}
        return {key: ttl / 1000 if ttl >= 0 else -1.0 for key, ttl in ttls.items()}


@contextlib.contextmanager
def running_redis(folder: Path) -> Iterator[RedisServer]:
    """A started server (the ``redis_server`` fixture in conftest.py), killed at the end."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(INSTALL_HINT)
    folder.mkdir(parents=True, exist_ok=True)
    server = RedisServer(executable, free_port(), folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()
