"""Builds the domain from the configuration: the tiers, in order, behind one Composite."""

from __future__ import annotations

from proxy.composite import Composite
from proxy.config import Config
from proxy.negative import NegativeCache
from proxy.tiers import build_tier


def build_store(config: Config) -> Composite:
    return Composite(
        [build_tier(tier, config.source) for tier in config.tiers],
        negative_cache=NegativeCache(config.negative_cache.url, config.negative_cache.ttl),
    )
