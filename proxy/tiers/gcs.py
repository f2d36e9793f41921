"""A bucket tier on Google Cloud Storage's JSON API, over gcloud-aio-storage (aiohttp-native).

The library is the ``gcs`` extra (``pip install 'casproxy[gcs]'``) and is imported when a tier is
made, so ``proxy.tiers`` imports without it. It gives us credentials (a service file or the usual
default discovery), the API root (``STORAGE_EMULATOR_HOST`` included) and the small JSON calls;
reads and large writes are streamed here on the same session, because the library either buffers
whole objects or hides the response headers we need.

GCS decompresses objects stored with ``Content-Encoding: gzip`` for clients that do not accept
gzip ("decompressive transcoding"), and aiohttp would decompress what it does accept. So objects
are stored with no Content-Encoding (the at-rest encoding is this tier's own business), and reads
ask for the stored bytes as they are (``Accept-Encoding: gzip``, no automatic decompression).
"""

from __future__ import annotations

import json
import typing
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy.blocking import run
from proxy.digest import Digest
from proxy.encoding import Encoding, Layout, decode_stream, encode_bytes, object_key
from proxy.errors import ConfigError, TierError
from proxy.tier import CHUNK_SIZE, Blob, Payload, Role, Stat, StreamBlob, Tier
from proxy.tiers.bucket import SIZE_METADATA, parse_bucket_url
from proxy.tiers.gcs_upload import CONTENT_TYPE, UPLOAD_CHUNK, ResumableUpload, error_text, say

if typing.TYPE_CHECKING:
    from gcloud.aio.storage import Storage

INSTALL_HINT = "pip install 'casproxy[gcs]'"


class GcsTier(Tier):
    can_store = True
    shared = True  # every instance reads the same bucket

    def __init__(
        self,
        url: str,
        *,
        name: str = "gcs",
        role: Role = "source",
        layout: Layout = "flat",
        encoding: Encoding = "identity",
        endpoint_url: str | None = None,
        service_file: str | None = None,
        max_connections: int = 32,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        try:
            from gcloud.aio.storage.storage import init_api_root
        except ImportError:
            raise ConfigError(f"tier {name!r}: kind 'gcs' needs gcloud-aio-storage: {INSTALL_HINT}") from None
        self.name = name
        self.role = role
        self.timeout = timeout
        self.url = url
        self.bucket, self.prefix = parse_bucket_url(url, "gs")
        self.layout = layout
        self.encoding = encoding
        self.service_file = service_file or None
        # An endpoint (or STORAGE_EMULATOR_HOST) is an emulator, as gcloud-aio-storage takes it:
        # no credentials, no TLS check. With a service_file it is an authenticated API root.
        explicit_auth = False if endpoint_url and self.service_file else None
        self._emulator, root = init_api_root(endpoint_url or None, explicit_auth)
        self.api_root = root.rstrip("/")
        self._limit = max_connections
        self._client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._storage: Storage | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        from gcloud.aio.storage import Storage

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit, ssl=not self._emulator),
            timeout=self._client_timeout,
        )

        # The library types its session as requests' (it also builds a sync variant); it is ours.
        session: Any = self._session

        def make() -> Storage:  # reads the credentials file: not on the event loop
            if self.service_file:
                # The library takes an unreadable file for "no file" and asks the GCE metadata
                # server instead: a broken file must be a config error, not a silent fallback.
                with open(self.service_file, encoding="utf-8") as file:
                    json.load(file)
            return Storage(
                session=session,
                service_file=self.service_file,
                api_root=self.api_root,
                api_is_dev=self._emulator,
            )

        try:
            self._storage = await run(make)
        except (OSError, ValueError, KeyError) as error:
            await self._session.close()
            self._session = None
            raise ConfigError(f"tier {self.name!r}: credentials {self.service_file or '(default)'}: {error}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._storage = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            raise TierError(f"{self.name}: not started")
        return self._storage

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise TierError(f"{self.name}: not started")
        return self._session

    def key(self, digest: str) -> str:
        return object_key(self.prefix, digest, self.layout)

    def _object_url(self, key: str) -> str:
        return f"{self.api_root}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(key, safe='')}"

    async def _auth(self) -> dict[str, str]:
        if self._emulator:
            return {}
        try:
            token = await self.storage.token.get()
        except Exception as error:  # the library raises whatever its token source raised
            raise TierError(f"{self.name}: no access token: {say(error)}") from error
        return {"Authorization": f"Bearer {token}"}

    # -- the protocol --------------------------------------------------------------------

    async def open(self, digest: Digest) -> Blob | None:
        headers = {**await self._auth(), "Accept-Encoding": "gzip"}
        try:
            response = await self.session.get(
                self._object_url(self.key(digest)), params={"alt": "media"}, headers=headers, auto_decompress=False
            )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TierError(f"{self.name}: {say(error)}") from error
        if response.status == 404:
            response.release()
            return None
        if response.status != 200:
            text = await error_text(response)
            raise TierError(f"{self.name}: GCS answered {response.status}: {text}")
        layers = self._layers(response.headers)
        chunks = self._body(response)
        for layer in layers:
            chunks = decode_stream(chunks, layer)
        size = response.headers.get(f"X-Goog-Meta-{SIZE_METADATA}")
        if size is not None and size.isdigit():
            known: int | None = int(size)
        else:
            known = response.content_length if not layers else None

        async def close() -> None:
            response.release()

        return StreamBlob(chunks, known, close)

    def _layers(self, headers: Mapping[str, str]) -> list[Encoding]:
        """The encodings to undo, outermost first, for a body sent as GCS sends it raw."""
        sent = headers.get("Content-Encoding", "identity").lower()
        stored = headers.get("X-Goog-Stored-Content-Encoding", sent).lower()
        layers: list[Encoding] = []
        if sent == "gzip" and stored != "gzip":
            layers.append("gzip")  # compressed for the transfer only
        if self.encoding != "identity":
            layers.append(self.encoding)
        elif stored == "gzip":
            # Stored gzip by another tool (gsutil cp -Z): GCS would serve any plain client its
            # decoded bytes, so this tier does too.
            layers.append("gzip")
        return layers

    async def _body(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TierError(f"{self.name}: {say(error)}") from error

    async def stat(self, digest: Digest) -> Stat | None:
        try:
            meta = await self._call(self.storage.download_metadata(self.bucket, self.key(digest), timeout=self._t()))
        except _Missing:
            return None
        size = (meta.get("metadata") or {}).get(SIZE_METADATA)
        if size is not None and str(size).isdigit():
            return Stat(int(size))
        plain = self.encoding == "identity" and meta.get("contentEncoding", "identity") in ("", "identity")
        return Stat(int(meta["size"]) if plain and str(meta.get("size", "")).isdigit() else None)

    async def put(self, digest: Digest, payload: Payload) -> None:
        key = self.key(digest)
        try:
            if payload.size <= UPLOAD_CHUNK:
                await self._upload_small(key, payload)
            else:
                upload = ResumableUpload(self.session, self._auth, self.api_root, self.bucket, self.name, self.encoding)
                await upload.send(key, payload)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise TierError(f"{self.name}: upload of {key} failed: {say(error)}") from error

    async def _upload_small(self, key: str, payload: Payload) -> None:
        body = await run(self._small_body, payload)
        upload = self.storage.upload(
            self.bucket,
            key,
            body,
            content_type=CONTENT_TYPE,
            metadata={"metadata": {SIZE_METADATA: str(payload.size)}},
            force_resumable_upload=False,
            timeout=self._t(),
        )
        try:
            await self._call(upload)
        except _Missing:
            raise TierError(f"{self.name}: bucket {self.bucket} not found") from None

    def _small_body(self, payload: Payload) -> bytes:
        data = payload.data
        if data is None:
            source = payload.open()
            if source is None:
                raise TierError(f"{self.name}: payload has neither bytes nor a file")
            with source:
                data = source.read()
        return encode_bytes(data, self.encoding)

    async def delete(self, digest: Digest) -> bool:
        try:
            await self._call(self.storage.delete(self.bucket, self.key(digest), timeout=self._t()))
        except _Missing:
            return False
        return True

    def describe(self) -> dict[str, object]:
        return {"url": self.url, "endpoint_url": self.api_root}

    # -- helpers -------------------------------------------------------------------------

    def _t(self) -> int:
        """The library's per-call timeout (whole seconds) for its small JSON calls."""
        return max(1, round(self.timeout))

    async def _call(self, call: typing.Awaitable[Any]) -> Any:
        try:
            return await call
        except aiohttp.ClientResponseError as error:
            if error.status == 404:
                raise _Missing from error
            raise TierError(f"{self.name}: GCS answered {error.status}: {error.message[:300]}") from error
        except (aiohttp.ClientError, TimeoutError) as error:
            raise TierError(f"{self.name}: {say(error)}") from error


class _Missing(Exception):
    """The object is not there (404): "not here", not a failure."""
