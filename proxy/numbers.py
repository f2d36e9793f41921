"""Whole numbers from untrusted text (headers, query strings): ASCII digits only, bounded.

``int()`` is too generous for this: it accepts "²"-like digits of any script, signs, spaces and
underscores, and raises ValueError past 4300 digits, which surfaced as a 500.
"""

from __future__ import annotations

import re

MAX_DIGITS = 18  # every value we read (byte offsets, unix times) fits; 10**18 still fits an int64

_DECIMAL = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")


def decimal(text: str | None) -> int | None:
    """The number ``text`` spells in plain ASCII digits, or None for anything else."""
    if text is None or not _DECIMAL.fullmatch(text):
        return None
    return int(text)
