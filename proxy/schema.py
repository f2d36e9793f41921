"""Config keys declared once. A table of keys is a frozen dataclass whose fields carry the type,
the default and a one-line meaning (``setting``/``required``); from that one declaration TOML
tables are checked and converted (errors name the key and the file) and the annotated
reference (``casproxy config --defaults``) is written, so the two cannot drift."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Collection
from typing import Any, Literal

from proxy.errors import ConfigError
from proxy.units import format_duration, format_size, parse_duration, parse_size


def setting(default: Any, meaning: str, *, folder: bool = False, toml: str = "") -> Any:
    """A key with a default. ``folder``: a local folder the process must be able to use;
    ``toml``: the key's name in TOML when it is not the field's."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "folder": folder, "toml": toml})


def required(meaning: str, *, folder: bool = False, toml: str = "") -> Any:
    return dataclasses.field(metadata={"meaning": meaning, "folder": folder, "toml": toml})


def toml_name(key: dataclasses.Field[Any]) -> str:
    return str(key.metadata.get("toml") or key.name)


def keys(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(cls))


def is_required(key: dataclasses.Field[Any]) -> bool:
    return key.default is dataclasses.MISSING and key.default_factory is dataclasses.MISSING


def build(cls: type[Any], table: Any, where: str, source: str, unknown: str = "unknown key") -> Any:
    """An instance of ``cls`` from a TOML table, every key converted and checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table (in {source})")
    fields = {toml_name(key): key for key in keys(cls)}
    strangers = sorted(set(table) - set(fields))
    if strangers:
        raise ConfigError(f"{where}.{strangers[0]}: {unknown} (in {source})")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for name, key in fields.items():
        if name not in table:
            if is_required(key):
                raise ConfigError(f"{where}.{name}: required (in {source})")
            continue
        try:
            values[key.name] = convert(table[name], hints[key.name])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{where}.{name}: {error} (in {source})") from None
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
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{value!r} is not a valid {annotation}")
    if origin is tuple:
        if isinstance(value, str):  # from the environment: a comma-separated list
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{value!r} is not a list")
        return tuple(convert(item, args[0]) for item in value)
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
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{value!r} is not a table")
        return value
    raise TypeError(f"no conversion to {annotation}")  # a schema mistake, not a user's


# -- the annotated reference ---------------------------------------------------------------------


def reference(
    cls: type[Any], env: str, *, commented: bool = False, values: Any = None, skip: Collection[str] = ()
) -> list[str]:
    """One table's keys as TOML: per key a comment (meaning, environment variable), then
    ``key = default`` (or the value in ``values``). Keys with no value are shown commented out."""
    hints = typing.get_type_hints(cls, include_extras=True)
    lines = []
    for key in keys(cls):
        if key.name in skip:
            continue
        name = f"{env}__{toml_name(key).upper()}"
        note = "required" if is_required(key) else ""
        value = getattr(values, key.name) if values is not None else None if note else key.default
        meaning = key.metadata["meaning"] + (f" ({note})" if note else "")
        lines.append(f"# {meaning}  [{name}]")
        shown = f"{toml_name(key)} = {toml_value(value, hints[key.name])}"
        lines.append(f"# {shown}" if commented or value is None else shown)
    return lines


def toml_value(value: Any, annotation: Any) -> str:
    if value is None:  # not set: an empty example of the key's type
        return "{}" if dict in [typing.get_origin(arg) for arg in typing.get_args(annotation)] else '""'
    if typing.get_origin(annotation) is typing.Annotated:
        parser = annotation.__metadata__[0]
        if parser is parse_size:
            return json.dumps(format_size(value))
        if parser is parse_duration:
            return json.dumps(format_duration(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # str, int: JSON's spelling is TOML's
