"""casproxy: a content-addressed caching blob proxy, and the library behind it.

The names below are imported on first use (PEP 562), so ``import proxy.errors`` or
``casproxy --version`` loads no SDK or framework."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.lazy import exports

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "Composite": "proxy.store.composite",
    "Digest": "proxy.digest",
    "digest_of": "proxy.digest",
    "BadDigest": "proxy.errors",
    "CorruptBlob": "proxy.errors",
    "DigestMismatch": "proxy.errors",
    "NotFound": "proxy.errors",
    "ProxyError": "proxy.errors",
    "TierError": "proxy.errors",
    "UpstreamFailed": "proxy.errors",
    "Blob": "proxy.tier",
    "Stat": "proxy.tier",
    "Tier": "proxy.tier",
    "APIOrigin": "proxy.tiers.api",
    "DiskTier": "proxy.tiers.disk",
    "FsTier": "proxy.tiers.fs",
    "GcsTier": "proxy.tiers.gcs",
    "HttpTier": "proxy.tiers.http",
    "S3Tier": "proxy.tiers.s3",
}


__getattr__ = exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from proxy.digest import Digest, digest_of
    from proxy.errors import BadDigest, CorruptBlob, DigestMismatch, NotFound, ProxyError, TierError, UpstreamFailed
    from proxy.store.composite import Composite
    from proxy.tier import Blob, Stat, Tier
    from proxy.tiers.api import APIOrigin
    from proxy.tiers.disk import DiskTier
    from proxy.tiers.fs import FsTier
    from proxy.tiers.gcs import GcsTier
    from proxy.tiers.http import HttpTier
    from proxy.tiers.s3 import S3Tier

__all__ = [
    "APIOrigin",
    "BadDigest",
    "Blob",
    "Composite",
    "CorruptBlob",
    "Digest",
    "DigestMismatch",
    "DiskTier",
    "FsTier",
    "GcsTier",
    "HttpTier",
    "NotFound",
    "ProxyError",
    "S3Tier",
    "Stat",
    "Tier",
    "TierError",
    "UpstreamFailed",
    "digest_of",
    "__version__",
]
