"""Health, readiness, statistics."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from proxy.server.keys import SERVICE, STORE
from proxy.tiers.disk import DiskTier


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every cache tier can be written and no breaker is open."""
    store = request.app[STORE]
    tiers: dict[str, dict[str, object]] = {}
    ready = True
    for tier in store.tiers:
        state: dict[str, object] = {"role": tier.role, "breaker": store.breakers[tier.name].state}
        if isinstance(tier, DiskTier):
            state["writable"] = await asyncio.to_thread(tier.writable)
            ready &= bool(state["writable"])
        if state["breaker"] == "open":
            ready = ready and tier.role != "cache"
        tiers[tier.name] = state
    return web.json_response({"ready": ready, "tiers": tiers}, status=200 if ready else 503)


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
    process = {"pid": os.getpid(), "workers": service.config.server.workers}
    return web.json_response({**service.store.snapshot(), "uploads": uploads, "process": process})
