"""Small fakes behind the tier protocol, for the store's unit tests: never mocks of our classes."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Literal

from proxy.blocking import run
from proxy.digest import Digest
from proxy.errors import TierError
from proxy.tier import Blob, Payload, Stat, StreamBlob, Tier

Behaviour = Literal["serve", "miss", "raise", "hang", "corrupt"]


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha1(data).hexdigest())


class MemoryTier(Tier):
    """An in-memory tier that can be told to miss, raise, hang or send corrupt bytes, and that
    counts its calls. ``gate``, when given, holds every body after its first byte until set, so
    a test can act while a copy is arriving."""

    can_store = True

    def __init__(self, name: str, *, trusted: bool = False, timeout: float = 5.0, state_dir: str | None = None) -> None:
        self.name = name
        self.trusted = trusted
        self.timeout = timeout
        self.state_dir = state_dir
        self.blobs: dict[str, bytes] = {}
        self.behaviour: Behaviour = "serve"
        self.calls: Counter[str] = Counter()
        self.gate: asyncio.Event | None = None

    def add(self, data: bytes) -> Digest:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    async def _behave(self) -> None:
        if self.behaviour == "raise":
            raise TierError(f"{self.name}: told to fail")
        if self.behaviour == "hang":
            await asyncio.Event().wait()

    async def open(self, digest: Digest) -> Blob | None:
        self.calls["open"] += 1
        await self._behave()
        data = self.blobs.get(digest)
        if data is None or self.behaviour == "miss":
            return None
        if self.behaviour == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"x"
        return StreamBlob(self._body(data), len(data))

    async def _body(self, data: bytes) -> AsyncIterator[bytes]:
        yield data[:1]
        if self.gate is not None:
            await self.gate.wait()
        if data[1:]:
            yield data[1:]

    async def stat(self, digest: Digest) -> Stat | None:
        self.calls["stat"] += 1
        await self._behave()
        data = self.blobs.get(digest)
        return None if data is None or self.behaviour == "miss" else Stat(len(data))

    async def put(self, digest: Digest, payload: Payload) -> None:
        self.calls["put"] += 1
        await self._behave()
        data = payload.data
        if data is None:
            file = payload.open()
            assert file is not None
            with file:
                data = await run(file.read)
        self.blobs[digest] = data

    async def delete(self, digest: Digest) -> bool:
        self.calls["delete"] += 1
        return self.blobs.pop(digest, None) is not None
