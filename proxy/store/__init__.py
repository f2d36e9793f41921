"""The store: an ordered list of tiers that behaves as one verified blob store.

``composite.Composite`` is the facade and the library API. Under it, one module per concern:
``walk`` (the ordered walk with per-tier deadlines and ``breaker``s), ``fills`` (coalescing and
cache filling), ``opened`` (the one answer to ``open``), ``fill_locks`` (one fill per digest
across processes), ``negative`` ("found nowhere", remembered), ``spool`` (a blob verified as it
arrives) and ``stats`` (per-tier counters).

Nothing is imported here, so that a tier can use the spool without loading the whole store.
"""
