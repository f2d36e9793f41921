"""Digests, sizes and durations: the words every other module speaks."""

from __future__ import annotations

import hashlib

import pytest

from proxy.digest import Digest, digest_of
from proxy.errors import BadDigest
from proxy.units import parse_duration, parse_size

SHA1_EMPTY = hashlib.sha1(b"").hexdigest()
SHA256_EMPTY = hashlib.sha256(b"").hexdigest()


def test_digest_is_lower_case_and_knows_its_algorithm() -> None:
    assert Digest.parse(SHA1_EMPTY.upper()) == SHA1_EMPTY
    assert Digest.parse(SHA1_EMPTY).algorithm == "sha1"
    assert Digest.parse(SHA256_EMPTY).algorithm == "sha256"
    assert digest_of(b"", "sha256") == SHA256_EMPTY


@pytest.mark.parametrize(
    "text",
    ["", "zz", SHA1_EMPTY[:-1], SHA1_EMPTY + "0", "g" * 40, "../" + SHA1_EMPTY[3:], SHA1_EMPTY[:39] + "/", " " * 40],
)
def test_bad_digests_are_refused(text: str) -> None:
    with pytest.raises(BadDigest):
        Digest.parse(text)


def test_digest_of_the_wrong_algorithm_is_refused() -> None:
    with pytest.raises(BadDigest):
        Digest.parse(SHA256_EMPTY, "sha1")
    with pytest.raises(BadDigest):
        Digest.parse(SHA1_EMPTY, "sha256")


def test_hasher_matches_only_the_right_bytes() -> None:
    digest = digest_of(b"hello")
    good, bad = digest.hasher(), digest.hasher()
    good.update(b"hello")
    bad.update(b"hellO")
    assert digest.matches(good) and not digest.matches(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [("10 GiB", 10 << 30), ("512MB", 512_000_000), ("1k", 1024), ("4 MiB", 4 << 20), (123, 123), ("0", 0)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("7d", 604800), (12.5, 12.5), ("250ms", 0.25)])
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten", "-1", "5 parsecs", True])
def test_bad_sizes_and_durations(text: str | bool) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - both parsers raise plain ValueError
        parse_size(text)
    with pytest.raises(ValueError):  # noqa: PT011
        parse_duration(text)
