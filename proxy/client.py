"""A client for a casproxy server: uploads answered with tickets, downloads verified.

``AsyncClient`` speaks aiohttp; ``Client`` is the same API for code without an event loop. Every
byte downloaded is hashed: a client never returns (or leaves on disk) bytes that do not match
the name they were asked for. Server errors arrive as the ``proxy.errors`` classes named by the
problem ``type``; transport failures (refused connection, timeout, cut body) as aiohttp's own
``ClientError`` / ``TimeoutError``, after the retries idempotent requests get.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from proxy.blocking import run
from proxy.digest import ALGORITHMS, Algorithm, Digest
from proxy.errors import (
    BadDigest,
    BadRequest,
    DigestMismatch,
    Forbidden,
    NotFound,
    ProxyError,
    RangeNotSatisfiable,
    TicketExpired,
    TooLarge,
    Unauthorized,
    UpstreamFailed,
)
from proxy.tickets import Ticket

__all__ = ["DEFAULT_URL", "AsyncClient", "Client", "Ticket"]

DEFAULT_URL = "http://127.0.0.1:8080"
MAX_MISSING_BATCH = 10_000  # the server's limit per POST /{algorithm}/missing
_CHUNK = 1 << 20
_RETRY_STATUSES = frozenset({502, 503})
_ERRORS: dict[str, type[ProxyError]] = {
    cls.type: cls
    for cls in (
        BadRequest,
        BadDigest,
        DigestMismatch,
        Unauthorized,
        Forbidden,
        TicketExpired,
        NotFound,
        TooLarge,
        RangeNotSatisfiable,
        UpstreamFailed,
    )
}
_ERRORS_BY_STATUS: dict[int, type[ProxyError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: TooLarge,
    502: UpstreamFailed,
    503: UpstreamFailed,
}

Progress = Callable[[int], None]
"""Called with the size of each chunk sent or received."""
Data = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]
T = TypeVar("T")


def _ticket_from_json(body: dict[str, Any]) -> Ticket:
    algorithm = next(a for a in ALGORITHMS if a in body)
    size = body.get("size")
    return Ticket(
        Digest.parse(body[algorithm], algorithm),
        int(size) if size is not None else None,
        body["url"],
        body["ticket"],
        int(body["expires"]),
    )


async def _error_of(response: aiohttp.ClientResponse) -> ProxyError:
    """The typed error for a failed response, with the server's ``detail`` as its message."""
    text = await response.text(errors="replace")
    try:
        problem = json.loads(text)
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {}
    cls = _ERRORS.get(str(problem.get("type")), _ERRORS_BY_STATUS.get(response.status, ProxyError))
    # Without the query: a ticket's signature does not belong in an error message.
    where = response.url.with_query(None)
    detail = str(problem.get("detail") or f"HTTP {response.status} {response.reason} from {where}")
    if issubclass(cls, UpstreamFailed):
        after = _retry_after(response)
        error: ProxyError = cls(detail, retry_after=5 if after is None else after)
    else:
        error = cls(detail)
    error.status = response.status  # also right for an unknown type that fell back to ProxyError
    return error


def _retry_after(response: aiohttp.ClientResponse) -> int | None:
    value = response.headers.get("Retry-After", "")
    return int(value) if value.isdigit() else None  # the HTTP-date form is not worth parsing here


def _hash_file(file: IO[bytes], algorithm: Algorithm) -> tuple[Digest, int]:
    hasher = hashlib.new(algorithm)
    size = 0
    while chunk := file.read(_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return Digest(hasher.hexdigest()), size


async def _file_body(file: IO[bytes], size: int, progress: Progress | None) -> AsyncIterator[bytes]:
    left = size
    while left > 0:
        chunk = await asyncio.to_thread(file.read, min(_CHUNK, left))
        if not chunk:
            raise DigestMismatch(f"the file lost {left} bytes after it was hashed; nothing was stored")
        left -= len(chunk)
        if progress is not None:
            progress(len(chunk))
        yield chunk


class AsyncClient:
    """One aiohttp session to a casproxy at ``base_url``; use ``async with`` or call ``close()``.

    ``token`` is sent as ``Authorization: Bearer`` only to URLs under ``base_url`` (a ticket URL
    for another host never sees it). ``timeout`` bounds connecting and each wait for bytes, not
    a whole transfer. GETs and missing-queries are retried ``retries`` times on connection
    errors and 502/503 with backoff, honouring Retry-After up to ``max_retry_after`` seconds.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 2,
        max_retry_after: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.max_retry_after = max_retry_after
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use so that it belongs to the loop that uses it.
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def locate(self, ref: str | Ticket) -> tuple[Digest, str]:
        """The digest and URL for a hash, a ticket, or a ticket (or blob) URL."""
        if isinstance(ref, Ticket):
            return ref.digest, ref.ticket
        if "://" not in ref:
            digest = Digest.parse(ref)
            return digest, f"{self.base_url}/{digest.algorithm}/{digest}"
        folder, _, name = urlsplit(ref).path.rpartition("/")
        algorithm = folder.rpartition("/")[2]
        if algorithm not in ALGORITHMS:
            raise BadDigest(f"{ref[:120]!r} is not a blob URL: want .../sha1/<hash> or .../sha256/<hash>")
        return Digest.parse(name, algorithm), ref

    def _headers(self, url: str) -> dict[str, str]:
        return self._auth if url.startswith(self.base_url + "/") else {}

    async def _request(
        self, method: str, url: str, *, retry: bool, headers: dict[str, str] | None = None, **options: Any
    ) -> aiohttp.ClientResponse:
        """A response with a status below 400; anything else raises its typed error."""
        headers = (headers or {}) | self._headers(url)
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            # Exponential backoff with jitter, so that parallel downloads do not retry in lockstep.
            delay = 0.25 * 2**attempt * random.uniform(0.5, 1.0)
            try:
                response = await self._http().request(method, url, headers=headers, **options)
            except (aiohttp.ClientConnectionError, TimeoutError):
                if last:
                    raise
            else:
                if response.status < 400:
                    return response
                error = await _error_of(response)
                response.release()
                if last or response.status not in _RETRY_STATUSES:
                    raise error
                after = _retry_after(response)
                if after is not None:
                    delay = min(float(after), self.max_retry_after)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def put(self, data: Data, algorithm: Algorithm = "sha1", *, progress: Progress | None = None) -> Ticket:
        """Upload bytes, a file path, or a binary file object (from its current position).

        A file is hashed in one streaming pass and sent in a second, so it is never held in
        memory; the server checks the bytes against the name (DigestMismatch if the file
        changed in between). PUT is not retried: a file object cannot be replayed.
        """
        if isinstance(data, bytes | bytearray | memoryview):
            body = bytes(data)
            # Hashing blocks; large buffers go to a thread so the loop keeps serving others.
            hex_ = await asyncio.to_thread(lambda: hashlib.new(algorithm, body).hexdigest())
            digest = Digest(hex_)
            ticket = await self._put(digest, body, len(body))
            if progress is not None:
                progress(len(body))
            return ticket
        if isinstance(data, str | os.PathLike):
            file = await asyncio.to_thread(open, data, "rb")
            try:
                return await self._put_file(file, algorithm, progress)
            finally:
                file.close()
        return await self._put_file(data, algorithm, progress)

    async def _put_file(self, file: IO[bytes], algorithm: Algorithm, progress: Progress | None) -> Ticket:
        if not file.seekable():
            raise ValueError("put() needs a seekable file: it is read twice, to hash it and to send it")
        start = file.tell()
        digest, size = await asyncio.to_thread(_hash_file, file, algorithm)
        file.seek(start)
        return await self._put(digest, _file_body(file, size, progress), size)

    async def _put(self, digest: Digest, body: bytes | AsyncIterator[bytes], size: int) -> Ticket:
        url = f"{self.base_url}/{digest.algorithm}/{digest}"
        # An explicit length lets the server refuse an oversized body before it is sent.
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        try:
            response = await self._request("PUT", url, retry=False, data=body, headers=headers)
        except aiohttp.ClientConnectionError as error:
            # aiohttp wraps what the body raised (the file shrank): that is the news, not the socket.
            if isinstance(error.__cause__, DigestMismatch):
                raise error.__cause__ from None
            raise
        async with response:
            return _ticket_from_json(await response.json())

    async def stream(
        self, ref: str | Ticket, *, progress: Progress | None = None, sized: Progress | None = None
    ) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks, verified: the last chunk is held back until the digest
        matches, so a consumer never sees a complete wrong body (DigestMismatch instead).
        ``sized`` is told the blob's size as soon as the server says it."""
        digest, url = self.locate(ref)
        response = await self._request("GET", url, retry=True)
        async with response:
            if sized is not None and response.content_length is not None:
                sized(response.content_length)
            hasher = digest.hasher()
            held: bytes | None = None
            async for chunk in response.content.iter_chunked(_CHUNK):
                hasher.update(chunk)
                if progress is not None:
                    progress(len(chunk))
                if held is not None:
                    yield held
                held = chunk
            if not digest.matches(hasher):
                raise DigestMismatch(f"the server sent bytes that hash to {hasher.hexdigest()}, not {digest}")
            if held is not None:
                yield held

    async def get(self, ref: str | Ticket) -> bytes:
        """The blob's bytes, verified against its name. It holds the blob once: the bytes fill a
        buffer of the announced size in place and are handed back without a copy (joining the
        chunks held them twice). Use ``download`` or ``stream`` for blobs that should not be in
        memory at all."""
        digest, url = self.locate(ref)
        response = await self._request("GET", url, retry=True)
        async with response:
            # A decoded body (Content-Encoding) has another length than the one announced.
            size = None if response.headers.get("Content-Encoding") else response.content_length
            # BytesIO over a bytes object it alone holds writes into it in place, and getvalue()
            # returns that object when it is exactly full (CPython); bytes(n) is calloc'd, so its
            # pages cost nothing until written.
            buffer = io.BytesIO(bytes(size or 0))
            hasher = digest.hasher()
            async for chunk in response.content.iter_chunked(_CHUNK):
                hasher.update(chunk)
                buffer.write(chunk)
            if size is not None and buffer.tell() != size:
                raise DigestMismatch(f"the server announced {size} bytes and sent {buffer.tell()}")
            if not digest.matches(hasher):
                raise DigestMismatch(f"the server sent bytes that hash to {hasher.hexdigest()}, not {digest}")
            return buffer.getvalue()

    async def download(
        self,
        ref: str | Ticket,
        path: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        sized: Progress | None = None,
    ) -> int:
        """Write the blob to ``path`` via a temp file beside it, renamed only once verified.
        Returns the size."""
        target = Path(path)
        # Not mkstemp: that file would be 0600; this one gets the umask's mode like any other.
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        size = 0
        try:
            file = await run(open, temp, "xb")
            try:
                async for chunk in self.stream(ref, progress=progress, sized=sized):
                    await run(file.write, chunk)
                    size += len(chunk)
            finally:
                await run(file.close)
            await run(os.replace, temp, target)
        except BaseException:
            # Shielded: a second cancel while it runs must not leave the temp file behind.
            await asyncio.shield(run(temp.unlink, missing_ok=True))
            raise
        return size

    async def get_many(self, refs: Sequence[str | Ticket], concurrency: int = 16) -> list[bytes]:
        """Every blob, in the order asked. The first failure (NotFound, ...) is raised and the
        remaining downloads are cancelled: a caller gets all the blobs or an exception."""
        results: list[bytes] = [b""] * len(refs)
        work = iter(enumerate(refs))  # shared by the workers: each item is taken once

        async def worker() -> None:
            for index, ref in work:
                results[index] = await self.get(ref)

        workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(refs)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return results

    async def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes no tier has, in the order given (normalised to lower case); sha1 and
        sha256 may be mixed. Large lists go in batches the server accepts."""
        digests = [Digest.parse(h) for h in hashes]
        gone: set[Digest] = set()
        for algorithm in ALGORITHMS:
            names = list(dict.fromkeys(d for d in digests if d.algorithm == algorithm))
            for start in range(0, len(names), MAX_MISSING_BATCH):
                batch = names[start : start + MAX_MISSING_BATCH]
                url = f"{self.base_url}/{algorithm}/missing"
                # Read-only, so safe to retry although it is a POST.
                async with await self._request("POST", url, retry=True, json={"hashes": batch}) as response:
                    gone.update(Digest(h) for h in (await response.json())["missing"])
        return [d for d in digests if d in gone]


class Client:
    """The blocking face of ``AsyncClient``, for scripts: its event loop runs in a private
    thread, so it works whether or not the calling thread has a loop. Progress callbacks are
    called in that thread. Use ``with`` or call ``close()``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 2,
        max_retry_after: float = 10.0,
    ) -> None:
        self._client = AsyncClient(base_url, token, timeout=timeout, retries=retries, max_retry_after=max_retry_after)
        self._loop = asyncio.new_event_loop()
        # A daemon, so a client that was never closed cannot keep the interpreter alive.
        self._thread = threading.Thread(target=self._loop.run_forever, name="casproxy-client", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return self._client.base_url

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the caller: do not leave the transfer running
            raise

    def put(self, data: Data, algorithm: Algorithm = "sha1", *, progress: Progress | None = None) -> Ticket:
        return self._run(self._client.put(data, algorithm, progress=progress))

    def get(self, ref: str | Ticket) -> bytes:
        return self._run(self._client.get(ref))

    def download(self, ref: str | Ticket, path: str | os.PathLike[str], *, progress: Progress | None = None) -> int:
        return self._run(self._client.download(ref, path, progress=progress))

    def get_many(self, refs: Sequence[str | Ticket], concurrency: int = 16) -> list[bytes]:
        return self._run(self._client.get_many(refs, concurrency))

    def missing(self, hashes: Iterable[str]) -> list[str]:
        return self._run(self._client.missing(hashes))
