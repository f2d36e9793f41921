"""Checksums of disk cache entries (SPEC 4: nothing is trusted blindly, not even the local disk).

Every entry is stored with the xxh3-64 of its bytes (xxhash: several GB/s, so checking every
read from disk costs little next to the read), and checked whenever bytes come off the disk.
Entries written before checksums existed carry none: they are verified once against their
name (the real digest, in the same pass) and get their checksum then.
"""

from __future__ import annotations

import os

import xxhash

from proxy.digest import Digest
from proxy.tier import CHUNK_SIZE


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
