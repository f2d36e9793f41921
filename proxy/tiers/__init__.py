"""The tier kinds (one module each; proxy.tiers.kinds says which keys each takes). The classes
below are imported on first use, so naming a kind loads only that kind's SDK."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.lazy import exports

_EXPORTS = {
    "APIOrigin": "proxy.tiers.api",
    "ApiTier": "proxy.tiers.api",
    "DiskTier": "proxy.tiers.disk",
    "FsTier": "proxy.tiers.fs",
    "GcsTier": "proxy.tiers.gcs",
    "HttpTier": "proxy.tiers.http",
    "S3Tier": "proxy.tiers.s3",
}


__getattr__ = exports(__name__, _EXPORTS)


if TYPE_CHECKING:
    from proxy.tiers.api import APIOrigin, ApiTier
    from proxy.tiers.disk import DiskTier
    from proxy.tiers.fs import FsTier
    from proxy.tiers.gcs import GcsTier
    from proxy.tiers.http import HttpTier
    from proxy.tiers.s3 import S3Tier

__all__ = [
    "APIOrigin",
    "ApiTier",
    "DiskTier",
    "FsTier",
    "GcsTier",
    "HttpTier",
    "S3Tier",
]
