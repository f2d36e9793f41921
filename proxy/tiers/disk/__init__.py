"""The disk cache tier: ``tier`` (the protocol) over ``index`` (diskcache), ``hot`` (memory),
``eviction``, ``integrity`` (checksums), ``generation`` (purges reach every worker) and
``recovery`` (what killed processes leave)."""

from proxy.tiers.disk.tier import DEFAULT_SIZE_LIMIT, DiskTier

__all__ = ["DEFAULT_SIZE_LIMIT", "DiskTier"]
