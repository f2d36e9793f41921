"""The store: an ordered list of tiers that behaves as one verified blob store.

``Composite`` (composite.py) is the facade and the library API; under it, one module per
concern: the spool a blob arrives into (spool.py), the per-tier breakers (breaker.py), the
negative cache (negative.py) and the cross-process fill locks (fill_locks.py).

Nothing is imported here, so that a tier can use the spool without loading the whole store.
"""
