"""An HTTP upstream: another casproxy, a CDN, any server that answers GET by digest.

The URL is a template (``{hash}``, ``{algorithm}``). Its bytes are verified like any tier's;
nothing it says about itself (X-Cache, ETag) is trusted. ``token`` is sent as a bearer token
(a casproxy with ``auth.require_ticket`` accepts its upload or admin tokens) and is masked by
check-config; ``headers`` are sent as given and shown by it, so secrets belong in ``token``.
Neither appears in logs, error details or /stats.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

from proxy.digest import Digest
from proxy.errors import ConfigError, TierError
from proxy.tier import Blob, Role, Stat, StreamBlob, Tier

_ABSENT = {404, 410}


class HttpTier(Tier):
    shared = True  # another casproxy (a regional one), or a CDN: every instance reads the same copies

    def __init__(
        self,
        url: str,
        *,
        name: str = "http",
        role: Role = "source",
        headers: dict[str, str] | None = None,
        token: str = "",
        max_connections: int = 64,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        if "{hash}" not in url:
            raise ValueError(f"url {url!r} has no {{hash}} placeholder")
        self.name = name
        self.role = role
        self.timeout = timeout
        self.url = url
        self._headers = dict(headers or {})
        if token:
            if "@" in url.partition("://")[2].partition("/")[0]:
                # aiohttp refuses to send both, and would refuse on every request: say it once, now
                raise ConfigError(f"tier {name!r}.token: the url already carries a user:password; use one or the other")
            self._headers["Authorization"] = f"Bearer {token}"
        self._limit = max_connections
        self._client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit),
            timeout=self._client_timeout,
            headers=self._headers,
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise TierError(f"{self.name}: not started")
        return self._session

    def _url(self, digest: Digest) -> str:
        return self.url.format(hash=digest, algorithm=digest.algorithm)

    async def open(self, digest: Digest) -> Blob | None:
        try:
            response = await self.session.get(self._url(digest))
        except (aiohttp.ClientError, TimeoutError) as error:
            raise _failed(self.name, error) from error
        if response.status in _ABSENT:
            response.release()
            return None
        if response.status != 200:
            response.release()
            raise TierError(f"{self.name}: upstream answered {response.status}")
        encoded = response.headers.get("Content-Encoding", "identity") not in ("", "identity")
        size = None if encoded else response.content_length

        async def chunks() -> AsyncIterator[bytes]:
            try:
                # As they came off the socket: iter_chunked(n) would join them into n-byte
                # bytes, a copy of the whole body on the event loop.
                async for chunk, _ in response.content.iter_chunks():
                    if chunk:
                        yield chunk
            except (aiohttp.ClientError, TimeoutError) as error:
                raise _failed(self.name, error) from error

        async def close() -> None:
            # A body left unread (a trickle below min_rate, a copy found bad) drops its
            # connection at once; one read to its end goes back to the pool.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

        return StreamBlob(chunks(), size, close)

    async def stat(self, digest: Digest) -> Stat | None:
        try:
            async with self.session.head(self._url(digest)) as response:
                if response.status in _ABSENT:
                    return None
                if response.status != 200:
                    raise TierError(f"{self.name}: upstream answered {response.status}")
                return Stat(response.content_length)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise _failed(self.name, error) from error

    def describe(self) -> dict[str, object]:
        return {"url": _without_credentials(self.url)}


def _failed(name: str, error: Exception) -> TierError:
    # str(), never repr(): aiohttp's repr of a response error includes the request's headers,
    # and with them the bearer token.
    text = str(error)
    return TierError(f"{name}: {type(error).__name__}" + (f": {text}" if text else ""))


def _without_credentials(url: str) -> str:
    """The URL as /stats may show it: no user:password@."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:
        return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"
    return url
