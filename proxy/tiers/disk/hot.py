"""The disk tier's hot cache: small blobs in process memory, bounded in bytes, LRU order."""

from __future__ import annotations

import threading
from collections import OrderedDict


class HotCache:
    """A bytes-bounded LRU of small verified blobs: a hit costs no file open and no thread hop.

    Read on the loop and filled from executor threads, so every change of the order or the
    contents happens under one lock. ``generation`` is the cache folder's purge generation the
    contents belong to (see generation.py): an entry read before a purge is refused after it.
    """

    def __init__(self, limit: int, item_limit: int) -> None:
        self.limit = limit
        self.item_limit = item_limit
        self.size = 0
        self.generation = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def fits(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes may be kept here."""
        return size <= self.item_limit and size <= self.limit

    def add(self, key: str, data: bytes, generation: int) -> None:
        """Keep ``data``, read from disk at purge ``generation``, unless a purge came since."""
        if not self.fits(len(data)):
            return
        with self._lock:
            if generation != self.generation or key in self._items:
                return
            self._items[key] = data
            self.size += len(data)
            while self.size > self.limit:
                _, old = self._items.popitem(last=False)
                self.size -= len(old)

    def discard(self, key: str) -> None:
        with self._lock:
            data = self._items.pop(key, None)
            if data is not None:
                self.size -= len(data)

    def clear(self, generation: int) -> None:
        """Forget everything: the cache folder moved to ``generation`` (a purge or removal)."""
        with self._lock:
            self._items.clear()
            self.size = 0
            self.generation = generation
