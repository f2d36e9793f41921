"""``GET /metrics`` in the Prometheus text format, and the middleware that counts requests.

With several workers the series come from prometheus-client's multiprocess files, so whichever
worker answers the scrape reports all of them. Gauges of shared state (the disk cache, the upload
queue) are read at scrape time: every worker sees the same cache and queue.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from proxy import metrics
from proxy.blocking import run
from proxy.server.keys import SERVICE
from proxy.server.responses import SendfileResponse
from proxy.tier import Usage

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"})


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every request by route template (never the raw path: one series per hash would
    grow without bound). The time ends when the handler returns, except for a file handed to
    sendfile: that is counted once sent, as the access log does, 499 if the client left."""
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status: int | None = 500  # None: the response counts itself once sent
    try:
        response = await handler(request)
        if isinstance(response, SendfileResponse) and not response.prepared:
            response.when_sent, status = functools.partial(_count_since, started, route, request.method), None
        else:
            status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        if status is not None:
            count_request(route, request.method, status, time.perf_counter() - started)


def _count_since(started: float, route: str, method: str, status: int) -> None:
    count_request(route, method, status, time.perf_counter() - started)


# labels() hashes and locks on every call: resolve each child once (routes and methods are few).
_COUNTERS: dict[tuple[str, str, int], Counter] = {}
_TIMERS: dict[tuple[str, str], Histogram] = {}


def count_request(route: str, method: str, status: int, seconds: float) -> None:
    """One answered request in casproxy_http_requests and its duration histogram."""
    # Any token is a method to aiohttp: others are counted as one, or a client could grow the
    # series (and these dicts) without bound.
    method = method if method in _METHODS else "OTHER"
    counter = _COUNTERS.get((route, method, status))
    if counter is None:
        counter = _COUNTERS[route, method, status] = metrics.REQUESTS.labels(route, method, str(status))
    counter.inc()
    timer = _TIMERS.get((route, method))
    if timer is None:
        timer = _TIMERS[route, method] = metrics.REQUEST_SECONDS.labels(route, method)
    timer.observe(seconds)


class _SharedState(Collector):
    """The disk cache tiers and the upload queue, as this worker sees them now."""

    def __init__(self, usages: dict[str, Usage], queue_depth: int) -> None:
        self.usages = usages
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily("casproxy_disk_cache_bytes", "Bytes stored in each disk cache tier", labels=["tier"])
        limit = GaugeMetricFamily("casproxy_disk_cache_limit_bytes", "size_limit of each disk tier", labels=["tier"])
        entries = GaugeMetricFamily("casproxy_disk_cache_entries", "Blobs in each disk cache tier", labels=["tier"])
        for name, usage in self.usages.items():
            size.add_metric([name], usage.bytes)
            limit.add_metric([name], usage.limit)
            entries.add_metric([name], usage.entries)
        yield from (size, limit, entries)
        yield GaugeMetricFamily(
            "casproxy_upload_queue_depth", "Copies waiting in the replication queue", value=self.queue_depth
        )


def exposition(state: Collector) -> bytes:
    """Every series, aggregated over the workers when there are several."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        series = generate_latest(registry)
    else:
        series = generate_latest(REGISTRY)
    shared = CollectorRegistry(auto_describe=False)
    shared.register(state)
    return series + generate_latest(shared)


async def get_metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    usages = {tier.name: usage for tier in service.store.tiers if (usage := tier.usage()) is not None}
    state = _SharedState(usages, await service.queue.depth())
    body = await run(exposition, state)  # the multiprocess files are read from disk: not on the loop
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
