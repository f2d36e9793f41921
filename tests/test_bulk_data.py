"""Bulk data (SPEC 5.3), driven with requests exactly as EchoStream clients do."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.bulk import BucketBulkData
from proxy.tiers.s3 import S3Tier
from tests.conftest import Bucket, ProxyFactory, make_blob

Client = TestClient[web.Request, web.Application]
TOKEN = {"Authorization": "Bearer up"}
ENCODE = {"identity": lambda b: b, "gzip": gzip.compress, "deflate": zlib.compress}


def tiers(tmp_path: Path) -> list[dict[str, Any]]:
    (tmp_path / "local").mkdir(exist_ok=True)
    return [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "local", "kind": "fs", "path": str(tmp_path / "local")},
    ]


async def slots(proxy: Client, **request: Any) -> list[dict[str, Any]]:
    response = await proxy.post("/bulk-data", json=request, headers=TOKEN)
    assert response.status == 200, await response.text()
    answer: list[dict[str, Any]] = await response.json()
    return answer


def upload_post(slot: dict[str, Any], body: bytes) -> requests.Response:
    p = slot["presignedPost"]
    return requests.post(p["url"], data=json.loads(p["fields"]), files=dict(file=("bulk_data", body)), timeout=10)


def upload_put(slot: dict[str, Any], body: bytes) -> requests.Response:
    q = slot["presignedPut"]
    return requests.put(q["url"], headers=json.loads(q["headers"]), data=body, timeout=10)


def download(slot: dict[str, Any]) -> requests.Response:
    # decode_content=False: the stored bytes, as they were uploaded
    response = requests.get(slot["presignedGet"], timeout=10, stream=True)
    response.raw.decode_content = False
    response._content = response.raw.read()
    return response


@pytest.fixture
async def self_mode(make_proxy: ProxyFactory, tmp_path: Path) -> Client:
    return await make_proxy(
        tiers(tmp_path),
        uploads={"targets": ["local"]},
        auth={"upload_tokens": ["up"]},
        server={"max_upload_size": "2 MiB"},
    )


@pytest.mark.parametrize("encoding", ["identity", "gzip", "deflate"])
@pytest.mark.parametrize("method", [upload_post, upload_put])
async def test_self_mode_round_trip(self_mode: Client, encoding: str, method: Any) -> None:
    [slot] = await slots(self_mode, count=1, content_encoding=encoding)
    assert slot["expiration"] > 0 and isinstance(slot["presignedPost"]["fields"], str)
    data, _ = make_blob(100_000)
    body = ENCODE[encoding](data)
    uploaded = await asyncio.to_thread(method, slot, body)
    assert uploaded.status_code == 201, uploaded.text
    got = await asyncio.to_thread(download, slot)
    assert got.status_code == 200
    assert got.headers.get("Content-Encoding", "identity") == encoding
    assert zlib.decompress(got.content, 47) == data if encoding != "identity" else got.content == data
    decoded = await asyncio.to_thread(requests.get, slot["presignedGet"], timeout=10)  # a plain client decodes
    assert decoded.content == data


async def test_self_mode_rejects_wrong_encoding_and_bad_signatures(self_mode: Client) -> None:
    [gz, plain] = [(await slots(self_mode, content_encoding=e))[0] for e in ("gzip", "identity")]
    data, _ = make_blob(1000)
    not_gzip = await asyncio.to_thread(upload_post, gz, data)  # the form's file is not gzip data
    assert not_gzip.status_code == 400 and not_gzip.json()["type"] == "bad-request"
    wrong_header = await asyncio.to_thread(
        upload_put,
        {
            **plain,
            "presignedPut": {"url": plain["presignedPut"]["url"], "headers": json.dumps({"Content-Encoding": "gzip"})},
        },
        gzip.compress(data),
    )
    assert wrong_header.status_code == 400
    forged = gz["presignedPut"]["url"].replace("content-encoding=gzip", "content-encoding=identity")
    assert (await asyncio.to_thread(requests.put, forged, data=data, timeout=10)).status_code == 403
    upload_url = gz["presignedPut"]["url"].split("?")[0]
    get_query = gz["presignedGet"].split("?")[1]  # a read URL's signature cannot write
    assert (
        await asyncio.to_thread(requests.put, f"{upload_url}?{get_query}", data=data, timeout=10)
    ).status_code == 403
    assert (await asyncio.to_thread(download, gz)).status_code == 404  # nothing was stored
    big = await asyncio.to_thread(upload_put, plain, bytes(3 << 20))
    assert big.status_code == 413


async def test_slot_requests_are_checked(self_mode: Client) -> None:
    assert len(await slots(self_mode, count=3)) == 3
    for bad in ({"count": 0}, {"count": 1001}, {"count": "2"}, {"content_encoding": "br"}):
        response = await self_mode.post("/bulk-data", json=bad, headers=TOKEN)
        assert response.status == 400
    assert (await self_mode.post("/bulk-data", json={})).status == 401


async def test_bucket_mode_uses_the_buckets_presigned_urls(
    make_proxy: ProxyFactory, tmp_path: Path, bucket: Bucket
) -> None:
    proxy = await make_proxy(
        [*tiers(tmp_path), bucket.tier("bulk", "data/")],
        uploads={"targets": ["local"], "bulk_data_tier": "bulk"},
        auth={"upload_tokens": ["up"]},
    )
    data, _ = make_blob(50_000)
    for encoding in ("gzip", "deflate"):
        for method in (upload_post, upload_put):
            [slot] = await slots(proxy, count=1, content_encoding=encoding)
            assert slot["presignedPost"]["url"].startswith(bucket.endpoint)
            fields = json.loads(slot["presignedPost"]["fields"])
            policy = json.loads(base64.b64decode(fields["policy"]))
            assert {"Content-Encoding": encoding} in policy["conditions"]  # signed: S3 enforces it
            assert any(c[0] == "content-length-range" for c in policy["conditions"] if isinstance(c, list))
            assert json.loads(slot["presignedPut"]["headers"]) == {"Content-Encoding": encoding}
            response = await asyncio.to_thread(method, slot, ENCODE[encoding](data))
            assert response.status_code in (200, 204), response.text
            got = await asyncio.to_thread(download, slot)
            assert got.headers["Content-Encoding"] == encoding
            assert zlib.decompress(got.content, 47) == data
    refused = await proxy.post("/bulk-data", json={"accelerate": True}, headers=TOKEN)
    assert refused.status == 400  # acceleration is an AWS endpoint, not this store's


async def test_accelerate_presigns_against_the_acceleration_endpoint(s3_endpoint: str) -> None:
    tier = S3Tier("s3://some-aws-bucket/cas/", region="us-east-1")  # AWS itself: no endpoint_url
    bulk = BucketBulkData(tier, max_size=1 << 20, ttl=3600)
    [slot] = [s.as_json() for s in await bulk.slots(1, "gzip", accelerate=True)]
    for url in (slot["presignedPost"]["url"], slot["presignedPut"]["url"], slot["presignedGet"]):
        assert url.startswith("https://some-aws-bucket.s3-accelerate.amazonaws.com")
    [plain] = [s.as_json() for s in await bulk.slots(1, "gzip", accelerate=False)]
    assert "s3-accelerate" not in plain["presignedPut"]["url"]
