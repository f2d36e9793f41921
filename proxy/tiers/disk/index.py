"""The disk cache's index: diskcache (SQLite plus files) holding raw bytes and their checksums.

The only module that touches diskcache, including the private ``_sql`` that least-recently-used
eviction needs. Every method blocks (SQLite, files): call them in the tier's executor.
The directory holds raw bytes only: RawDisk refuses to store or load pickles, since diskcache
would unpickle whatever it finds in its database.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from typing import Any, BinaryIO

import diskcache

from proxy.liveness import temp_prefix
from proxy.tiers.disk import reserve

VALUE_SUFFIX = ".val"  # diskcache's name for the file of a large value
# SQLite's page cache, per connection: diskcache opens one per thread and handle (2 handles x
# the tier's threads), each 32 MiB by diskcache's default, which a soak grew into (RSS +12 MiB a
# minute per worker, bench/soak.py). 1024 pages = 4 MiB each; the OS page cache still holds
# the database, and hot blobs are served from the hot cache in memory anyway.
SQLITE_CACHE_PAGES = 1024


class _LinkFrom:
    """A verified file to move into the cache by hard link (copy across filesystems)."""

    def __init__(self, path: str) -> None:
        self.path = path


class RawDisk(diskcache.Disk):  # type: ignore[misc]
    """Keys are digest strings and values raw bytes; nothing is ever pickled or unpickled."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if not isinstance(key, str):
            raise TypeError("disk tier keys are digest strings")
        return str(key), True  # plain str: sqlite3 does not adapt subclasses

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise ValueError("refusing a pickled key from the cache database")
        return key

    def filename(self, key: Any = diskcache.UNKNOWN, value: Any = diskcache.UNKNOWN) -> tuple[str, str]:
        # The writer's pid leads the name: a file linked in by a process killed before its row
        # was committed is then known as an orphan (recovery.sweep_torn), not a write in flight.
        filename, _ = super().filename(key, value)
        folder, name = os.path.split(filename)
        filename = os.path.join(folder, temp_prefix("") + name)
        return filename, os.path.join(self._directory, filename)

    def store(self, value: Any, read: bool, key: Any = diskcache.UNKNOWN) -> tuple[Any, ...]:
        if isinstance(value, _LinkFrom):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            try:
                os.link(value.path, full_path)
            except OSError:
                shutil.copyfile(value.path, full_path)
            return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None
        if type(value) is not bytes:
            raise TypeError("disk tier values are bytes")
        return super().store(value, read, key)  # type: ignore[no-any-return]

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise ValueError(f"refusing cache entry of mode {mode}: not raw bytes")
        return super().fetch(mode, filename, value, read)


class Index:
    """Entries by digest: bytes in SQLite (small) or in files (large), each with a checksum
    in diskcache's ``tag`` column (None for entries of versions before checksums)."""

    def __init__(self, path: str, size_limit: int, file_threshold: int) -> None:
        self.path = path
        reserve.release_if_short(path)  # opening writes (see reserve.py)
        self._cache = diskcache.Cache(
            path,
            disk=RawDisk,
            size_limit=size_limit,
            disk_min_file_size=file_threshold,
            eviction_policy="least-recently-used",
            cull_limit=0,  # evicting is ours (eviction.make_room): diskcache's drops in batches
            statistics=False,
            sqlite_cache_size=SQLITE_CACHE_PAGES,
        )
        # diskcache's LRU writes access_time in a transaction on every get, so hits would queue
        # on SQLite's write lock. Reads use a second handle whose policy (in memory only) is
        # "none" (a plain SELECT); hits are recorded and their access times written in batches.
        self._reader = diskcache.Cache(path, disk=RawDisk, sqlite_cache_size=SQLITE_CACHE_PAGES)
        self._reader.reset("eviction_policy", "none", update=False)

    def close(self) -> None:
        self._cache.close()
        self._reader.close()

    def get(self, key: str) -> tuple[bytes | BinaryIO, str | None] | None:
        """The entry's bytes (or its open file) and checksum; None if absent. Raises OSError or
        ValueError for an entry that vanished under us or is not ours."""
        value, tag = self._reader.get(key, read=True, tag=True)
        if value is None:
            return None
        return value, tag if isinstance(tag, str) else None

    def set_bytes(self, key: str, data: bytes, checksum: str) -> None:
        self._cache.set(key, data, tag=checksum)

    def set_file(self, key: str, path: str, checksum: str) -> None:
        """Commit a verified file by hard link: it is on the same filesystem already."""
        self._cache.set(key, _LinkFrom(path), read=True, tag=checksum)

    def set_checksum(self, key: str, checksum: str) -> None:
        """Record the checksum of an entry that had none (verified against its name)."""
        self._cache._sql("UPDATE Cache SET tag = ? WHERE key = ? AND raw = 1", (checksum, key))

    def delete(self, key: str) -> bool:
        reserve.release_if_short(self.path)  # a full disk must still free space
        return bool(self._cache.delete(key))

    def touch(self, keys: Iterable[str]) -> None:
        """Write the access times of recent hits in one transaction (the LRU order)."""
        with self._cache.transact():
            for key in keys:
                found = self._cache.get(key, read=True)  # the LRU policy updates access_time
                if found is not None and not isinstance(found, bytes):
                    found.close()

    def least_recent(self) -> str | None:
        # diskcache has no public "least recently used key"; its schema has been stable since
        # 4.0 (access_time is what its own LRU culling orders by).
        row = self._cache._sql("SELECT key FROM Cache ORDER BY access_time LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    def volume(self) -> int:
        """Bytes used (database pages and files), from diskcache's running totals: cheap."""
        return int(self._cache.volume())

    def count(self) -> int:
        return len(self._cache)

    def digests(self) -> list[str]:
        return [str(key) for key in self._reader.iterkeys()]

    def files(self) -> set[str]:
        """The value files the index knows, relative to the folder."""
        rows = self._cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()
        return {os.path.normpath(row[0]) for row in rows}
