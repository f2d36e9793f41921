"""Processes the benchmark starts (nginx, casproxy, moto), their configs, and the small HTTP
helpers every section shares. Every child is registered so that any exit path stops it."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_PR_SET_PDEATHSIG = 1


def log(message: str) -> None:
    print(message, flush=True)


def free_port() -> int:
    """A loopback port nobody listens on right now (a tiny race we accept for a benchmark)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _die_with_parent() -> None:
    # If the bench is SIGKILLed, its finally blocks never run: have the kernel kill the
    # children instead, so no server is left holding a port or a 1 GiB temp file.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Every child this run started; ``stop_all`` runs from finally, atexit and SIGTERM."""

    def __init__(self) -> None:
        self._running: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                preexec_fn=_die_with_parent,  # spawned from the main thread only (preexec + threads)
            )
        self._running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self._running:
            self._running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._running)):
            self.stop(proc)


PROCESSES = Processes()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_ok(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early (with the log) if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{tail(log_path)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout:g}s:\n{tail(log_path)}")


def vm_peak_rss(pid: int) -> int:
    """VmHWM: the highest resident set size the process has had, in bytes."""
    return _proc_status_kib(pid, "VmHWM") * KiB


def vm_rss(pid: int) -> int:
    return _proc_status_kib(pid, "VmRSS") * KiB


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and all its descendants (nginx's and Varnish's
    workers, casproxy's worker processes), every thread included."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += cpu_seconds(int(child))
    return total


def _proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


# -- nginx -------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


NGINX_CHOICE = (
    "nginx: worker_processes 1 (one process, to match casproxy's single worker), "
    "sendfile on, tcp_nopush on, access_log off, keepalive_requests 1000000, no open_file_cache"
)


def nginx_config(workdir: Path, blobs: Path, port: int) -> str:
    # keepalive_requests is raised because aiohttp never closes a keep-alive connection:
    # nginx's default of 1000 would make it pay reconnects casproxy does not.
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the private temp dir
    temp = workdir / "nginx-temp"
    return f"""{user}worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /sha1/ {{ alias {blobs}/; }}
    }}
}}
"""


def start_nginx(workdir: Path, blobs: Path, probe_hash: str) -> Server:
    port = free_port()
    conf = workdir / "nginx.conf"
    (workdir / "nginx-temp").mkdir(exist_ok=True)
    conf.write_text(nginx_config(workdir, blobs, port))
    log_path = workdir / "nginx.log"
    proc = PROCESSES.spawn(
        ["nginx", "-e", str(workdir / "nginx-startup.log"), "-c", str(conf), "-g", "daemon off;"], log_path
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_ok(f"{url}/sha1/{probe_hash}", proc, log_path)
    return Server("nginx", url, proc, log_path)


# -- casproxy ----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def casproxy_config(port: int, tiers: Sequence[Mapping[str, Any]], upload_targets: Sequence[str]) -> str:
    lines = ["[server]", 'host = "127.0.0.1"', f"port = {port}", "access_log = false", ""]
    for tier in tiers:
        lines.append("[[tiers]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in tier.items())
        lines.append("")
    lines += ["[uploads]", f"targets = {_toml_value(list(upload_targets))}", ""]
    return "\n".join(lines)


def disk_tier(path: Path) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(path), "size_limit": "20 GiB"}


def fs_tier(path: Path) -> dict[str, Any]:
    return {"name": "local", "kind": "fs", "role": "source", "path": str(path)}


def casproxy_command(config: Path) -> list[str]:
    script = Path(sys.executable).with_name("casproxy")
    if script.exists():
        return [str(script), "serve", "-c", str(config)]
    return [sys.executable, "-m", "proxy", "serve", "-c", str(config)]


def child_env() -> dict[str, str]:
    """The bench's environment minus CASPROXY_* (a user's overrides would skew the config),
    plus moto's dummy credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def write_casproxy_config(
    workdir: Path, name: str, tiers: Sequence[Mapping[str, Any]], upload_targets: Sequence[str] = ("local",)
) -> tuple[Path, int]:
    port = free_port()
    path = workdir / f"{name}.toml"
    path.write_text(casproxy_config(port, tiers, upload_targets))
    return path, port


def spawn_casproxy(workdir: Path, name: str, config: Path, port: int, env: Mapping[str, str] | None = None) -> Server:
    """``env``: variables added to child_env()'s."""
    log_path = workdir / f"{name}.log"
    proc = PROCESSES.spawn(casproxy_command(config), log_path, env={**child_env(), **(env or {})})
    return Server(name, f"http://127.0.0.1:{port}", proc, log_path)


def start_casproxy(
    workdir: Path, name: str, tiers: Sequence[Mapping[str, Any]], upload_targets: Sequence[str] = ("local",)
) -> Server:
    config, port = write_casproxy_config(workdir, name, tiers, upload_targets)
    server = spawn_casproxy(workdir, name, config, port)
    wait_until_ok(f"{server.url}/healthz", server.proc, server.log_path)
    return server


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        PROCESSES.stop(server.proc)


def proxy_stats(server: Server) -> dict[str, Any]:
    response = requests.get(f"{server.url}/stats", timeout=10)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats
