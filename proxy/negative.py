"""Remembers "found nowhere" for a while, in memory or in Redis shared by many instances.

A negative cache is an optimisation only: when its backend fails or is slow, lookups carry on
as if it were empty.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlparse

from aiocache import Cache
from aiocache.serializers import StringSerializer

log = logging.getLogger(__name__)
_NAMESPACE = "casproxy:absent:"
_BACKEND_TIMEOUT = 0.25  # seconds: far below any upstream round trip, so a sick Redis costs little


class NegativeCache:
    def __init__(self, url: str = "memory://", ttl: float = 30.0) -> None:
        self.url = url
        self.ttl = ttl
        self.hits = 0
        self.failures = 0
        self._cache: Any = None
        if ttl > 0:
            # Strings only: the default serializers of some backends pickle.
            self._cache = Cache.from_url(url)
            self._cache.serializer = StringSerializer()
            self._cache.namespace = _NAMESPACE

    @property
    def shared(self) -> bool:
        return urlparse(self.url).scheme != "memory"

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._cache is None:
            return None
        try:
            return await asyncio.wait_for(getattr(self._cache, method)(*args, **kwargs), _BACKEND_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - any backend failure degrades to "no entry"
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.warning("negative cache %s unavailable (%d failures): %r", self.url, self.failures, error)
            return None

    async def contains(self, digest: str) -> bool:
        found = await self._call("exists", digest) is True
        self.hits += found
        return found

    async def add(self, digest: str) -> None:
        await self._call("set", digest, "1", ttl=self.ttl)

    async def discard(self, digest: str) -> None:
        await self._call("delete", digest)

    async def close(self) -> None:
        if self._cache is not None:
            await self._call("close")
