"""What the bucket tiers (s3, gcs) share: their URL form and the metadata they keep on objects."""

from __future__ import annotations

from urllib.parse import urlparse

from proxy.errors import ConfigError

SIZE_METADATA = "casproxy-size"  # decoded size, so HEAD knows it even for encoded objects


def parse_bucket_url(url: str, scheme: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` -> (bucket, "prefix/")."""
    parsed = urlparse(url)
    if parsed.scheme != scheme or not parsed.netloc:
        raise ConfigError(f"{url!r} is not a {scheme}://bucket/prefix/ URL")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parsed.netloc, prefix
