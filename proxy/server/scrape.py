"""``server.metrics_port``: a second listener with only /metrics, /healthz and /readyz.

A sidecar binds its main port to loopback (it answers its own Pod only), yet Prometheus and the
kubelet must reach it from outside: this listener gives them the operational routes and nothing
that reads or writes blobs. It shares the main app's service, so it reports the same store. With
several workers each binds it with SO_REUSEPORT; any of them may answer, and /metrics adds up
every worker anyway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy.errors import ConfigError
from proxy.server import ops
from proxy.server.keys import CONFIG, SERVICE, STORE
from proxy.server.metrics import get_metrics

log = logging.getLogger("casproxy")


def scrape_app(main: web.Application) -> web.Application:
    """The operational routes over the main app's config and service."""
    app = web.Application()
    app[CONFIG], app[SERVICE], app[STORE] = main[CONFIG], main[SERVICE], main[STORE]
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    return app


async def metrics_listener(main: web.Application) -> AsyncIterator[None]:
    """A cleanup context: listens once the service has started, stops before it closes."""
    server = main[CONFIG].server
    runner = web.AppRunner(scrape_app(main), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, server.metrics_host, server.metrics_port, reuse_port=server.workers > 1)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        where = f"{server.metrics_host}:{server.metrics_port}"
        raise ConfigError(f"server.metrics_host/metrics_port: cannot bind {where}: {error.strerror or error}") from None
    log.info("metrics, /healthz and /readyz also on %s", site.name)
    try:
        yield
    finally:
        await runner.cleanup()
