"""A bucket prefix as an export target (key = prefix + hash) or an import source, over boto3
in an executor (boto3 blocks).

Large blobs go up as multipart uploads whose parts are sent in parallel while the blob is still
being read, with the parts in memory bounded by a ByteBudget. The upload id and every finished
part (number, ETag, MD5) are in the checkpoint, so a rerun continues the same upload: it reads
the blob again (every byte is checked) and sends only the parts the bucket does not hold with
those bytes. The upload is completed only once the whole blob has been read and verified, and
aborted if it turned out corrupt.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import math
import os
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import Executor
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from proxy.blocking import run_on
from proxy.errors import CorruptBlob
from proxy.tier import CHUNK_SIZE, Tier
from proxy.tiers.s3 import SIZE_METADATA, S3Tier
from proxy.transfer.checkpoint import Checkpoint, Part, Upload
from proxy.transfer.locations import ByteBudget, Entry, Location, Meter, SizedBlob, Source, Target, collect
from proxy.transfer.spec import MAX_PARTS, MiB, TransferError, UsageError

log = logging.getLogger(__name__)
LIST_PAGE = 1000  # keys per ListObjectsV2 page (S3's maximum)
_MISSING = {"404", "NoSuchKey", "NotFound"}


def make_client(location: Location, endpoint_url: str | None, tiers: Iterable[Tier], connections: int) -> Any:
    """A boto3 client for the location's bucket. Endpoint: ``endpoint_url``, else a configured
    s3 tier on the same bucket lends its endpoint and credentials, else boto3's own defaults
    (AWS_ENDPOINT_URL, AWS_PROFILE, the credential chain)."""
    path_style = bool(endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    tier = None if endpoint_url else tier_for(location, tiers)
    if tier is not None:
        return tier.make_client(_botocore_config(connections, bool(tier.endpoint_url) or path_style))
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url or None, config=_botocore_config(connections, path_style))


def tier_for(location: Location, tiers: Iterable[Tier]) -> S3Tier | None:
    """The configured s3 tier on the location's bucket, whose endpoint and credentials it uses."""
    for tier in tiers:
        if isinstance(tier, S3Tier) and tier.bucket == location.bucket:
            return tier
    return None


def _botocore_config(connections: int, path_style: bool) -> botocore.config.Config:
    return botocore.config.Config(
        max_pool_connections=connections,
        connect_timeout=10,
        read_timeout=120,
        retries={"max_attempts": 5, "mode": "standard"},
        # S3-compatible stores reject the newer default checksums; parts carry Content-MD5 instead.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path" if path_style else "auto"},
    )


def error_code(error: BaseException) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


class _Bucket:
    def __init__(self, location: Location, client: Any, executor: Executor) -> None:
        self.location = location
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.client = client
        self._executor = executor

    async def _call(self, fn: Any, **kwargs: Any) -> Any:
        return await run_on(self._executor, fn, **kwargs)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await run_on(self._executor, fn, *args)

    async def _list_page(self, token: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": LIST_PAGE}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            page: dict[str, Any] = await self._call(self.client.list_objects_v2, **kwargs)
        except botocore.exceptions.ClientError as error:
            if error_code(error) == "NoSuchBucket":
                raise UsageError(f"s3://{self.bucket}: no such bucket") from None
            raise
        except botocore.exceptions.NoCredentialsError as error:
            raise UsageError(f"s3://{self.bucket}: {error} (set AWS_PROFILE or AWS_ACCESS_KEY_ID/...)") from None
        except botocore.exceptions.BotoCoreError as error:
            raise TransferError(f"s3://{self.bucket}: {error}") from None
        return page


class BucketTarget(_Bucket, Target):
    def __init__(
        self,
        location: Location,
        client: Any,
        executor: Executor,
        *,
        requests: int,
        part_size: int,
        threshold: int,
        budget: ByteBudget,
    ) -> None:
        super().__init__(location, client, executor)
        self.part_size = part_size
        self.threshold = threshold
        self.budget = budget
        self._requests = asyncio.Semaphore(requests)  # PUTs and parts in flight, all blobs together
        # What a listing showed: names up to ``_listed_upto`` (all of them if None) need no HEAD.
        self._listed: set[str] = set()
        self._listed_upto: str | None = ""

    async def start(self, expected: int | None) -> None:
        """List the prefix while that costs fewer requests than a HEAD per blob would."""
        pages = max(1, (expected or 0) // LIST_PAGE)
        token: str | None = None
        for _ in range(pages):
            try:
                page = await self._list_page(token)
            except botocore.exceptions.ClientError as error:
                # May write but not list (a PutObject-only policy): ask per blob instead.
                log.info("s3://%s: cannot list (%s); checking each blob with HEAD", self.bucket, error_code(error))
                return
            contents = page.get("Contents", [])
            self._listed.update(item["Key"][len(self.prefix) :] for item in contents)
            if not page.get("IsTruncated"):
                self._listed_upto = None
                return
            token = page.get("NextContinuationToken")
            if contents:
                self._listed_upto = contents[-1]["Key"][len(self.prefix) :]

    def key(self, name: str) -> str:
        return self.prefix + name

    async def has(self, name: str) -> bool:
        if self._listed_upto is None or name <= self._listed_upto:
            return name in self._listed
        try:
            await self._call(self.client.head_object, Bucket=self.bucket, Key=self.key(name))
        except botocore.exceptions.ClientError as error:
            if error_code(error) in _MISSING:
                return False
            raise
        return True

    def part_size_for(self, size: int) -> int:
        """The configured part size, or larger (in whole MiB) to stay within 10,000 parts."""
        needed = math.ceil(size / MAX_PARTS)
        return max(self.part_size, math.ceil(needed / MiB) * MiB)

    async def write(self, name: str, blob: SizedBlob, checkpoint: Checkpoint, meter: Meter) -> None:
        if blob.size < self.threshold and name not in checkpoint.uploads:
            await self._put_whole(name, blob, meter)
        else:
            await self._put_multipart(name, blob, checkpoint, meter)

    async def _put_whole(self, name: str, blob: SizedBlob, meter: Meter) -> None:
        held = await self.budget.take(blob.size)
        try:
            data = await collect(blob.chunks(), blob.size)
            md5 = _md5(data) if len(data) <= CHUNK_SIZE else await self._run(_md5, data)
            async with self._requests:
                await self._call(
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=self.key(name),
                    Body=data,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                    ContentType="application/octet-stream",
                    Metadata={SIZE_METADATA: str(blob.size)},
                )
            meter.moved(blob.size)
        finally:
            self.budget.give(held)

    async def _put_multipart(self, name: str, blob: SizedBlob, checkpoint: Checkpoint, meter: Meter) -> None:
        key = self.key(name)
        upload = checkpoint.uploads.get(name)
        listed: dict[int, tuple[str, int]] = {}
        if upload is not None and upload.size == blob.size:
            try:
                listed = await self._list_parts(key, upload.upload_id)
            except botocore.exceptions.ClientError as error:
                if error_code(error) != "NoSuchUpload":
                    raise
                log.info("%s: the upload %s is gone; starting again", key, upload.upload_id)
                upload = None
        else:
            upload = None
        if upload is None:
            part_size = self.part_size_for(blob.size)
            response = await self._call(
                self.client.create_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                ContentType="application/octet-stream",
                Metadata={SIZE_METADATA: str(blob.size)},
            )
            upload = await checkpoint.begin_upload(name, response["UploadId"], part_size, blob.size)
        sending: set[asyncio.Task[None]] = set()
        etags: dict[int, str] = {}
        try:
            await self._send_parts(name, key, blob, upload, listed, checkpoint, meter, sending, etags)
            await asyncio.gather(*sending)
            parts = [{"ETag": etags[number], "PartNumber": number} for number in sorted(etags)]
            await self._call(
                self.client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload.upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as error:
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            if isinstance(error, CorruptBlob):
                # The parts hold bytes that are not this blob: never let them be completed.
                with contextlib.suppress(Exception):
                    await self._call(
                        self.client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload.upload_id
                    )
                checkpoint.end_upload(name)
            raise
        checkpoint.end_upload(name)

    async def _send_parts(
        self,
        name: str,
        key: str,
        blob: SizedBlob,
        upload: Upload,
        listed: dict[int, tuple[str, int]],
        checkpoint: Checkpoint,
        meter: Meter,
        sending: set[asyncio.Task[None]],
        etags: dict[int, str],
    ) -> None:
        """Read the blob part by part; reuse parts the upload holds already, send the others."""
        count = max(1, math.ceil(blob.size / upload.part_size))
        reader = _ExactReader(blob.chunks())
        try:
            for number in range(1, count + 1):
                size = min(upload.part_size, blob.size - (number - 1) * upload.part_size)
                held = await self.budget.take(size)
                try:
                    data = await reader.read(size)
                    md5 = await self._run(_md5, data)
                except BaseException:
                    self.budget.give(held)
                    raise
                etag = _reusable(listed.get(number), upload.parts.get(number), md5.hexdigest(), size)
                if etag is not None:
                    etags[number] = etag
                    meter.reused(size)
                    self.budget.give(held)
                    continue
                for task in sending:  # a part failed: stop reading, report it
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        self.budget.give(held)
                        await task
                part = self._send_part(name, key, upload.upload_id, number, data, md5, held, checkpoint, meter, etags)
                task = asyncio.get_running_loop().create_task(part)
                sending.add(task)
            await reader.end()  # the blob's last byte comes only once it is verified
        finally:
            await reader.aclose()

    async def _send_part(
        self,
        name: str,
        key: str,
        upload_id: str,
        number: int,
        data: bytes,
        md5: Any,
        held: int,
        checkpoint: Checkpoint,
        meter: Meter,
        etags: dict[int, str],
    ) -> None:
        try:
            async with self._requests:
                response = await self._call(
                    self.client.upload_part,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ContentMD5=base64.b64encode(md5.digest()).decode(),
                )
            etags[number] = response["ETag"]
            checkpoint.part_done(name, number, Part(response["ETag"], md5.hexdigest(), len(data)))
            meter.moved(len(data))
        finally:
            self.budget.give(held)

    async def _list_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]]:
        parts: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            page = await self._call(
                self.client.list_parts, Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker
            )
            for part in page.get("Parts", []):
                parts[part["PartNumber"]] = (part["ETag"], part["Size"])
            if not page.get("IsTruncated"):
                return parts
            marker = page["NextPartNumberMarker"]


_MD5 = hashlib.md5()


def _md5(data: bytes) -> Any:
    """MD5 of ``data`` (for Content-MD5 and part checks). Copying a fresh hasher skips OpenSSL 3's
    per-constructor algorithm lookup, which costs more than hashing a 4 KiB blob."""
    md5 = _MD5.copy()
    md5.update(data)
    return md5


def _reusable(listed: tuple[str, int] | None, recorded: Part | None, md5: str, size: int) -> str | None:
    """The ETag of a part the upload holds with exactly these bytes, else None. A plain S3
    ETag is the part's MD5; with SSE-KMS it is not, and the MD5 recorded next to it decides."""
    if listed is None or listed[1] != size:
        return None
    etag = listed[0]
    if etag.strip('"') == md5 or (recorded is not None and recorded.etag == etag and recorded.md5 == md5):
        return etag
    return None


class _ExactReader:
    """Reads exactly n bytes at a time from a stream of chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._carry = b""

    async def read(self, size: int) -> bytes:
        if size == 0:
            return b""
        pieces = [self._carry] if self._carry else []
        have = len(self._carry)
        while have < size:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                raise OSError(f"the blob ended {size - have} bytes early")
            pieces.append(chunk)
            have += len(chunk)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._carry = data[size:]
        return data[:size] if len(data) > size else data

    async def end(self) -> None:
        if self._carry or await anext(self._chunks, None) is not None:
            raise OSError("the blob is longer than its size")

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


class BucketSource(_Bucket, Source):
    """Every object under the prefix; names are keys without the prefix."""

    async def entries(self) -> AsyncIterator[Entry]:
        token: str | None = None
        while True:
            page = await self._list_page(token)
            for item in page.get("Contents", []):
                key = item["Key"]
                if key.endswith("/"):
                    continue  # a "folder" marker
                yield Entry(key[len(self.prefix) :], item["Size"], functools.partial(self._read, key))
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    async def _read(self, key: str) -> AsyncIterator[bytes]:
        response = await self._call(self.client.get_object, Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            while chunk := await self._run(body.read, CHUNK_SIZE):
                yield chunk
        finally:
            await self._run(body.close)
