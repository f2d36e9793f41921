"""One typed, validated configuration: built-in defaults < TOML file < CASPROXY_* env < flags.

Every error names the key and the file. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.errors import ConfigError
from proxy.units import Duration, Size, parse_duration

ENV_PREFIX = "CASPROXY_"
DEFAULT_PATH = "config.toml"
SECRET_WORDS = ("token", "secret", "password", "access_key", "credential", "authorization", "api_key", "apikey")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    public_url: str = ""
    max_upload_size: Size = 5 << 30
    stream_threshold: Size = 4 << 20
    spool_memory: Size = 256 << 20  # blobs being fetched are kept in memory up to this, all told
    # uvloop answers 4 KiB hits ~10-20% faster, but has no sendfile: large hits run ~30% slower
    # (bench/, this machine). asyncio is the default for that reason.
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


@dataclass(frozen=True)
class AuthConfig:
    upload_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    require_ticket: bool = False
    ticket_secret: str = ""
    ticket_ttl: Duration = 7 * 86400.0
    allow_anonymous_uploads: bool = False


@dataclass(frozen=True)
class NegativeCacheConfig:
    ttl: Duration = 30.0
    url: str = "memory://"


@dataclass(frozen=True)
class BreakerConfig:
    """Per-tier circuit breakers: after ``threshold`` failures in a row a tier is skipped for
    ``cooldown``, then one request probes it."""

    threshold: int = 5
    cooldown: Duration = 30.0


@dataclass(frozen=True)
class UploadsConfig:
    targets: tuple[str, ...] = ()  # default: the first writable source tier
    bulk_data_tier: str = ""
    queue_path: str = ""  # the durable replication queue; default: "queue" in the state folder


@dataclass(frozen=True)
class TierConfig:
    """The keys every tier has; the rest (``options``) belong to its kind's constructor."""

    name: str
    kind: str
    role: Literal["cache", "source"] = "source"
    enabled: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    negative_cache: NegativeCacheConfig = NegativeCacheConfig()
    breaker: BreakerConfig = BreakerConfig()
    uploads: UploadsConfig = UploadsConfig()
    tiers: tuple[TierConfig, ...] = ()
    source: str = "built-in defaults"

    def tier(self, name: str) -> TierConfig:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise KeyError(name)


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
    _apply_env(raw, environ, source)
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return _build_config(_resolve_env_refs(raw, environ, source, ""), source)


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str], source: str) -> None:
    """CASPROXY_SERVER__PORT=9000 sets [server] port; CASPROXY_TIERS__DISK__PATH (by tier
    name or index) sets a tier's key."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if parts[0] == "tiers" and len(parts) == 3:
            tier = _find_tier(raw["tiers"], parts[1], name)
            tier[parts[2]] = value
        elif len(parts) == 2:
            table = raw.setdefault(parts[0], {})
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: [{parts[0]}] is not a table in {source}")
            table[parts[1]] = value
        else:
            raise ConfigError(f"{name}: want CASPROXY_SECTION__KEY or CASPROXY_TIERS__NAME__KEY")


def _find_tier(tiers: list[dict[str, Any]], ref: str, variable: str) -> dict[str, Any]:
    for index, tier in enumerate(tiers):
        if str(tier.get("name", "")).lower() == ref or str(index) == ref:
            return tier
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
    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("tiers", "source")}
    unknown = set(raw) - set(sections) - {"tiers"}
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(Config, include_extras=True)
    built = {name: build_dataclass(hints[name], raw.get(name, {}), name, source) for name in sections}
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
    common = {k: table[k] for k in ("name", "kind", "role", "enabled") if k in table}
    options = {k: v for k, v in table.items() if k not in common}
    tier: TierConfig = build_dataclass(TierConfig, common, where, source)
    from proxy.tiers import check_options  # the tier kinds know their own keys

    check_options(tier.kind, options, f"{where} ({tier.name})", source)
    return dataclasses.replace(tier, options=options)


def _validate(config: Config) -> None:
    names = [tier.name for tier in config.tiers]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ConfigError(f"tiers: two tiers are named {', '.join(sorted(duplicates))} (in {config.source})")
    for target in config.uploads.targets:
        if target not in names:
            raise ConfigError(f"uploads.targets: no tier named {target!r} (in {config.source})")
    bulk = config.uploads.bulk_data_tier
    if bulk and (bulk not in names or config.tier(bulk).kind != "s3"):
        raise ConfigError(f"uploads.bulk_data_tier: {bulk!r} is not an s3 tier (in {config.source})")
    if config.server.workers < 1:
        raise ConfigError(f"server.workers: must be at least 1 (in {config.source})")
    if config.breaker.threshold < 1:
        raise ConfigError(f"breaker.threshold: must be at least 1 (in {config.source})")
    for key in ("upload_tokens", "admin_tokens"):
        tokens: tuple[str, ...] = getattr(config.auth, key)
        for index, token in enumerate(tokens):
            if not token.strip():  # e.g. env:CASPROXY_UPLOAD_TOKEN set to "": nobody could use it
                raise ConfigError(f"auth.{key}[{index}]: empty token (in {config.source})")


# -- typed conversion ----------------------------------------------------------------------


def build_dataclass(cls: Any, table: Any, where: str, source: str) -> Any:
    """Build a frozen dataclass from a TOML table, converting and checking every key."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table (in {source})")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}
    unknown = set(table) - set(fields)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (in {source})")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for name, value in table.items():
        key = f"{where}.{name}"
        try:
            values[name] = convert(value, hints[name])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{key}: {error} (in {source})") from None
    return cls(**values)


def convert(value: Any, annotation: Any) -> Any:
    """Coerce a TOML or environment value to ``annotation``; raise ValueError if it cannot."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # Size, Duration: the parser rides on the type
        return annotation.__metadata__[0](value)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{value!r} is not a valid {annotation}")
    if origin is tuple or origin is list:
        if isinstance(value, str):  # from the environment: a comma-separated list
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{value!r} is not a list")
        return origin(convert(item, args[0]) for item in value)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().lstrip("-").isdigit():
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if annotation is float:
        return parse_duration(value) if isinstance(value, str) else float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value
    if origin is dict or annotation is dict or annotation is Any:
        return value
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ValueError(f"{value!r} is not a valid {annotation}")


_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")


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
            return _URL_PASSWORD.sub(r"\1***@", value)  # redis://:password@host, https://user:pw@host
        return value

    data = dataclasses.asdict(config)
    for tier in data["tiers"]:
        tier.update(tier.pop("options"))
    return typing.cast(dict[str, Any], scrub(data))
