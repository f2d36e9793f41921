"""Blob names: the hex digest of a blob's bytes, and the hashers that check them."""

from __future__ import annotations

import hashlib
import re
from typing import Literal, Protocol

from proxy.errors import BadDigest

Algorithm = Literal["sha1", "sha256"]

# Hex length identifies the algorithm, so one namespace holds both kinds of name.
_HEX_LENGTH: dict[Algorithm, int] = {"sha1": 40, "sha256": 64}
_ALGORITHM_BY_LENGTH: dict[int, Algorithm] = {n: a for a, n in _HEX_LENGTH.items()}
_HEX = re.compile(r"[0-9a-f]+")
ALGORITHMS: tuple[Algorithm, ...] = tuple(_HEX_LENGTH)


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


class Digest(str):
    """A lower-case hex digest; a plain ``str`` everywhere else (keys, URLs, logs)."""

    __slots__ = ()

    @classmethod
    def parse(cls, text: str, algorithm: Algorithm | None = None) -> Digest:
        """Validate ``text`` as a digest (of ``algorithm`` if given); raise BadDigest otherwise."""
        if isinstance(text, Digest) and (algorithm is None or text.algorithm == algorithm):
            return text
        hex_ = text.lower() if isinstance(text, str) else ""
        expected = _HEX_LENGTH[algorithm] if algorithm else None
        if (
            len(hex_) not in _ALGORITHM_BY_LENGTH
            or (expected is not None and len(hex_) != expected)
            or not _HEX.fullmatch(hex_)
        ):
            want = f"{expected} hex characters" if expected else "40 (sha1) or 64 (sha256) hex characters"
            raise BadDigest(f"{text[:80]!r} is not a digest: want {want}")
        return cls(hex_)

    @property
    def algorithm(self) -> Algorithm:
        return _ALGORITHM_BY_LENGTH[len(self)]

    def hasher(self) -> Hasher:
        return hashlib.new(self.algorithm)

    def matches(self, hasher: Hasher) -> bool:
        return hasher.hexdigest() == self


def digest_of(data: bytes | bytearray | memoryview, algorithm: Algorithm = "sha1") -> Digest:
    return Digest(hashlib.new(algorithm, data).hexdigest())
