"""Reading entries off the disk, every byte checked against the entry's checksum (SPEC 4:
nothing is trusted blindly, not even the local disk). Blocking: runs in the tier's executor.

Small entries are checked as they are read into memory. A large one is returned open for
sendfile with what its sender needs to check it alongside the send (``check_copy``); one that
fits the hot cache is kept there by that check, so its next hit is answered from memory. A
mismatch evicts the entry and raises CorruptBlob, so the walk goes on to the next tier.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from proxy.digest import Digest
from proxy.errors import CorruptBlob, TierError
from proxy.tiers.disk import integrity
from proxy.tiers.disk.eviction import AccessTimes
from proxy.tiers.disk.hot import HotCache
from proxy.tiers.disk.index import Index

log = logging.getLogger(__name__)

# Entries up to this size are read into memory to be answered; larger ones are sent by sendfile
# (measured, 1 MiB not in memory: read + check + send 800 µs of CPU a hit, sendfile + check 515).
READ_LIMIT = 256 << 10


@dataclass(frozen=True, slots=True)
class LargeEntry:
    """An entry too large for memory: its open file, size and checksum."""

    file: BinaryIO
    size: int
    checksum: str
    generation: int  # the purge generation it was read at (proxy.tiers.disk.generation)


class CheckedReads:
    def __init__(
        self, name: str, index: Index, hot: HotCache, access: AccessTimes, removed: Callable[[], None]
    ) -> None:
        self.name = name
        self.corrupt = 0  # entries found corrupt and evicted, on either path
        self._index = index
        self._hot = hot
        self._access = access
        self._removed = removed  # the tier refreshes its usage

    def read(self, digest: Digest, generation: int) -> bytes | LargeEntry | None:
        """The entry's bytes (checked; kept in the hot cache if read at purge ``generation``),
        a LargeEntry, or None if absent."""
        try:
            entry = self._index.get(digest)
        except (OSError, ValueError) as error:  # file evicted under us, or a foreign entry
            raise TierError(f"{self.name}: {error}") from error
        if entry is None:
            return None
        value, expected = entry
        self._access.record(digest)
        if isinstance(value, bytes):
            data = value
        else:
            size = os.fstat(value.fileno()).st_size
            if size > min(READ_LIMIT, self._hot.item_limit):
                if expected is None:
                    expected = self._adopt(digest, None, value, size)
                return LargeEntry(value, size, expected, generation)
            with value:
                data = value.read()
        if expected is None:
            self._adopt(digest, data, None, len(data))
        elif integrity.checksum(data) != expected:
            self._evict(digest)
            raise CorruptBlob(f"{self.name}: {digest}: its bytes on disk changed (checksum mismatch); evicted")
        self._hot.add(digest, data, generation)
        return data

    def check_copy(self, digest: Digest, fd: int, entry: LargeEntry) -> None:
        """Hash a large entry's file (``fd``: a descriptor of its own, closed here) while it is
        being sent; raises CorruptBlob on a mismatch, and the sender cuts the connection. An
        entry that fits the hot cache is read whole and kept there: the same one pass."""
        data = None
        try:
            if self._hot.fits(entry.size):
                data = integrity.read_whole(fd, entry.size)
                actual = integrity.checksum(data) if data is not None else "truncated"
            else:
                actual = integrity.file_checksum(fd, entry.size)
        finally:
            os.close(fd)
        if actual != entry.checksum:
            self._evict(digest)  # the store counts it against this tier (Composite._open_trusted)
            raise CorruptBlob(f"{self.name}: {digest}: its bytes on disk changed (checksum mismatch); evicted")
        if data is not None:
            self._hot.add(digest, data, entry.generation)

    def _adopt(self, digest: Digest, data: bytes | None, file: BinaryIO | None, size: int) -> str:
        """An entry of a version before checksums: verify it by its digest once and record its
        checksum, or evict it."""
        found = integrity.legacy_checksum(digest, data, file.fileno() if file else None, size)
        if found is None:
            if file is not None:
                file.close()
            self._evict(digest)
            raise CorruptBlob(f"{self.name}: {digest}: its bytes do not hash to its name; evicted")
        self._index.set_checksum(digest, found)
        return found

    def _evict(self, digest: Digest) -> None:
        self.corrupt += 1
        log.error("%s: %s is corrupt on disk (bit rot, or changed by hand): evicted", self.name, digest)
        self._hot.discard(digest)
        with contextlib.suppress(OSError):
            self._index.delete(digest)
        self._removed()
