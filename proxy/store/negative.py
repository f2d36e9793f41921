"""Remembers "found nowhere" for a while, in memory or in Redis shared by many instances.

A negative cache is an optimisation only: when its backend fails or is slow, lookups carry on
as if it were empty. After a failure the backend is left alone for a few seconds (then one call
probes it), so a dead Redis costs one short timeout now and then, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlparse, urlunparse

from aiocache import Cache
from aiocache.serializers import StringSerializer

from proxy.errors import ConfigError
from proxy.store.breaker import Breaker

log = logging.getLogger(__name__)
_NAMESPACE = "casproxy:absent"  # Redis keys: casproxy:absent:<digest>
_BACKEND_TIMEOUT = 0.25  # seconds: far below any upstream round trip, so a sick Redis costs little
_BACKEND_RETRY = 2.0  # seconds to leave a failed backend alone before one call tries it again
_CLOCK_SIZE = 8  # bytes: one native unsigned 64-bit integer
_MAX_UNSENT = 10_000  # clears kept for resending; past that, entries expire by their TTL


class UploadClock:
    """When any process sharing a cache folder last stored a blob, in ns since the epoch.

    A memory negative cache is private to its process: an upload answered by another worker (or
    a ``casproxy import``) clears only that process's entry. So every store moves this shared
    clock forward, and a private entry counts only if its walk began after the last store.

    The clock is 8 bytes of a file mapped shared into every process: reading it is one aligned
    memory load (never torn, no syscall), cheap enough for every negative-cache lookup.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._value: memoryview | None = None  # the mapped 8 bytes as one unsigned 64-bit int

    def _open(self) -> memoryview:
        if self._value is None:
            # Once per process (the folder may only exist once the disk tier has started).
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self._fd).st_size < _CLOCK_SIZE:
                os.ftruncate(self._fd, _CLOCK_SIZE)  # zeros; never shrinks a clock in use
            self._map = mmap.mmap(self._fd, _CLOCK_SIZE)
            self._value = memoryview(self._map).cast("Q")
        return self._value

    def last(self) -> int:
        return int(self._open()[0])

    def advance(self) -> None:
        value = self._open()
        assert self._fd is not None
        fcntl.lockf(self._fd, fcntl.LOCK_EX)  # read-modify-write: the clock never goes back
        try:
            value[0] = max(value[0], time.time_ns())
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._value is not None:
            self._value.release()
            self._value = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BoundedMemory:
    """The memory:// backend: entries that expire after their TTL, at most ``limit`` of them (the
    oldest forgotten first), so a flood of lookups for digests that exist nowhere cannot grow
    the process without bound. Speaks the part of aiocache's interface the cache uses."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()  # key -> (expires, value)

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[1]

    async def exists(self, key: str) -> bool:
        return await self.get(key) is not None

    async def set(self, key: str, value: str, ttl: float) -> None:
        now = time.monotonic()
        self._entries.pop(key, None)
        self._entries[key] = (now + ttl, value)
        # Oldest first: drop the expired (one TTL for all, so they lead) and any over the limit,
        # so what is held is about TTL x the rate of misses, not the limit.
        while self._entries:
            first = next(iter(self._entries.values()))
            if first[0] > now and len(self._entries) <= self.limit:
                break
            self._entries.popitem(last=False)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def close(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class NegativeCache:
    def __init__(
        self, url: str = "memory://", ttl: float = 30.0, clock: UploadClock | None = None, max_entries: int = 100_000
    ) -> None:
        self.url = without_password(url)  # shown in /stats and logs
        # Always a float: aiocache then sets Redis keys with PSETEX; an int picks SETEX, which
        # redis-py (5+) reports as deprecated on every call.
        self.ttl = float(ttl)
        self.hits = 0
        self.failures = 0
        self._backend = Breaker(threshold=1, cooldown=_BACKEND_RETRY)
        # Clears that could not reach the backend, sent again once it answers: an upload must
        # not stay "found nowhere" for other instances because Redis blinked.
        self._unsent_discards: set[str] = set()
        self._resender: asyncio.Task[None] | None = None
        self.clock = clock if urlparse(url).scheme == "memory" else None  # Redis is shared already
        self._cache: Any = None
        if self.ttl > 0 and not self.shared:
            self._cache = BoundedMemory(max_entries)
        elif self.ttl > 0:
            try:
                self._cache = Cache.from_url(url)
            except Exception as error:  # noqa: BLE001 - aiocache raises several kinds for a bad URL
                raise ConfigError(f"negative_cache.url: cannot use {self.url!r}: {error}") from None
            # Strings only: the default serializers of some backends pickle.
            self._cache.serializer = StringSerializer()
            self._cache.namespace = _NAMESPACE

    @property
    def shared(self) -> bool:
        return urlparse(self.url).scheme != "memory"

    @property
    def available(self) -> bool:
        """False while the backend is left alone after a failure."""
        return self._backend.state == "closed"

    async def _call(self, method: str, *args: Any, force: bool = False, **kwargs: Any) -> Any:
        """The backend's answer; raises _Unavailable if it failed or is being left alone (unless
        ``force``: clears are worth a short wait)."""
        if self._cache is None or not (self._backend.allow() or force):
            raise _Unavailable
        try:
            answer = await asyncio.wait_for(getattr(self._cache, method)(*args, **kwargs), _BACKEND_TIMEOUT)
        except Exception as error:  # any backend failure degrades to "no entry"
            self.failures += 1
            if self._backend.opened_at is None:  # log the start of an outage, not every probe
                log.warning("negative cache %s unavailable, working without it: %r", self.url, error)
            self._backend.failed()
            raise _Unavailable from error
        if self._backend.opened_at is not None:
            log.warning("negative cache %s is back", self.url)
        self._backend.succeeded()
        return answer

    async def _resend_discards(self) -> None:
        """Keep trying the clears that failed, until they all reach the backend: another
        instance may answer "found nowhere" from the entry until they do."""
        while self._unsent_discards:
            await asyncio.sleep(_BACKEND_RETRY)
            pending, self._unsent_discards = list(self._unsent_discards), set()
            for index, digest in enumerate(pending):
                try:
                    await asyncio.wait_for(self._cache.delete(digest), _BACKEND_TIMEOUT)
                except Exception:  # noqa: BLE001 - still down: keep the rest for the next round
                    self._unsent_discards.update(pending[index:])
                    break
        self._resender = None

    def now(self) -> int:
        """Take this when a walk begins; pass it to ``add`` when the walk found nothing."""
        return time.time_ns()

    async def contains(self, digest: str) -> bool:
        try:
            if self.clock is None:
                found = await self._call("exists", digest) is True
            else:
                began = await self._call("get", digest)
                found = began is not None and int(began) > self.clock.last()
        except _Unavailable:
            return False
        self.hits += found
        return found

    async def add(self, digest: str, began: int | None = None) -> None:
        """Remember that a walk which began at ``began`` (see ``now``) found ``digest`` nowhere."""
        with contextlib.suppress(_Unavailable):
            await self._call("set", digest, str(began or self.now()), ttl=self.ttl)

    async def discard(self, digest: str) -> None:
        """Forget ``digest`` at once, here and (through the clock) in the other workers; tried
        even while the backend is being left alone."""
        if self.clock is not None:
            await asyncio.to_thread(self.clock.advance)
        if self._cache is None:
            return
        try:
            await self._call("delete", digest, force=True)
        except _Unavailable:
            if len(self._unsent_discards) < _MAX_UNSENT:
                self._unsent_discards.add(digest)
            if self._resender is None:
                self._resender = asyncio.get_running_loop().create_task(self._resend_discards())

    async def close(self) -> None:
        if self.clock is not None:
            self.clock.close()
        if self._cache is None:
            return
        if self._resender is not None:  # clears still owed expire with their entries' TTL
            self._resender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resender
        # aiocache 0.12 closes redis-py's client with close(), deprecated since redis 5.0.1.
        client: Any = getattr(self._cache, "client", None)
        closing = client.aclose() if hasattr(client, "aclose") else self._cache.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(closing, _BACKEND_TIMEOUT)


class _Unavailable(Exception):
    """The backend failed, or is being left alone after a failure."""


def without_password(url: str) -> str:
    parts = urlparse(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunparse(parts._replace(netloc=netloc))
