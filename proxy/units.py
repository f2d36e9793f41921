"""Sizes ("10 GiB", "512MB", 1024) and durations ("30s", "5m", "7d", 12.5) as config spells them."""

from __future__ import annotations

import re
from typing import Annotated

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = _SIZE_UNITS[f"{_letter}ib"] = _SIZE_UNITS[f"{_letter}i"] = 1024**_power
    _SIZE_UNITS[f"{_letter}b"] = 1000**_power

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string like "10 GiB" (binary) or "512MB" (decimal)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return int(value)
    match = _SIZE.fullmatch(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (e.g. 10 GiB, 512MB, 1048576)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string like "30s", "5m", "7d"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    match = _DURATION.fullmatch(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 5m, 7d)")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _SECONDS[unit]


# Annotated types carry their parser, so config conversion needs no list of key names.
Size = Annotated[int, parse_size]
SizeArg = Annotated[int | str, parse_size]  # constructor arguments: 1048576 or "1 MiB"
Duration = Annotated[float, parse_duration]


def format_size(size: int) -> str:
    """The shortest exact spelling parse_size reads back: 10737418240 -> "10 GiB"."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor} {unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """The shortest exact spelling parse_duration reads back: 604800 -> "7d"."""
    for unit in ("w", "d", "h", "m", "s"):
        factor = _SECONDS[unit]
        if seconds and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s" if seconds else "0s"
