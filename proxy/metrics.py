"""Prometheus series (SPEC 8), shared by the domain and the HTTP layer.

With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set before any worker imports this module:
prometheus-client then keeps each worker's values in files there and a scrape of any worker
aggregates them all. State that lives on disk anyway (cache size, queue depth) is read at scrape
time instead (see proxy.server.metrics).
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from proxy import __version__

# A *_created series per counter child doubles the series count for a timestamp no dashboard or
# alert reads (rate() and increase() handle restarts by themselves).
disable_created_metrics()  # type: ignore[no-untyped-call]

BUILD_INFO = Gauge(
    "casproxy_build_info",
    "Always 1; its labels name the casproxy and Python versions running",
    ["version", "python"],
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

REQUESTS = Counter(
    "casproxy_http_requests",
    "HTTP requests answered, by route template, method and status",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "casproxy_http_request_duration_seconds",
    "Time to answer (headers and body sent), by route template and method",
    ["route", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LOOKUPS = Counter("casproxy_tier_lookups", "Tier lookups by result: hit, miss, error, corrupt", ["tier", "result"])
TIER_BYTES = Counter("casproxy_tier_bytes", "Verified bytes read from each tier", ["tier"])
CACHE_WRITES = Counter("casproxy_cache_writes", "Copies written into cache tiers, by result", ["tier", "result"])
COALESCED = Counter(
    "casproxy_coalesced_waits",
    "Requests that waited for a fill already in flight, in this process or in another worker",
    ["scope"],
)
# Coalescing across instances (coalesce.url): see proxy.store.claims.
COALESCE_CLAIMS = Counter("casproxy_coalesce_claims", "Fleet claims taken before fetching a digest from a source")
COALESCE_WAITS = Counter("casproxy_coalesce_waits", "Fills that waited on another instance's claim")
COALESCE_TAKEOVERS = Counter(
    "casproxy_coalesce_takeovers", "Claims taken after waiting: the holder's fill failed or the holder died"
)
COALESCE_WAIT_SECONDS = Histogram(
    "casproxy_coalesce_wait_seconds",
    "Time spent waiting on another instance's claim, per wake-up",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
COALESCE_ALONE = Counter(
    "casproxy_coalesce_alone",
    "Fetches from a source made without a fleet claim: Redis unavailable, or coalesce.wait spent",
    ["reason"],
)
NEGATIVE_HITS = Counter("casproxy_negative_cache_hits", "Lookups answered 'found nowhere' by the negative cache")
EVICTIONS = Counter("casproxy_disk_evictions", "Entries evicted from disk cache tiers", ["tier"])
BREAKER_STATE = Gauge(
    "casproxy_breaker_open",
    "1 while a tier's circuit breaker is open (skipped) in any worker, else 0",
    ["tier"],
    multiprocess_mode="livemax",
)
UPLOADS = Counter("casproxy_uploads", "Verified uploads: stored (new) or existed (already there)", ["result"])
