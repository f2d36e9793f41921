"""casproxy: a content-addressed caching blob proxy, and the library behind it."""

from __future__ import annotations

__version__ = "0.1.0"

from proxy.digest import Digest, digest_of
from proxy.errors import (
    BadDigest,
    CorruptBlob,
    DigestMismatch,
    NotFound,
    ProxyError,
    TierError,
    UpstreamFailed,
)
from proxy.store.composite import Composite
from proxy.tier import Blob, Stat, Tier
from proxy.tiers import APIOrigin, DiskTier, FsTier, GcsTier, HttpTier, S3Tier

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
    "__version__",
    "digest_of",
]
