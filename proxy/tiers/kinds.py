"""The tier kinds: for each, the keys its [[tiers]] table takes (declared here, once, with their
types, defaults and meanings) and the class that implements it, imported only when a tier of
that kind is built, so reading the config never loads boto3 or aiohttp."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.encoding import Encoding, Layout
from proxy.schema import required, setting, toml_name
from proxy.tier import Role
from proxy.units import Duration, Size

if TYPE_CHECKING:
    from proxy.tier import Tier

_ROLE = "cache: filled with what later tiers find; source: only read (and written by uploads)"
_TIMEOUT = "how long the tier may take to answer, and to send each next byte, before it has failed"
_CONNECT = "how long connecting to the service may take"
_READ = "how long to wait for more bytes from the service"
_CONNECTIONS = "requests in flight to the service at once"
# Read by the store around every tier, never passed to a tier's constructor.
STORE_KEYS = frozenset({"kind", "enabled", "min_rate"})
COMMON_KEYS = frozenset({"name", "kind", "role", "enabled", "timeout", "min_rate"})


@dataclass(frozen=True, kw_only=True)
class TierConfig:
    """The keys every [[tiers]] table has; each kind adds its own."""

    name: str = required("the tier's name, as uploads.targets, logs and metrics call it")
    kind: str = required("what the tier is: disk, fs, s3, gcs, http or api")
    role: Role = setting("source", _ROLE)
    enabled: bool = setting(True, "false: the tier is left out, as if it were not written")
    timeout: Duration = setting(10.0, _TIMEOUT)
    min_rate: Size = setting(64 << 10, "bytes a second below which (over 10 s) a transfer from the tier has failed")

    @property
    def options(self) -> dict[str, Any]:
        """The keys of this tier's kind, by their TOML names."""
        return {
            toml_name(key): getattr(self, key.name) for key in dataclasses.fields(self) if key.name not in COMMON_KEYS
        }


@dataclass(frozen=True, kw_only=True)
class _Objects(TierConfig):
    """Kinds that store one object per blob under a prefix."""

    layout: Layout = setting("flat", 'where a blob lives: "flat" = prefix + hash, "sharded" = prefix + hash[0:2]/hash')
    encoding: Encoding = setting("identity", "identity, gzip or deflate at rest; the digest is of the decoded bytes")


@dataclass(frozen=True, kw_only=True)
class DiskConfig(TierConfig):
    path: str = required("the cache folder, private to the proxy's user (created 0700)", folder=True)
    size_limit: Size = setting(10 << 30, "evict least recently used blobs above this much")
    min_free: Size = setting(0, "also evict while the filesystem has less free space than this")
    memory_limit: Size = setting(64 << 20, "the hot in-process LRU in front of the disk")
    memory_item_limit: Size = setting(2 << 20, "larger blobs never enter the hot LRU (they are sent from their file)")
    file_threshold: Size = setting(32 << 10, "smaller blobs live inside the index database, larger in files")
    threads: int = setting(8, "threads for disk I/O")


@dataclass(frozen=True, kw_only=True)
class FsConfig(_Objects):
    path: str = required("the folder: <path>/<hash> (see layout)", folder=True)
    threads: int = setting(8, "threads for file I/O")


@dataclass(frozen=True, kw_only=True)
class S3Config(_Objects):
    url: str = required("s3://bucket/prefix/")
    endpoint_url: str | None = setting(None, "an S3-compatible store's endpoint (default: AWS)")
    region: str | None = setting(None, "the bucket's region (default: boto3's discovery)")
    profile: str | None = setting(None, "an AWS profile for the credentials")
    access_key_id: str | None = setting(None, "credentials (default: boto3's discovery)")
    secret_access_key: str | None = setting(None, "credentials (default: boto3's discovery)")
    accelerate: bool = setting(False, "use S3 Transfer Acceleration")
    max_connections: int = setting(32, _CONNECTIONS + " (also the executor's size)")
    connect_timeout: Duration = setting(5.0, _CONNECT + " (for the walk's reads, at most timeout)")
    read_timeout: Duration = setting(
        30.0, _READ + " (for the walk's reads, at most timeout: a hung one frees its thread; writes wait this long)"
    )


@dataclass(frozen=True, kw_only=True)
class GcsConfig(_Objects):
    url: str = required("gs://bucket/prefix/ (needs pip install 'casproxy[gcs]')")
    endpoint_url: str | None = setting(None, "a GCS emulator's endpoint")
    service_file: str | None = setting(None, "a service account's credentials JSON (default: the usual discovery)")
    max_connections: int = setting(32, _CONNECTIONS)
    connect_timeout: Duration = setting(5.0, _CONNECT)
    read_timeout: Duration = setting(30.0, _READ)


@dataclass(frozen=True, kw_only=True)
class HttpConfig(TierConfig):
    url: str = required("a URL with {hash} (and {algorithm}), e.g. https://regional-casproxy/{algorithm}/{hash}")
    token: str = setting("", "sent as Authorization: Bearer")
    headers: dict[str, str] | None = setting(None, 'more request headers, e.g. { X-Api-Key = "env:KEY" }')
    max_connections: int = setting(64, _CONNECTIONS)
    connect_timeout: Duration = setting(5.0, _CONNECT)
    read_timeout: Duration = setting(30.0, _READ)


@dataclass(frozen=True, kw_only=True)
class ApiConfig(TierConfig):
    # "class" and "options" in TOML: a Python keyword, and a name TierConfig already uses
    origin_class: str = required("package.module:ClassName of an APIOrigin", toml="class")
    origin_options: dict[str, Any] | None = setting(None, "keyword arguments for its constructor", toml="options")


@dataclass(frozen=True)
class Kind:
    config: type[TierConfig]
    implementation: str  # "module:Class"
    meaning: str

    def load(self) -> type[Tier]:
        module, _, name = self.implementation.partition(":")
        cls: type[Tier] = getattr(importlib.import_module(module), name)
        return cls


KINDS: dict[str, Kind] = {
    "disk": Kind(DiskConfig, "proxy.tiers.disk:DiskTier", "a local LRU cache on diskcache"),
    "fs": Kind(FsConfig, "proxy.tiers.fs:FsTier", "a plain folder"),
    "s3": Kind(S3Config, "proxy.tiers.s3:S3Tier", "an S3 or S3-compatible bucket"),
    "gcs": Kind(GcsConfig, "proxy.tiers.gcs:GcsTier", "a Google Cloud Storage bucket"),
    "http": Kind(HttpConfig, "proxy.tiers.http:HttpTier", "another casproxy, or a CDN"),
    "api": Kind(ApiConfig, "proxy.tiers.api:ApiTier", "a pluggable origin: your class, behind the tier protocol"),
}


def build_tier(config: TierConfig) -> Tier:
    """The tier a validated [[tiers]] table describes."""
    cls = KINDS[config.kind].load()
    if isinstance(config, ApiConfig):
        from proxy.tiers.api import ApiTier, load_origin

        origin = load_origin(config.origin_class, dict(config.origin_options or {}))
        tier: Tier = ApiTier(origin, name=config.name, role=config.role, timeout=config.timeout)
    else:
        arguments = {
            key.name: getattr(config, key.name) for key in dataclasses.fields(config) if key.name not in STORE_KEYS
        }
        tier = cls(**arguments)
    tier.min_rate = config.min_rate
    return tier
