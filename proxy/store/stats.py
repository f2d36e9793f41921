"""Per-tier counters: the numbers /stats shows, and the Prometheus series, moved together."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prometheus_client import Counter

from proxy import metrics


@dataclass
class TierStats:
    """What one tier did since start (this process only), for /stats and ``snapshot``."""

    hits: int = 0
    misses: int = 0
    errors: int = 0
    corrupt: int = 0
    bytes: int = 0
    cache_writes: int = 0
    cache_write_errors: int = 0

    def counts(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class TierMeter:
    """One tier's counters and its Prometheus children, resolved once: ``labels()`` on every
    hit is a lock and a dict lookup."""

    name: str
    stats: TierStats = field(default_factory=TierStats)

    def __post_init__(self) -> None:
        self._hits: Counter = metrics.LOOKUPS.labels(self.name, "hit")
        self._bytes: Counter = metrics.TIER_BYTES.labels(self.name)
        self._misses: Counter = metrics.LOOKUPS.labels(self.name, "miss")

    def hit(self, size: int) -> None:
        self.stats.hits += 1
        self.stats.bytes += size
        self._hits.inc()
        self._bytes.inc(size)

    def miss(self) -> None:
        self.stats.misses += 1
        self._misses.inc()

    def error(self) -> None:
        self.stats.errors += 1
        metrics.LOOKUPS.labels(self.name, "error").inc()

    def corrupt(self) -> None:
        self.stats.corrupt += 1
        metrics.LOOKUPS.labels(self.name, "corrupt").inc()

    def cache_write(self, ok: bool) -> None:
        if ok:
            self.stats.cache_writes += 1
        else:
            self.stats.cache_write_errors += 1
        metrics.CACHE_WRITES.labels(self.name, "ok" if ok else "error").inc()
