"""The tier kinds, and building a tier from its [[tiers]] table."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from proxy.errors import ConfigError
from proxy.tier import Tier
from proxy.tiers.api import APIOrigin, ApiTier, load_origin
from proxy.tiers.disk import DiskTier
from proxy.tiers.fs import FsTier
from proxy.tiers.gcs import GcsTier
from proxy.tiers.http import HttpTier
from proxy.tiers.s3 import S3Tier

if typing.TYPE_CHECKING:
    from proxy.config import TierConfig

# kind -> the class whose constructor's keyword arguments are the kind's config keys
KINDS: dict[str, type[Tier]] = {"disk": DiskTier, "fs": FsTier, "s3": S3Tier, "gcs": GcsTier, "http": HttpTier}
_API_KEYS = {"class", "options", "timeout"}
_COMMON = {"name", "role"}


def _parameters(cls: type[Tier]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    return {
        name: hints.get(name, Any)
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and name not in _COMMON and param.kind is not param.VAR_KEYWORD
    }


def check_options(kind: str, options: Mapping[str, Any], where: str, source: str) -> None:
    """Fail with the key's name if a tier table has a key its kind does not take."""
    if kind == "api":
        allowed: set[str] = _API_KEYS
        if "class" not in options:
            raise ConfigError(f"{where}.class: required for kind 'api' (in {source})")
    elif kind in KINDS:
        allowed = set(_parameters(KINDS[kind]))
    else:
        raise ConfigError(f"{where}.kind: unknown kind {kind!r}; one of {', '.join([*KINDS, 'api'])} (in {source})")
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key for kind {kind!r} (in {source})")
    if kind != "api":
        _convert_options(KINDS[kind], options, where, source)


def _convert_options(cls: type[Tier], options: Mapping[str, Any], where: str, source: str) -> dict[str, Any]:
    from proxy.config import convert

    params = _parameters(cls)
    required = [
        name
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if param.default is param.empty and name != "self" and param.kind is param.POSITIONAL_OR_KEYWORD
    ]
    for name in required:
        if name not in options:
            raise ConfigError(f"{where}.{name}: required (in {source})")
    converted = {}
    for name, value in options.items():
        try:
            converted[name] = convert(value, params[name])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}.{name}: {error} (in {source})") from None
    return converted


def build_tier(config: TierConfig, source: str = "config") -> Tier:
    where = f"tier {config.name!r}"
    if config.kind == "api":
        from proxy.config import convert

        options = dict(config.options)
        origin = load_origin(options["class"], dict(options.get("options", {})))
        timeout = convert(options.get("timeout", 30.0), float)
        return ApiTier(origin, name=config.name, role=config.role, timeout=timeout)
    cls: Callable[..., Tier] = KINDS[config.kind]
    options = _convert_options(KINDS[config.kind], config.options, where, source)
    return cls(name=config.name, role=config.role, **options)


__all__ = [
    "APIOrigin",
    "ApiTier",
    "DiskTier",
    "FsTier",
    "GcsTier",
    "HttpTier",
    "KINDS",
    "S3Tier",
    "build_tier",
    "check_options",
]
