"""Checksums of disk cache entries (SPEC 4: nothing is trusted blindly, not even the local disk).

Every entry is stored with the xxh3-64 of its bytes (xxhash: several GB/s, so checking every
read from disk costs little next to the read), and checked whenever bytes come off the disk.
Entries written before checksums existed carry none: they are verified once against their
name (the real digest, in the same pass) and get their checksum then.
"""

from __future__ import annotations

import logging
import os
from typing import BinaryIO

import xxhash

from proxy.digest import Digest
from proxy.errors import BadDigest
from proxy.tier import CHUNK_SIZE
from proxy.tiers.disk.index import Index

log = logging.getLogger(__name__)


def checksum(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def file_checksum(fd: int, size: int) -> str:
    """The checksum of the first ``size`` bytes of an open file (read with pread: the file's
    offset stays untouched for a sender sharing it); a file shorter than ``size`` matches none."""
    hasher = xxhash.xxh3_64()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(CHUNK_SIZE, size - offset), offset)
        if not chunk:
            return f"truncated at {offset}"  # matches no checksum
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest()


def read_whole(fd: int, size: int) -> bytes | None:
    """The first ``size`` bytes of an open file, in one buffer (pread); None if it is shorter."""
    data = os.pread(fd, size, 0)
    while len(data) < size:  # a short read (rare for regular files): go on from there
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            return None
        data += more
    return data


def legacy_checksum(digest: Digest, data: bytes | None, fd: int | None, size: int) -> str | None:
    """For an entry without a checksum: its checksum if its bytes hash to ``digest``, else None."""
    named = digest.hasher()
    fast = xxhash.xxh3_64()
    if data is not None:
        named.update(data)
        fast.update(data)
    else:
        assert fd is not None
        for offset in range(0, size, CHUNK_SIZE):
            chunk = os.pread(fd, min(CHUNK_SIZE, size - offset), offset)
            named.update(chunk)
            fast.update(chunk)
    return fast.hexdigest() if digest.matches(named) else None


def recheck(index: Index) -> tuple[int, list[str]]:
    """``casproxy cache check``: hash every entry by its digest again (stronger than its
    checksum, and covering entries without one) and remove the ones that do not match (bit rot,
    a file changed by hand). How many were checked, and the removed keys."""
    checked, removed = 0, []
    for key in index.digests():
        checked += 1
        try:
            entry = index.get(key)
            good = entry is None or _hashes_to_its_name(key, entry[0])  # None: evicted meanwhile
        except (OSError, ValueError, BadDigest):  # its file is gone, or not a blob of ours
            good = False
        if not good and index.delete(key):
            removed.append(key)
            log.warning("%s: removed %s: its bytes do not hash to its name", index.path, key)
    return checked, removed


def _hashes_to_its_name(key: str, value: bytes | BinaryIO) -> bool:
    digest = Digest.parse(key)
    hasher = digest.hasher()
    if isinstance(value, bytes):
        hasher.update(value)
    else:
        with value:
            while chunk := value.read(CHUNK_SIZE):
                hasher.update(chunk)
    return digest.matches(hasher)
