"""Least-recently-used eviction, and the batched access times it orders by."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable

from proxy.tiers.disk.index import Index


class AccessTimes:
    """Hits whose access time is not written yet. Recorded on the loop (memory hits) and in
    executor threads (disk reads), taken by the batch writer: so under a lock."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def record(self, key: str) -> None:
        with self._lock:
            self._keys.add(key)

    def take(self) -> set[str]:
        with self._lock:
            keys, self._keys = self._keys, set()
        return keys


def make_room(
    index: Index,
    folder: str,
    *,
    incoming: int,
    new_bytes: int,
    size_limit: int,
    min_free: int,
    evicted: Callable[[str], None],
) -> bool:
    """Evict least recently used entries, one at a time, until ``incoming`` bytes fit under
    ``size_limit`` and writing ``new_bytes`` leaves ``min_free``; False if that cannot be done,
    and then nothing is evicted when even an empty cache could not take them. (With ``min_free``
    0 the bytes must still fit: a cache that filled its disk makes room.)"""
    floor = min_free + new_bytes  # free space wanted before the bytes are written
    volume, free = index.volume(), _free(folder, floor)
    if incoming > size_limit or volume + free < floor:
        return False
    while volume + incoming > size_limit or free < floor:
        key = index.least_recent()
        if key is None:
            return False
        if index.delete(key):
            evicted(key)
        volume, free = index.volume(), _free(folder, floor)
    return True


def _free(folder: str, floor: int) -> int:
    """The filesystem's free space; not asked (a statvfs) when no floor is wanted."""
    return shutil.disk_usage(folder).free if floor else 0
