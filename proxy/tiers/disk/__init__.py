"""The disk cache tier: ``tier`` (the protocol) over ``index`` (diskcache), ``reads`` (reads
checked against each entry's checksum), ``integrity`` (the checksums), ``hot`` (memory),
``eviction``, ``generation`` (purges reach every worker) and ``recovery`` (what killed processes
leave)."""

from proxy.tiers.disk.tier import DEFAULT_SIZE_LIMIT, DiskTier

__all__ = ["DEFAULT_SIZE_LIMIT", "DiskTier"]
