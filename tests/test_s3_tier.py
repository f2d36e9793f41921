"""S3 tiers against moto's S3 server over real HTTP: layouts, encodings, cache fills into a
bucket, corrupt copies, and HEAD through head_object."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import APIOrigin
from proxy.server.keys import STORE
from tests.conftest import Bucket, ProxyFactory, make_blob
from tests.faults import fault_proxy_before
from tests.processes import wait_until

Client = TestClient[web.Request, web.Application]

# What the API origin below serves; tests fill it and clean up after themselves.
ORIGIN_BLOBS: dict[str, bytes] = {}


class DictOrigin(APIOrigin):
    """An API origin serving ORIGIN_BLOBS, counting what it was asked for."""

    calls: ClassVar[list[str]] = []

    async def fetch(self, digest: str) -> bytes | None:
        DictOrigin.calls.append(str(digest))
        return ORIGIN_BLOBS.get(str(digest))


@pytest.fixture
def origin() -> Iterator[dict[str, bytes]]:
    ORIGIN_BLOBS.clear()
    DictOrigin.calls.clear()
    yield ORIGIN_BLOBS
    ORIGIN_BLOBS.clear()
    DictOrigin.calls.clear()


def disk(tmp_path: Path) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")}


async def start(make_proxy: ProxyFactory, tiers: list[dict[str, Any]], **sections: dict[str, Any]) -> Client:
    # These configs have no "local" tier for the default upload target: use the first tier.
    return await make_proxy(tiers, uploads={"targets": [tiers[0]["name"]]}, **sections)


def spy_on(client: Client, tier: str) -> list[str]:
    """Record the S3 operations (GetObject, HeadObject, ...) one tier's boto3 client makes."""
    calls: list[str] = []

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    s3 = client.app[STORE].tier(tier)
    for boto in (s3.reads, s3.client):  # type: ignore[attr-defined]  # the walk's reads, and the writes
        boto.meta.events.register("before-call.s3", record)
    return calls


async def wait_for_key(bucket: Bucket, key: str, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        present = bucket.keys()
        if key in present:
            return
        assert time.monotonic() < deadline, f"{key} never appeared in {bucket.name}: {present}"
        await asyncio.sleep(0.05)


async def drain(response: aiohttp.ClientResponse, into: bytearray) -> None:
    async for chunk in response.content.iter_any():
        into += chunk


async def test_second_bucket_serves_then_disk_hits(
    make_proxy: ProxyFactory, bucket: Bucket, s3_endpoint: str, tmp_path: Path
) -> None:
    other = Bucket(f"{bucket.name}-b", bucket.client, s3_endpoint)
    bucket.client.create_bucket(Bucket=other.name)
    data, digest = make_blob(300_000)
    other.put(f"blobs/{digest}", data)
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("a", "blobs/"), other.tier("b", "blobs/")])
    calls_a, calls_b = spy_on(client, "a"), spy_on(client, "b")

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("MISS", "b")
    assert response.headers["Content-Length"] == str(len(data))
    await client.app[STORE].wait_idle()
    assert "GetObject" in calls_b

    # The bucket no longer has it, and is not asked again: the disk cache answers.
    other.client.delete_object(Bucket=other.name, Key=f"blobs/{digest}")
    calls_a.clear()
    calls_b.clear()
    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "disk")
    assert calls_a == calls_b == []


@pytest.mark.parametrize(
    ("layout", "key"),
    [("flat", "cas/{hash}"), ("sharded", "cas/{shard}/{hash}")],
)
async def test_layouts(make_proxy: ProxyFactory, bucket: Bucket, tmp_path: Path, layout: str, key: str) -> None:
    data, digest = make_blob(50_000)
    bucket.put(key.format(hash=digest, shard=digest[:2]), data)
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("s3", "cas/", layout=layout)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "s3"

    # A blob stored under the other layout's key is not where this tier looks.
    other_data, other_digest = make_blob(1000)
    wrong = "cas/{shard}/{hash}" if layout == "flat" else "cas/{hash}"
    bucket.put(wrong.format(hash=other_digest, shard=other_digest[:2]), other_data)
    response = await client.get(f"/sha1/{other_digest}")
    assert response.status == 404


async def test_gzip_encoded_objects_are_served_decoded(
    make_proxy: ProxyFactory, bucket: Bucket, tmp_path: Path
) -> None:
    data, digest = make_blob(200_000)
    bucket.put(f"z/{digest}", gzip.compress(data), ContentEncoding="gzip")
    assert bucket.get(f"z/{digest}") != data  # really stored compressed
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("s3", "z/", encoding="gzip")])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert "Content-Encoding" not in response.headers
    assert response.headers["X-Cache-Tier"] == "s3"


async def test_api_result_lands_in_cache_bucket(
    make_proxy: ProxyFactory, bucket: Bucket, tmp_path: Path, origin: dict[str, bytes]
) -> None:
    data, digest = make_blob(120_000)
    origin[digest] = data
    api = {"name": "api", "kind": "api", "class": "tests.test_s3_tier:DictOrigin"}
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("mirror", "m/", role="cache"), api])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("MISS", "api")

    await wait_for_key(bucket, f"m/{digest}")
    await client.app[STORE].wait_idle()  # the counters move once put() has returned
    assert bucket.get(f"m/{digest}") == data
    assert DictOrigin.calls == [digest]
    stats = client.app[STORE].snapshot()["tiers"]
    assert stats["mirror"]["cache_writes"] == 1
    assert stats["disk"]["cache_writes"] == 1


async def test_corrupt_copy_is_skipped_and_never_cached(
    make_proxy: ProxyFactory, bucket: Bucket, s3_endpoint: str, tmp_path: Path
) -> None:
    other = Bucket(f"{bucket.name}-good", bucket.client, s3_endpoint)
    bucket.client.create_bucket(Bucket=other.name)
    data, digest = make_blob(100_000)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF  # same length, one byte off: only the hash can tell
    bucket.put(digest, bytes(bad))
    other.put(digest, data)
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("bad"), other.tier("good")])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "good"
    await client.app[STORE].wait_idle()
    stats = client.app[STORE].snapshot()["tiers"]
    assert (stats["bad"]["corrupt"], stats["bad"]["hits"]) == (1, 0)
    assert (stats["good"]["corrupt"], stats["good"]["hits"]) == (0, 1)

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "disk")


async def test_head_uses_head_object(make_proxy: ProxyFactory, bucket: Bucket, tmp_path: Path) -> None:
    data, digest = make_blob(77_777)
    bucket.put(digest, data)
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("s3")])
    calls = spy_on(client, "s3")

    response = await client.head(f"/sha1/{digest}")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["X-Cache-Tier"] == "s3"
    assert response.headers["ETag"] == f'"{digest}"'
    assert await response.read() == b""
    assert calls == ["HeadObject"]

    missing = make_blob(10)[1]
    response = await client.head(f"/sha1/{missing}")
    assert response.status == 404


async def test_garbled_gzip_object_is_skipped_for_the_next_bucket(
    make_proxy: ProxyFactory, bucket: Bucket, s3_endpoint: str, tmp_path: Path
) -> None:
    other = Bucket(f"{bucket.name}-plain", bucket.client, s3_endpoint)
    bucket.client.create_bucket(Bucket=other.name)
    data, digest = make_blob(100_000)
    bucket.put(digest, data)  # not gzip at all, though the tier says so
    other.put(digest, data)
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("zipped", encoding="gzip"), other.tier("plain")])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "plain"
    stats = client.app[STORE].snapshot()["tiers"]
    assert stats["zipped"]["errors"] + stats["zipped"]["corrupt"] == 1


async def test_gzip_cache_bucket_round_trip(
    make_proxy: ProxyFactory, bucket: Bucket, tmp_path: Path, origin: dict[str, bytes]
) -> None:
    data, digest = make_blob(150_000)
    origin[digest] = data
    api = {"name": "api", "kind": "api", "class": "tests.test_s3_tier:DictOrigin"}
    # No disk tier: the second read must come from the bucket the first one filled.
    client = await start(make_proxy, [bucket.tier("mirror", "gz/", role="cache", encoding="gzip"), api])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    await wait_for_key(bucket, f"gz/{digest}")
    await client.app[STORE].wait_idle()
    assert gzip.decompress(bucket.get(f"gz/{digest}")) == data

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "mirror")
    assert DictOrigin.calls == [digest]


async def test_streamed_corrupt_object_is_never_completed(
    make_proxy: ProxyFactory, bucket: Bucket, tmp_path: Path
) -> None:
    data, digest = make_blob(3 << 20)
    bucket.put(digest, data[:-1] + bytes([data[-1] ^ 0xFF]))  # right length, last byte wrong
    client = await start(make_proxy, [disk(tmp_path), bucket.tier("s3")], server={"stream_threshold": 65536})

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200  # streaming began before the digest could be checked
    assert response.headers["Content-Length"] == str(len(data))
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):  # never a complete body of wrong bytes
        await drain(response, received)
    assert len(received) < len(data)


async def test_a_get_answered_with_nothing_frees_its_thread_within_the_tiers_timeout(
    make_proxy: ProxyFactory, bucket: Bucket, s3_endpoint: str, tmp_path: Path
) -> None:
    hung, hung_digest = make_blob(1000)
    healthy, healthy_digest = make_blob(2000)
    bucket.put(hung_digest, hung)
    bucket.put(healthy_digest, healthy)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / hung_digest).write_bytes(hung)
    local = {"name": "local", "kind": "fs", "path": str(tmp_path / "local")}
    async with fault_proxy_before(s3_endpoint) as (faults, endpoint):
        faults.hung.add(hung_digest)  # its GET never gets a byte of answer, not even headers
        # One thread for the bucket: a request that keeps it holds up every other one.
        s3 = {**bucket.tier("s3", max_connections=1), "endpoint_url": endpoint, "timeout": 2}
        client = await make_proxy([s3, local], uploads={"targets": ["local"]})

        response = await client.get(f"/sha1/{hung_digest}")
        assert (response.status, await response.read(), response.headers["X-Cache-Tier"]) == (200, hung, "local")
        # The thread gives up on S3 about when the walk did (not read_timeout's 30 s, times
        # botocore's 3 attempts, later), and does not ask again.
        await wait_until(lambda: faults.hangs_dropped == 1, 15, "the hung GET to be given up")
        response = await client.get(f"/sha1/{healthy_digest}")
        assert (response.status, await response.read(), response.headers.get("X-Cache-Tier")) == (200, healthy, "s3")
        assert faults.hanging == 1
