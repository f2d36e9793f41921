"""Health, readiness, statistics."""

from __future__ import annotations

import dataclasses
import os
import time

from aiohttp import web

from proxy import __version__
from proxy.server.keys import SERVICE, STORE

_STARTED = time.time()  # imported as the server starts: its uptime


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every cache tier can be written and none has its breaker open; the body
    shows every tier's breaker either way.

    An open breaker on a source tier does not make this instance unready: instances share
    their sources, so taking this one out of rotation would not help, and with all of them out
    the hits their caches could serve would be lost too. A cache tier's breaker counts only
    while open, not half-open: an instance taken out of rotation gets no request to probe with.
    """
    store = request.app[STORE]
    tiers: dict[str, dict[str, object]] = {}
    ready = True
    for tier in store.tiers:
        breaker = store.breakers[tier.name]
        state: dict[str, object] = {"role": tier.role, "breaker": breaker.state, "failures": breaker.failures}
        if breaker.state != "closed":
            state["retry_in"] = round(breaker.retry_in, 3)
        if tier.role == "cache":
            state["writable"] = await tier.ready()
            ready &= bool(state["writable"])
        if tier.role == "cache" and breaker.state == "open":
            ready = False
        tiers[tier.name] = state
    negative = {"url": store.negative.url, "available": store.negative.available}  # informative only
    return web.json_response({"ready": ready, "tiers": tiers, "negative_cache": negative}, status=200 if ready else 503)


async def stats(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    queue = service.queue
    uploads = {
        "targets": [tier.name for tier in service.uploader.targets],
        "queue_depth": await queue.depth(),
        "replicated": queue.replicated,
        "replication_failures": queue.failures,
    }
    # Counters are this worker's own; /metrics aggregates every worker.
    process = {
        "pid": os.getpid(),
        "workers": service.config.server.workers,
        "version": __version__,
        "uptime_s": round(time.time() - _STARTED, 1),
    }
    usage = {tier.name: dataclasses.asdict(u) for tier in service.store.tiers if (u := tier.usage()) is not None}
    return web.json_response({**service.store.snapshot(), "usage": usage, "uploads": uploads, "process": process})
