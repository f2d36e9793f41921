"""A bucket tier over boto3, for AWS S3 and any S3-compatible store (MinIO, R2, GCS interop).

boto3 blocks, so every call runs in this tier's own executor, sized like its connection pool.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from proxy.blocking import run_on
from proxy.digest import Digest
from proxy.encoding import Encoding, EncodingReader, Layout, decode_stream, object_key
from proxy.errors import TierError
from proxy.tier import CHUNK_SIZE, Blob, Payload, Role, Stat, StreamBlob, Tier
from proxy.tiers.bucket import SIZE_METADATA as SIZE_METADATA  # re-exported: older imports name it here
from proxy.tiers.bucket import parse_bucket_url as parse_bucket_url

log = logging.getLogger(__name__)
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class S3Tier(Tier):
    can_store = True
    shared = True  # every instance reads the same bucket

    def __init__(
        self,
        url: str,
        *,
        name: str = "s3",
        role: Role = "source",
        layout: Layout = "flat",
        encoding: Encoding = "identity",
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        accelerate: bool = False,
        max_connections: int = 32,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.role = role
        self.timeout = timeout
        self.url = url
        self.bucket, self.prefix = parse_bucket_url(url, "s3")
        self.layout = layout
        self.encoding = encoding
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.profile = profile or None
        self._credentials = (access_key_id or None, secret_access_key or None)
        self.accelerate = accelerate
        self._config = botocore.config.Config(
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            # S3-compatible stores and GCS interop reject the newer default checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={
                "addressing_style": "path" if self.endpoint_url else "auto",
                "use_accelerate_endpoint": accelerate,
            },
        )
        # The walk's reads (GetObject, HeadObject) have their own client, on which the tier's
        # timeout bounds each wait (the connect, then each read, the first being for the
        # answer's headers): a read that hangs hands its thread back about when the walk gives
        # up on it, not read_timeout (times the attempts) later. Writes keep read_timeout: a
        # part or a CompleteMultipartUpload may take S3 longer than a walk waits.
        self._read_config = self._config.merge(
            botocore.config.Config(
                connect_timeout=min(connect_timeout, timeout), read_timeout=min(read_timeout, timeout)
            )
        )
        self._executor = ThreadPoolExecutor(max_connections, thread_name_prefix=f"tier-{name}")
        self._client: Any = None
        self._reads: Any = None
        self._bodies: set[_Body] = set()  # being read: released at close, so no thread outlives it
        # Who wants to hear of the multipart uploads begun for a key (put_noting_uploads), told
        # from boto3's transfer threads.
        self._noting: dict[str, list[Callable[[str], None]]] = {}
        self._noting_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._client = await run_on(self._executor, self._own_client)
        self._reads = await run_on(self._executor, self._read_client)

    def make_client(self, config: botocore.config.Config | None = None) -> Any:
        session = boto3.session.Session(profile_name=self.profile)
        key_id, secret = self._credentials
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=config or self._config,
        )

    def _own_client(self) -> Any:
        """The tier's client for writes: make_client's, telling the tier of each multipart
        upload it begins."""
        client = self.make_client()
        client.meta.events.register("after-call.s3.CreateMultipartUpload", self._upload_begun)
        return client

    def _read_client(self) -> Any:
        """The walk's client: the tier's timeout on each wait, and a read that timed out is not
        tried again (see _WALKED)."""
        client = self.make_client(self._read_config)
        for operation in _WALKED:
            client.meta.events.register(f"needs-retry.s3.{operation}", _no_retry_after_timeout)
        return client

    async def close(self) -> None:
        for body in list(self._bodies):
            body.abort()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def client(self) -> Any:
        """For writes (and presigning): the configured connect and read timeouts."""
        if self._client is None:
            self._client = self._own_client()
        return self._client

    @property
    def reads(self) -> Any:
        """For the walk's GetObject and HeadObject: under the tier's timeout."""
        if self._reads is None:
            self._reads = self._read_client()
        return self._reads

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """boto3's errors as ours: a missing object is ``_Missing``, anything else a TierError."""
        try:
            yield
        except botocore.exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                raise _Missing from error
            raise TierError(f"{self.name}: {code or error}") from error
        except botocore.exceptions.BotoCoreError as error:
            raise TierError(f"{self.name}: {error}") from error

    def key(self, digest: str) -> str:
        return object_key(self.prefix, digest, self.layout)

    # -- the protocol --------------------------------------------------------------------

    async def open(self, digest: Digest) -> Blob | None:
        try:
            with self._errors():
                response = await run_on(self._executor, self.reads.get_object, Bucket=self.bucket, Key=self.key(digest))
        except _Missing:
            return None
        body = _Body(response["Body"], self._executor, self._bodies)
        if self.encoding == "identity":
            return StreamBlob(body.chunks(), response.get("ContentLength"), body.close)
        size = response.get("Metadata", {}).get(SIZE_METADATA)
        return StreamBlob(decode_stream(body.chunks(), self.encoding), int(size) if size else None, body.close)

    async def stat(self, digest: Digest) -> Stat | None:
        try:
            with self._errors():
                response = await run_on(
                    self._executor, self.reads.head_object, Bucket=self.bucket, Key=self.key(digest)
                )
        except _Missing:
            return None
        size = response.get("Metadata", {}).get(SIZE_METADATA)
        if size:
            return Stat(int(size))
        return Stat(response.get("ContentLength") if self.encoding == "identity" else None)

    async def put(self, digest: Digest, payload: Payload) -> None:
        with self._errors():
            await run_on(self._executor, self._put, self.key(digest), payload)

    def _put(self, key: str, payload: Payload) -> None:
        extra: dict[str, Any] = {
            "Metadata": {SIZE_METADATA: str(payload.size)},
            "ContentType": "application/octet-stream",
        }
        if self.encoding != "identity":
            extra["ContentEncoding"] = self.encoding
        source = payload.open()
        body = source if source is not None else io.BytesIO(payload.data or b"")
        with body:
            self.client.upload_fileobj(
                EncodingReader(body, self.encoding),
                self.bucket,
                key,
                ExtraArgs=extra,
                Config=TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20),
            )

    async def put_noting_uploads(self, digest: Digest, payload: Payload, note: Callable[[str], None]) -> None:
        key = self.key(digest)
        with self._noting_lock:
            self._noting.setdefault(key, []).append(note)
        try:
            await self.put(digest, payload)
        finally:
            with self._noting_lock:
                notes = self._noting[key]
                notes.remove(note)
                if not notes:
                    del self._noting[key]

    def _upload_begun(self, parsed: dict[str, Any], **_: Any) -> None:
        """botocore's after-call hook of CreateMultipartUpload, in the transfer's thread before
        it sends a part: tell whoever put_noting_uploads this key. A note that fails is logged,
        not raised: raised here, it would leave boto3 an upload it cannot abort."""
        upload_id = parsed.get("UploadId")
        if not upload_id:
            return
        with self._noting_lock:
            notes = list(self._noting.get(parsed.get("Key", ""), ()))
        for note in notes:
            try:
                note(upload_id)
            except Exception:
                log.exception("%s: could not note multipart upload %s", self.name, upload_id)

    async def abort_upload(self, digest: Digest, upload_id: str) -> None:
        with self._errors():
            await run_on(self._executor, self._abort_upload, self.key(digest), upload_id)

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NoSuchUpload":  # ended already: done
                raise

    async def delete(self, digest: Digest) -> bool:
        with self._errors():
            await run_on(self._executor, self.client.delete_object, Bucket=self.bucket, Key=self.key(digest))
        return True

    def describe(self) -> dict[str, object]:
        return {"url": self.url, "endpoint_url": self.endpoint_url}


class _Body:
    """An object's body, read in the tier's threads. A body abandoned before its end (a trickle
    below min_rate, a cancelled fill, the tier closing) is released at once: its socket is shut
    down, which wakes the thread blocked reading it, so a stuck read never holds a thread (and
    with it the bucket's pool, or the process's exit)."""

    def __init__(self, body: Any, executor: ThreadPoolExecutor, open_bodies: set[_Body]) -> None:
        self._body = body
        self._executor = executor
        self._open = open_bodies
        self._done = False
        open_bodies.add(self)

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await run_on(self._executor, _read_chunk, self._body):
            yield chunk
        self._done = True

    def abort(self) -> None:
        if not self._done:
            connection = getattr(self._body._raw_stream, "connection", None)
            sock = getattr(connection, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # a close alone would not wake its recv
        self._done = True

    async def close(self) -> None:
        self.abort()
        self._open.discard(self)
        # close() takes the stream's lock, which a reader woken by abort() still holds for a
        # moment: off the loop, and not waited for (the walk goes on meanwhile).
        with contextlib.suppress(RuntimeError):  # the tier is closing: its threads are going
            self._executor.submit(_quietly, self._body.close)


def _read_chunk(body: Any) -> bytes:
    """Up to CHUNK_SIZE bytes, but back within a fraction of a second once some have come: a
    slow object's bytes count towards its min_rate as they arrive, not once a whole chunk is in,
    and its thread is handed back often, so a trickle cannot keep other reads waiting for long.
    (urllib3's read1 returns after at most one recv; b"" at the end.)"""
    raw = body._raw_stream
    parts: list[bytes] = []
    size, began = 0, time.monotonic()
    while size < CHUNK_SIZE and time.monotonic() - began < _READ_SLICE:
        part = raw.read1(CHUNK_SIZE - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


# The reads a walk makes under the tier's timeout. One that timed out is not tried again: the
# walk gave up on it at that moment, so another attempt would only hold a thread for nothing.
_WALKED = ("GetObject", "HeadObject")


def _no_retry_after_timeout(caught_exception: Exception | None = None, **_: Any) -> None:
    """botocore's needs-retry hook: a timeout is raised as it is (not retried); otherwise None,
    and botocore's own retry policy decides. Raising, not returning False: older botocore
    versions read a handler's False as a sleep of 0 seconds, then a retry."""
    if isinstance(caught_exception, (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)):
        raise caught_exception


def _quietly(close: Any) -> None:
    with contextlib.suppress(Exception):
        close()


_READ_SLICE = 0.25  # seconds a read gathers bytes before handing them on


class _Missing(Exception):
    """The object is not there (404): "not here", not a failure."""
