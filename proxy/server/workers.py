"""Running the server: one process, or ``server.workers = N`` processes on one port.

Each worker is a whole server (its own event loop, tiers, memory hot cache) bound with
SO_REUSEPORT, so the kernel spreads connections over them. They share what is on disk: the disk
cache, its fill locks (proxy.store.fill_locks: one upstream fetch per hash for all of them), the
replication queue, and prometheus-client's multiprocess files, so any worker's /metrics reports
them all. The parent only starts the workers, restarts one that dies, and stops them on SIGTERM
or SIGINT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any

from proxy import __version__
from proxy.config import Config
from proxy.errors import ConfigError

log = logging.getLogger("casproxy")
CONFIG_ERROR_EXIT = 2  # a worker that cannot start for a config reason: restarting will not help
_RESTART_DELAY_MAX = 30.0  # seconds between restarts of a worker that keeps dying at once
_STOP_GRACE = 30.0  # seconds workers get to finish their requests after SIGTERM


def setup_logging(config: Config) -> None:
    from proxy.server.accesslog import JsonFormatter, UtcFormatter, queued

    handler = logging.StreamHandler(sys.stderr)
    if config.server.log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif config.server.workers > 1:  # say which worker said it
        handler.setFormatter(UtcFormatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(UtcFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[queued(handler)])  # written off the event loop


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("server.event_loop = 'uvloop' but uvloop is not installed") from None
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def bind(config: Config, reuse_port: bool = False) -> socket.socket:
    """The listening socket, or a config error naming server.host/port (e.g. in use)."""
    host, port = config.server.host, config.server.port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as error:
        raise ConfigError(f"server.host/port: cannot bind {host}:{port}: {error.strerror or error}") from None
    sock.setblocking(False)
    return sock


def run_server(config: Config, reuse_port: bool = False, announce: str = "serving") -> None:
    """Serve in this process until SIGTERM or SIGINT. The start-up, in order: bind, start the
    tiers (the app's startup), then say "serving on" with the real address."""
    sock = bind(config, reuse_port)
    loop = new_event_loop(config.server.event_loop)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(config, sock, announce))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _serve(config: Config, sock: socket.socket, announce: str) -> None:
    from aiohttp import web

    from proxy.server.accesslog import AccessLogger, JsonAccessLogger
    from proxy.server.app import create_app
    from proxy.server.fastpath import make_runner

    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    logger: Any = JsonAccessLogger if config.server.log_format == "json" else AccessLogger
    # An AppRunner, not web.run_app: the fast path's runner puts its protocol in front of aiohttp's.
    runner = make_runner(
        create_app(config),
        config,
        access_log_class=logger,
        access_log=logging.getLogger("casproxy.access") if config.server.access_log else None,
    )
    # Handlers first: a SIGTERM while the tiers start is a clean stop too, not a kill.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await runner.setup()  # starts the tiers
    try:
        await web.SockSite(runner, sock).start()
        if not stop.is_set():
            log.info("casproxy %s %s on %s (config: %s)", __version__, announce, url, config.source)
        await stop.wait()
    finally:
        await runner.cleanup()  # finishes the requests in flight, then closes the tiers


def serve(config: Config) -> int:
    setup_logging(config)
    if config.source == "built-in defaults":
        paths = {tier.name: tier.options.get("path") for tier in config.tiers}
        folders = ", ".join(f"{name}: {os.path.abspath(path)}" for name, path in paths.items() if path)
        log.info("no config file (./config.toml, $CASPROXY_CONFIG, -c): built-in defaults; writing to %s", folders)
    if config.server.workers <= 1:
        run_server(config)
        return 0
    return Supervisor(config).run()


def _worker_main(config: Config, index: int) -> None:
    setup_logging(config)
    logging.getLogger("casproxy").info("worker %d (pid %d) starting", index, os.getpid())
    try:
        run_server(config, reuse_port=True, announce=f"worker {index} serving")
    except ConfigError as error:
        print(f"casproxy: config error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    except OSError as error:  # e.g. the port is taken by a process that is not ours
        print(f"casproxy: worker {index}: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: dict[int, BaseProcess] = {}
        self.restarts: dict[int, float] = {}  # index -> delay before its next restart
        self.stopping = False
        # spawn, not fork: a worker starts with a fresh interpreter, no threads or loops
        # inherited from the parent, and imports prometheus-client with the variable below set.
        self._context = multiprocessing.get_context("spawn")
        self.metrics_dir = tempfile.mkdtemp(prefix="casproxy-metrics-")

    def run(self) -> int:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        try:
            self._check_port()
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._stop)
            for index in range(self.config.server.workers):
                self._start(index)
            return self._watch()
        finally:
            self._stop_all()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _check_port(self) -> None:
        """Fail at once, in one line, if the port is taken (workers would each fail alone); for
        port 0, choose the one port all workers share."""
        with bind(self.config, reuse_port=True) as probe:
            port = probe.getsockname()[1]
        self.config = dataclasses.replace(self.config, server=dataclasses.replace(self.config.server, port=port))
        log.info(
            "casproxy %s starting %d workers (config: %s)", __version__, self.config.server.workers, self.config.source
        )

    def _start(self, index: int) -> None:
        process = self._context.Process(target=_worker_main, args=(self.config, index), name=f"casproxy-worker-{index}")
        process.start()
        self.workers[index] = process

    def _watch(self) -> int:
        started = {index: time.monotonic() for index in self.workers}
        while not self.stopping:
            sentinels = {process.sentinel: index for index, process in self.workers.items()}
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=1.0):
                index = sentinels[sentinel]  # type: ignore[index]
                process = self.workers[index]
                process.join()
                self._forget(process)
                if self.stopping:
                    break
                if process.exitcode == CONFIG_ERROR_EXIT:
                    log.error("worker %d could not start (see above); stopping", index)
                    return CONFIG_ERROR_EXIT
                # A worker that dies soon after starting is restarted ever more slowly.
                quick = time.monotonic() - started[index] < 10
                delay = min(_RESTART_DELAY_MAX, self.restarts.get(index, 0.5) * 2) if quick else 0.5
                self.restarts[index] = delay
                log.error(
                    "worker %d (pid %s) exited with %s; restarting in %.1fs",
                    index,
                    process.pid,
                    process.exitcode,
                    delay,
                )
                self._sleep(delay)
                if not self.stopping:
                    self._start(index)
                    started[index] = time.monotonic()
        return 0

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        for process in self.workers.values():
            if process.is_alive():
                process.terminate()  # SIGTERM: aiohttp finishes the requests in flight
        deadline = time.monotonic() + _STOP_GRACE
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            self._forget(process)

    def _forget(self, process: BaseProcess) -> None:
        """Drop a dead worker's live gauges (breaker state) from the aggregate."""
        if process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
