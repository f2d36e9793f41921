"""One typed, validated configuration: built-in defaults < TOML file < CASPROXY_* env < flags.

Every error names the key and the file. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from proxy import schema
from proxy.errors import ConfigError
from proxy.schema import setting
from proxy.tiers.kinds import KINDS, TierConfig
from proxy.units import Duration, Size

ENV_PREFIX = "CASPROXY_"
DEFAULT_PATH = "config.toml"
MIN_SECRET_BYTES = 16  # an HMAC key shorter than this can be guessed
_ORIGIN = re.compile(r"https?://[^/\s]+")
SECRET_WORDS = ("token", "secret", "password", "access_key", "credential", "authorization", "api_key", "apikey")


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "address to bind (--host); another than loopback needs auth.upload_tokens")
    port: int = setting(8080, "port to bind (--port); 0: any free port")
    workers: int = setting(1, "processes sharing the port (SO_REUSEPORT) and the disk cache (--workers)")
    public_url: str = setting("", "base URL written into tickets (default: http://host:port)")
    max_upload_size: Size = setting(5 << 30, "largest upload")
    max_blob_size: Size = setting(50 << 30, "a fill that grows past this is abandoned (an endless upstream)")
    stream_threshold: Size = setting(4 << 20, "larger blobs are streamed while verifying, smaller verified first")
    spool_memory: Size = setting(256 << 20, "blobs being fetched stay in memory up to this, all told")
    # uvloop answers 4 KiB hits ~10-20% faster, but has no sendfile: large hits run ~30% slower
    # (bench/, this machine). asyncio is the default for that reason.
    event_loop: Literal["asyncio", "uvloop"] = setting("asyncio", "or uvloop: faster small hits, slower large ones")
    log_format: Literal["text", "json"] = setting("text", "text, or json: every log line one JSON object")
    access_log: bool = setting(True, "one line per request (query strings, i.e. ticket signatures, never logged)")
    # Hot hits answered below aiohttp (proxy.server.fastpath); false sends every request through aiohttp.
    fast_path: bool = setting(True, "answer GET/HEAD of blobs held in memory below aiohttp; false to compare")
    metrics_port: int = setting(0, "> 0: also serve /metrics, /healthz, /readyz on metrics_host:metrics_port")
    metrics_host: str = setting("0.0.0.0", "address for metrics_port (a sidecar on loopback can still be scraped)")

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


@dataclass(frozen=True)
class AuthConfig:
    upload_tokens: tuple[str, ...] = setting((), 'bearer tokens that may upload, e.g. ["env:CASPROXY_UPLOAD_TOKEN"]')
    admin_tokens: tuple[str, ...] = setting((), "bearer tokens for DELETE, /jobs and the /bulk-data admin routes")
    require_ticket: bool = setting(False, "true: reading a blob needs a valid ticket or a token")
    ticket_secret: str = setting("", "HMAC key, 16 bytes or more; empty: generated once, kept 0600 in the cache")
    ticket_ttl: Duration = setting(7 * 86400.0, "how long a ticket is valid")
    allow_anonymous_uploads: bool = setting(False, "true: bind beyond loopback with no upload_tokens")


@dataclass(frozen=True)
class NegativeCacheConfig:
    ttl: Duration = setting(30.0, 'how long "found nowhere" is remembered (0: off)')
    url: str = setting("memory://", 'or "redis://host:6379/0" to share it between instances (aiocache)')
    max_entries: int = setting(100_000, "entries a memory:// cache keeps at most; as many corrupt copies remembered")


@dataclass(frozen=True)
class BreakerConfig:
    """Per-tier circuit breakers: after ``threshold`` failures in a row a tier is skipped for
    ``cooldown``, then one request probes it."""

    threshold: int = setting(5, "failures in a row that open a tier's circuit breaker")
    cooldown: Duration = setting(30.0, "how long an open tier is skipped before one request probes it")


@dataclass(frozen=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = setting((), 'origins browsers may call from; "*": any origin, reads only')
    max_age: Duration = setting(600.0, "how long a browser may cache a preflight answer")


@dataclass(frozen=True)
class CoalesceConfig:
    url: str = setting("", '"redis://host:6379/0": instances share in-flight fills (empty: per machine)')
    wait: Duration = setting(30.0, "how long to wait on another instance's fill before fetching")


@dataclass(frozen=True)
class JobsConfig:
    allow: tuple[str, ...] = setting((), 'where /jobs may read or write: "s3://bucket/prefix/", "/srv/exports/"')


@dataclass(frozen=True)
class UploadsConfig:
    targets: tuple[str, ...] = setting((), "tiers uploads go to: the first before the answer, the rest queued")
    bulk_data_tier: str = setting("", "an s3 tier for presigned direct uploads (empty: this proxy)")
    queue_path: str = setting("", "the durable replication queue (empty: queue in the cache folder)")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    negative_cache: NegativeCacheConfig = NegativeCacheConfig()
    breaker: BreakerConfig = BreakerConfig()
    cors: CorsConfig = CorsConfig()
    coalesce: CoalesceConfig = CoalesceConfig()
    jobs: JobsConfig = JobsConfig()
    uploads: UploadsConfig = UploadsConfig()
    tiers: tuple[TierConfig, ...] = ()
    source: str = "built-in defaults"

    def tier(self, name: str) -> TierConfig:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "negative_cache": NegativeCacheConfig,
    "breaker": BreakerConfig,
    "cors": CorsConfig,
    "coalesce": CoalesceConfig,
    "jobs": JobsConfig,
    "uploads": UploadsConfig,
}


# The embedded default, identical to the repo's config.toml: no cloud account needed.
DEFAULT_TIERS: list[dict[str, Any]] = [
    {
        "name": "disk",
        "kind": "disk",
        "role": "cache",
        "path": "./data/cache",
        "size_limit": "10 GiB",
        "min_free": "1 GiB",
    },
    {"name": "local", "kind": "fs", "role": "source", "path": "./data/blobs"},
]


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Read ``path`` (or CASPROXY_CONFIG, or ./config.toml if present), then apply the
    CASPROXY_* variables of ``environ`` and ``overrides`` (e.g. {"server": {"port": 9000}})."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(f"{ENV_PREFIX}CONFIG") or (DEFAULT_PATH if os.path.exists(DEFAULT_PATH) else None)
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path:
        source = path
        try:
            with open(path, "rb") as file:
                raw = tomllib.load(file)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    raw.setdefault("tiers", [dict(tier) for tier in DEFAULT_TIERS])
    from_env = _apply_env(raw, environ, source)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        return _build_config(_resolve_env_refs(raw, environ, source, ""), source)
    except ConfigError as error:  # a bad value from the environment: say which variable
        key = str(error).split(":", 1)[0]
        if key in from_env:
            raise ConfigError(f"{error}, set by {from_env[key]}") from None
        raise


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], source: str) -> dict[str, str]:
    """CASPROXY_SERVER__PORT=9000 sets [server] port; CASPROXY_TIERS__DISK__PATH (by tier
    name or index) sets a tier's key. Returns which variable set which key."""
    keys: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if parts[0] == "tiers" and len(parts) == 3:
            index, tier = _find_tier(raw["tiers"], parts[1], name)
            tier[parts[2]] = value
            keys[f"tiers[{index}] ({tier.get('name')}).{parts[2]}"] = name
        elif len(parts) == 2:
            table = raw.setdefault(parts[0], {})
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: [{parts[0]}] is not a table in {source}")
            table[parts[1]] = value
            keys[f"{parts[0]}.{parts[1]}"] = name
        else:
            raise ConfigError(f"{name}: want CASPROXY_SECTION__KEY or CASPROXY_TIERS__NAME__KEY")
    return keys


def _find_tier(tiers: list[dict[str, Any]], ref: str, variable: str) -> tuple[int, dict[str, Any]]:
    for index, tier in enumerate(tiers):
        if str(tier.get("name", "")).lower() == ref or str(index) == ref:
            return index, tier
    raise ConfigError(f"{variable}: no tier named {ref!r}")


def _resolve_env_refs(value: Any, environ: Mapping[str, str], source: str, key: str) -> Any:
    """Replace every "env:NAME" string with the variable's value (for secrets)."""
    if isinstance(value, str) and value.startswith("env:"):
        variable = value[4:]
        if variable not in environ:
            raise ConfigError(f"{key}: environment variable {variable} is not set (in {source})")
        return environ[variable]
    if isinstance(value, dict):
        return {k: _resolve_env_refs(v, environ, source, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env_refs(v, environ, source, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _build_config(raw: dict[str, Any], source: str) -> Config:
    unknown = set(raw) - set(SECTIONS) - {"tiers"}
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}")
    built = {name: schema.build(cls, raw.get(name, {}), name, source) for name, cls in SECTIONS.items()}
    tiers = raw.get("tiers", [])
    if not isinstance(tiers, list) or not tiers:
        raise ConfigError(f"{source}: [[tiers]] must list at least one tier")
    tier_configs = tuple(_build_tier(table, index, source) for index, table in enumerate(tiers))
    config = Config(**built, tiers=tuple(t for t in tier_configs if t.enabled), source=source)
    _validate(config)
    return config


def _build_tier(table: Any, index: int, source: str) -> TierConfig:
    where = f"tiers[{index}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table (in {source})")
    for key in ("name", "kind"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise ConfigError(f"{where}.{key}: required string (in {source})")
    kind = KINDS.get(table["kind"])
    if kind is None:
        known = ", ".join(KINDS)
        raise ConfigError(
            f"{where} ({table['name']}).kind: unknown kind {table['kind']!r}; one of {known} (in {source})"
        )
    unknown = f"unknown key for kind {table['kind']!r}"
    config: TierConfig = schema.build(kind.config, table, f"{where} ({table['name']})", source, unknown=unknown)
    return config


def _validate(config: Config) -> None:
    """What one key's type cannot say: ranges, lengths, references between keys."""

    def fail(key: str, message: str) -> NoReturn:
        raise ConfigError(f"{key}: {message} (in {config.source})")

    names = [tier.name for tier in config.tiers]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        fail("tiers", f"two tiers are named {', '.join(sorted(duplicates))}")
    for target in config.uploads.targets:
        if target not in names:
            fail("uploads.targets", f"no tier named {target!r}")
    bulk = config.uploads.bulk_data_tier
    if bulk and (bulk not in names or config.tier(bulk).kind != "s3"):
        fail("uploads.bulk_data_tier", f"{bulk!r} is not an s3 tier")
    for key in ("port", "metrics_port"):
        port: int = getattr(config.server, key)
        if not 0 <= port <= 65535:
            fail(f"server.{key}", f"{port} is not a port (0 to 65535)")
    if not config.server.host.strip():
        fail("server.host", "empty")
    if config.server.workers < 1:
        fail("server.workers", "must be at least 1")
    if config.breaker.threshold < 1:
        fail("breaker.threshold", "must be at least 1")
    if config.negative_cache.max_entries < 1:
        fail("negative_cache.max_entries", "must be at least 1")
    if config.auth.ticket_secret and len(config.auth.ticket_secret.encode()) < MIN_SECRET_BYTES:
        fail("auth.ticket_secret", f"shorter than {MIN_SECRET_BYTES} bytes (or leave it empty to have one generated)")
    for key in ("upload_tokens", "admin_tokens"):
        tokens: tuple[str, ...] = getattr(config.auth, key)
        for index, token in enumerate(tokens):
            if not token.strip():  # e.g. env:CASPROXY_UPLOAD_TOKEN set to "": nobody could use it
                fail(f"auth.{key}[{index}]", "empty token")
    for index, origin in enumerate(config.cors.allow_origins):
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            fail(f"cors.allow_origins[{index}]", f"{origin!r} is not * or an origin like https://app.example.com")
    for key, url in (("negative_cache.url", config.negative_cache.url), ("coalesce.url", config.coalesce.url)):
        if url and not url.startswith(("memory://", "redis://", "rediss://")):
            fail(key, f"{_masked(url)!r} is not a memory:// or redis:// URL")
    if config.coalesce.url.startswith("memory://"):
        fail("coalesce.url", "empty (per machine) or a redis:// URL")
    for index, place in enumerate(config.jobs.allow):
        if not (place.startswith("s3://") or os.path.isabs(place)):
            fail(f"jobs.allow[{index}]", f"{place!r} is not an s3:// prefix or an absolute path")


# -- the annotated reference ---------------------------------------------------------------------


def reference() -> str:
    """The complete annotated config, every key with its default, meaning and CASPROXY_* name
    (``casproxy config --defaults``, and the README's Configuration section)."""
    lines = [
        "# casproxy configuration: every key, its default and meaning [and its environment variable].",
        "# Precedence: built-in defaults < this file < CASPROXY_* environment < command-line flags.",
        '# "env:NAME" reads a value from the environment; sizes: "10 GiB", "512MB" or bytes;',
        '# durations: "30s", "5m", "7d" or seconds; lists from the environment: comma-separated.',
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"[{name}]", *schema.reference(cls, f"{ENV_PREFIX}{name.upper()}")]
    lines += [
        "",
        "# [[tiers]]: where blobs are looked for, in this order. Keys every tier has (a variable names",
        "# a tier by name or index: CASPROXY_TIERS__DISK__SIZE_LIMIT, CASPROXY_TIERS__0__SIZE_LIMIT):",
        *schema.reference(TierConfig, f"{ENV_PREFIX}TIERS__<NAME>", commented=True),
    ]
    for table in DEFAULT_TIERS:
        kind = KINDS[table["kind"]]
        built = schema.build(kind.config, table, "tiers", "built-in defaults")
        env = f"{ENV_PREFIX}TIERS__{table['name'].upper()}"
        lines += ["", f"# kind {table['kind']!r}: {kind.meaning}", "[[tiers]]"]
        lines += schema.reference(kind.config, env, values=built)
    # the other kinds: their own keys, and the common ones they give another default
    common = {key.name: key.default for key in dataclasses.fields(TierConfig) if key.name not in ("name", "kind")}
    for name, kind in KINDS.items():
        if name in {table["kind"] for table in DEFAULT_TIERS}:
            continue
        same = {key.name for key in dataclasses.fields(kind.config) if common.get(key.name, key) == key.default}
        env = f"{ENV_PREFIX}TIERS__<NAME>"
        lines += ["", f"# kind {name!r}: {kind.meaning}", "# [[tiers]]", f'# kind = "{name}"']
        lines += schema.reference(kind.config, env, commented=True, skip={"kind", *same})
    return "\n".join(lines) + "\n"


_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")


def _masked(url: str) -> str:
    return _URL_PASSWORD.sub(r"\1***@", url)  # redis://:password@host, https://user:pw@host


def redacted(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with secrets masked (for check-config)."""

    def scrub(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            return {k: scrub(v, k) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [scrub(v, key) for v in value]
        if value and any(word in key.lower().replace("-", "_") for word in SECRET_WORDS) and isinstance(value, str):
            return "***"
        if isinstance(value, str) and "://" in value:
            return _masked(value)
        return value

    data: dict[str, Any] = {name: dataclasses.asdict(getattr(config, name)) for name in SECTIONS}
    data["tiers"] = [_tier_table(tier) for tier in config.tiers]
    return typing.cast(dict[str, Any], scrub(data))


def _tier_table(tier: TierConfig) -> dict[str, Any]:
    return {schema.toml_name(key): getattr(tier, key.name) for key in dataclasses.fields(tier)}
