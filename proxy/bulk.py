"""EchoStream-style bulk data: slots of presigned POST/PUT/GET URLs for opaque objects.

With a bucket (``uploads.bulk_data_tier``) the URLs are the bucket's own (boto3 presigning; the
content encoding is a signed condition or header). Without one the proxy is the bucket: the same
three URLs point at it, signed with the ticket secret, and it keeps the objects in a folder.
Objects are stored as uploaded (encoded) and served back with their Content-Encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlencode

import botocore.config

from proxy.blocking import run
from proxy.encoding import ENCODINGS, Encoding, decode_pieces, decoder, encoder
from proxy.errors import BadRequest, NotFound, TooLarge
from proxy.tickets import Signer
from proxy.tiers.s3 import S3Tier

MAX_SLOTS = 1000
MAX_PRESIGN_TTL = 7 * 86400  # S3's limit for SigV4 presigned URLs
PREFIX = "bulk-data/"


@dataclass(frozen=True)
class Slot:
    expiration: int
    post_url: str
    post_fields: dict[str, str]
    put_url: str
    put_headers: dict[str, str]
    get_url: str

    def as_json(self) -> dict[str, Any]:
        # fields and headers are JSON *strings*, so EchoStream clients work unchanged.
        return {
            "expiration": self.expiration,
            "presignedPost": {"url": self.post_url, "fields": json.dumps(self.post_fields)},
            "presignedPut": {"url": self.put_url, "headers": json.dumps(self.put_headers)},
            "presignedGet": self.get_url,
        }


def check_request(count: Any, encoding: Any) -> tuple[int, Encoding]:
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SLOTS:
        raise BadRequest(f"count must be a whole number from 1 to {MAX_SLOTS}")
    return count, parse_encoding(encoding)


def parse_encoding(text: Any) -> Encoding:
    for encoding in ENCODINGS:
        if text == encoding:
            return encoding
    raise BadRequest(f"content encoding must be one of {', '.join(ENCODINGS)}, not {text!r}")


def _encoding_header(encoding: Encoding) -> dict[str, str]:
    return {} if encoding == "identity" else {"Content-Encoding": encoding}


class BucketBulkData:
    """Slots that are the bucket's own presigned URLs."""

    def __init__(self, tier: S3Tier, max_size: int, ttl: float) -> None:
        self.tier = tier
        self.max_size = max_size
        self.ttl = int(min(ttl, MAX_PRESIGN_TTL))
        self._accelerated: Any = None

    def _client(self, accelerate: bool) -> Any:
        if not accelerate:
            return self.tier.client
        if self.tier.endpoint_url:
            raise BadRequest(f"accelerate is for AWS S3; tier {self.tier.name!r} has its own endpoint_url")
        if self._accelerated is None:
            config = botocore.config.Config(s3={"use_accelerate_endpoint": True, "addressing_style": "virtual"})
            self._accelerated = self.tier.make_client(config)
        return self._accelerated

    async def slots(self, count: int, encoding: Encoding, accelerate: bool) -> list[Slot]:
        # Presigning is local CPU work, but boto3 is not built for the event loop.
        return await asyncio.to_thread(lambda: [self._slot(encoding, accelerate) for _ in range(count)])

    def _slot(self, encoding: Encoding, accelerate: bool) -> Slot:
        client = self._client(accelerate)
        bucket, key = self.tier.bucket, f"{self.tier.prefix}{PREFIX}{secrets.token_hex(16)}"
        header = _encoding_header(encoding)
        conditions: list[Any] = [["content-length-range", 1, self.max_size]]
        conditions += [{"Content-Encoding": value} for value in header.values()]
        post = client.generate_presigned_post(
            bucket, key, Fields=dict(header), Conditions=conditions, ExpiresIn=self.ttl
        )
        put_params = {"Bucket": bucket, "Key": key} | ({"ContentEncoding": encoding} if header else {})
        return Slot(
            expiration=int(time.time()) + self.ttl,
            post_url=post["url"],
            post_fields={k: str(v) for k, v in post["fields"].items()},
            put_url=client.generate_presigned_url("put_object", Params=put_params, ExpiresIn=self.ttl),
            put_headers=header,
            get_url=client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.ttl
            ),
        )


class SelfBulkData:
    """Slots served by this proxy: it checks the signatures and keeps the objects itself."""

    def __init__(self, signer: Signer, directory: str, max_size: int) -> None:
        self.signer = signer
        self.directory = os.path.abspath(directory)
        self.max_size = max_size

    async def slots(self, count: int, encoding: Encoding, accelerate: bool) -> list[Slot]:
        return [self._slot(encoding) for _ in range(count)]

    def _slot(self, encoding: Encoding) -> Slot:
        name = secrets.token_hex(16)
        path = f"/bulk-data/{name}"
        query, expires = self.signer.sign(self.upload_scope(path, encoding))
        upload = f"{self.signer.base_url}{path}"
        get_query, _ = self.signer.sign(path)
        fields = {"content-encoding": encoding, **dict(_split(query))}
        return Slot(
            expiration=expires,
            post_url=upload,
            post_fields=fields,
            put_url=f"{upload}?{urlencode({'content-encoding': encoding})}&{query}",
            put_headers=_encoding_header(encoding),
            get_url=f"{upload}?{get_query}",
        )

    @staticmethod
    def upload_scope(path: str, encoding: str) -> str:
        # A different signed string than the GET's, so a read URL can never be used to write.
        return f"upload {path} {encoding}"

    # -- storage -------------------------------------------------------------------------

    def _path(self, name: str, encoding: str) -> str:
        if len(name) != 32 or not all(c in "0123456789abcdef" for c in name):
            raise NotFound("no such bulk-data object")
        return os.path.join(self.directory, f"{name}.{encoding}")

    async def store(self, name: str, encoding: Encoding, chunks: AsyncIterator[bytes], encoded: bool) -> int:
        """Keep an object as ``encoding`` bytes; ``max_size`` limits its decoded bytes. ``encoded``:
        the chunks are already encoded (a form upload) and must decode cleanly (checked off the
        loop, in bounded pieces: a compression bomb is a 413, not gigabytes of memory); else they
        are plain and get encoded here. Returns the decoded size: the same body gives the same
        size through POST and PUT."""
        target = self._path(name, encoding)
        await asyncio.to_thread(os.makedirs, self.directory, 0o700, True)
        temp = f"{target}.tmp-{secrets.token_hex(4)}"
        check = decoder(encoding) if encoded else None
        compress = None if encoded else encoder(encoding)
        size = decoded = 0
        file: BinaryIO = await asyncio.to_thread(open, temp, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if check is None:
                    decoded += len(chunk)
                else:
                    decoded += await run(_decoded_size, check, chunk, encoding, self.max_size - decoded)
                if decoded > self.max_size:
                    raise TooLarge(f"more than {self.max_size} bytes (server.max_upload_size) once decoded")
                out = compress.compress(chunk) if compress is not None else chunk
                await asyncio.to_thread(file.write, out)
            if compress is not None:
                await asyncio.to_thread(file.write, compress.flush())
            if check is not None and not check.eof and encoding != "identity":
                raise BadRequest(f"the body is not complete {encoding} data")
            await asyncio.to_thread(file.close)
            for other in ENCODINGS:  # one object per name, whatever encoding it had before
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(os.unlink, self._path(name, other))
            await asyncio.to_thread(os.replace, temp, target)
        except BaseException:
            file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return decoded

    async def open(self, name: str) -> tuple[BinaryIO, Encoding, int]:
        for encoding in ENCODINGS:
            try:
                file: BinaryIO = await asyncio.to_thread(open, self._path(name, encoding), "rb")
            except FileNotFoundError:
                continue
            return file, encoding, os.fstat(file.fileno()).st_size
        raise NotFound("no such bulk-data object")


def _split(query: str) -> list[tuple[str, str]]:
    return [tuple(part.split("=", 1)) for part in query.split("&")]  # type: ignore[misc]


def _decoded_size(check: zlib._Decompress, chunk: bytes, encoding: str, room: int) -> int:
    """How many bytes ``chunk`` decodes to, counting no further than one piece past ``room``."""
    total = 0
    try:
        for piece in decode_pieces(check, chunk):
            total += len(piece)
            if total > room:
                break
    except zlib.error as error:
        raise BadRequest(f"the body is not {encoding} data: {error}") from None
    return total
