"""Pluggable origins: a user's class that fetches a blob by digest from anywhere.

    class MyAPI(APIOrigin):
        async def fetch(self, digest: str) -> bytes | AsyncIterator[bytes] | None: ...

Whatever it returns is verified like any other tier's bytes.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import Any

from proxy.digest import Digest
from proxy.errors import ConfigError
from proxy.tier import Blob, BytesBlob, Role, Stat, StreamBlob, Tier


class APIOrigin:
    """Subclass and implement ``fetch``; ``exists``, ``start`` and ``close`` are optional."""

    name: str = "api"

    async def fetch(self, digest: Digest) -> bytes | AsyncIterator[bytes] | None:
        raise NotImplementedError

    async def exists(self, digest: Digest) -> bool:
        """A cheap existence check; the default asks ``fetch``."""
        raise NotImplementedError

    async def start(self) -> None:
        """Open clients and connections."""

    async def close(self) -> None:
        """Release what start() opened."""


class ApiTier(Tier):
    """Adapts an APIOrigin to the tier protocol."""

    def __init__(
        self, origin: APIOrigin, *, name: str | None = None, role: Role = "source", timeout: float = 10.0
    ) -> None:
        self.origin = origin
        self.name = name or getattr(origin, "name", None) or type(origin).__name__
        self.role = role
        self.timeout = timeout
        self._has_exists = type(origin).exists is not APIOrigin.exists

    async def start(self) -> None:
        await self.origin.start()

    async def close(self) -> None:
        await self.origin.close()

    async def open(self, digest: Digest) -> Blob | None:
        result = await self.origin.fetch(digest)
        if result is None:
            return None
        if isinstance(result, bytes | bytearray | memoryview):
            return BytesBlob(bytes(result))
        return StreamBlob(result)

    async def stat(self, digest: Digest) -> Stat | None:
        if self._has_exists:
            return Stat() if await self.origin.exists(digest) else None
        return await super().stat(digest)


def load_origin(spec: str, options: dict[str, Any]) -> APIOrigin:
    """Instantiate ``package.module:ClassName`` with ``options`` as keyword arguments."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"class {spec!r}: want 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"class {spec!r} cannot be loaded: {error}") from error
    try:
        origin = cls(**options)
    except TypeError as error:
        raise ConfigError(f"class {spec!r} does not take these options: {error}") from error
    if not callable(getattr(origin, "fetch", None)):
        raise ConfigError(f"class {spec!r} has no async fetch(digest) method")
    return origin  # type: ignore[no-any-return]
