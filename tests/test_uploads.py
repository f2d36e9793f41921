"""The write path: verified uploads into every target kind, replication, tokens, tickets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.authorization import check_exposure
from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.server.keys import SERVICE, STORE
from tests.conftest import Bucket, ProxyFactory, make_blob, spool_files, write_config

Client = TestClient[web.Request, web.Application]
UPLOAD = {"Authorization": "Bearer up-token"}
ADMIN = {"Authorization": "Bearer admin-token"}


def disk(tmp_path: Path) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")}


def folder(tmp_path: Path, name: str = "local", **options: Any) -> dict[str, Any]:
    return {"name": name, "kind": "fs", "role": "source", "path": str(tmp_path / name), **options}


async def wait_for(condition: Any, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, tmp_path: Path) -> Client:
    return await make_proxy(
        [disk(tmp_path), folder(tmp_path)],
        uploads={"targets": ["local"]},
        auth={"upload_tokens": ["up-token"], "admin_tokens": ["admin-token"]},
        server={"max_upload_size": "1 MiB"},
    )


async def test_put_answers_a_ticket_and_the_blob_reads_back(proxy: Client, tmp_path: Path) -> None:
    data, digest = make_blob(10_000)
    response = await proxy.put(f"/sha1/{digest}", data=data, headers=UPLOAD)
    assert response.status == 201
    ticket = await response.json()
    assert ticket["sha1"] == digest and ticket["size"] == len(data)
    assert ticket["url"].endswith(f"/sha1/{digest}") and ticket["ticket"].startswith(ticket["url"] + "?expires=")
    assert ticket["expires"] > time.time() + 6 * 86400  # the default ttl is 7 days
    assert (tmp_path / "local" / digest).read_bytes() == data
    again = await proxy.put(f"/sha1/{digest}", data=data, headers=UPLOAD)
    assert again.status == 200
    read = await proxy.get(f"/sha1/{digest}")
    assert await read.read() == data


async def test_post_names_the_blob_by_hashing_it(proxy: Client) -> None:
    data, _ = make_blob(3000)
    for algorithm in ("sha1", "sha256"):
        response = await proxy.post(f"/{algorithm}", data=data, headers=UPLOAD)
        assert response.status == 201
        ticket = await response.json()
        assert ticket[algorithm] == hashlib.new(algorithm, data).hexdigest()
        assert await (await proxy.get(f"/{algorithm}/{ticket[algorithm]}")).read() == data


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_encoded_bodies_are_decoded_and_verified(proxy: Client, encoding: str) -> None:
    data, digest = make_blob(50_000)
    body = gzip.compress(data) if encoding == "gzip" else zlib.compress(data)
    response = await proxy.put(f"/sha1/{digest}", data=body, headers={**UPLOAD, "Content-Encoding": encoding})
    assert response.status == 201, await response.text()
    assert (await response.json())["size"] == len(data)
    assert await (await proxy.get(f"/sha1/{digest}")).read() == data


def stored_anywhere(tmp_path: Path, digest: str) -> list[str]:
    return [str(path) for path in tmp_path.rglob("*") if digest in path.name]


async def test_mismatch_stores_nothing_anywhere(proxy: Client, tmp_path: Path) -> None:
    data, digest = make_blob(200_000)
    response = await proxy.put(f"/sha1/{digest}", data=data[:-1] + bytes([data[-1] ^ 1]), headers=UPLOAD)
    assert response.status == 400 and (await response.json())["type"] == "digest-mismatch"
    assert stored_anywhere(tmp_path, digest) == []
    assert (await proxy.get(f"/sha1/{digest}")).status == 404
    assert spool_files(tmp_path / "cache") == []


async def test_oversized_upload_is_413_and_stores_nothing(proxy: Client, tmp_path: Path) -> None:
    data, digest = make_blob((1 << 20) + 1)
    declared = await proxy.put(f"/sha1/{digest}", data=data, headers=UPLOAD)
    assert declared.status == 413 and (await declared.json())["type"] == "too-large"

    async def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
        for offset in range(0, len(data), 65536):
            yield data[offset : offset + 65536]

    streamed = await proxy.put(f"/sha1/{digest}", data=chunked(), headers=UPLOAD)
    assert streamed.status == 413
    bomb = gzip.compress(bytes(4 << 20))  # small on the wire, 4 MiB decoded
    exploded = await proxy.post("/sha1", data=bomb, headers={**UPLOAD, "Content-Encoding": "gzip"})
    assert exploded.status == 413
    assert stored_anywhere(tmp_path, digest) == []


@pytest.mark.parametrize(
    ("headers", "status", "type_"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer nope"}, 403, "forbidden"),
        ({"Authorization": "Basic up-token"}, 401, "unauthorized"),
    ],
)
async def test_upload_tokens(proxy: Client, headers: dict[str, str], status: int, type_: str) -> None:
    data, digest = make_blob(10)
    response = await proxy.put(f"/sha1/{digest}", data=data, headers=headers)
    assert response.status == status and (await response.json())["type"] == type_
    assert (await proxy.put(f"/sha1/{digest}", data=data, headers=ADMIN)).status == 201  # admins may upload


async def test_concurrent_uploads_of_one_blob(proxy: Client, tmp_path: Path) -> None:
    data, digest = make_blob(300_000)
    responses = await asyncio.gather(*(proxy.put(f"/sha1/{digest}", data=data, headers=UPLOAD) for _ in range(8)))
    assert {r.status for r in responses} <= {200, 201} and 201 in {r.status for r in responses}
    assert (tmp_path / "local" / digest).read_bytes() == data
    assert [p.name for p in (tmp_path / "local").iterdir()] == [digest]  # no temp files left


async def test_upload_clears_the_negative_cache(proxy: Client) -> None:
    data, digest = make_blob(10)
    assert (await proxy.get(f"/sha1/{digest}")).status == 404
    assert (await proxy.put(f"/sha1/{digest}", data=data, headers=UPLOAD)).status == 201
    assert (await proxy.get(f"/sha1/{digest}")).status == 200


async def test_delete_removes_from_caches_only(proxy: Client, tmp_path: Path) -> None:
    data, digest = make_blob(10)
    await proxy.put(f"/sha1/{digest}", data=data, headers=UPLOAD)
    await (await proxy.get(f"/sha1/{digest}")).read()
    await proxy.app[STORE].wait_idle()
    assert (await proxy.delete(f"/sha1/{digest}", headers=UPLOAD)).status == 403
    assert (await proxy.delete(f"/sha1/{digest}")).status == 401
    assert (await proxy.delete(f"/sha1/{digest}", headers=ADMIN)).status == 204
    response = await proxy.get(f"/sha1/{digest}")
    assert response.headers["X-Cache"] == "MISS" and await response.read() == data  # the source kept it


async def test_round_trip_through_every_target_kind(make_proxy: ProxyFactory, tmp_path: Path, bucket: Bucket) -> None:
    proxy = await make_proxy(
        [disk(tmp_path), folder(tmp_path, encoding="gzip"), bucket.tier("bucket", "cas/", layout="sharded")],
        uploads={"targets": ["disk", "local", "bucket"]},
    )
    data, digest = make_blob(70_000)
    assert (await proxy.put(f"/sha1/{digest}", data=data)).status == 201
    assert await (await proxy.get(f"/sha1/{digest}")).read() == data  # from disk, the first target
    await wait_for(lambda: _exists(tmp_path / "local" / digest))
    assert gzip.decompress((tmp_path / "local" / digest).read_bytes()) == data
    await wait_for(lambda: _has_key(bucket, f"cas/{digest[:2]}/{digest}"))
    assert bucket.get(f"cas/{digest[:2]}/{digest}") == data
    assert await proxy.app[SERVICE].queue.depth() == 0


async def _has_key(bucket: Bucket, key: str) -> bool:
    return key in bucket.keys()  # noqa: SIM118 - a bucket listing, not a dict


async def test_replication_reaches_a_target_that_comes_back_after_a_restart(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    (tmp_path / "mirror").write_text("not a folder yet: every write fails")
    tiers = [disk(tmp_path), folder(tmp_path), folder(tmp_path, "mirror")]
    proxy = await make_proxy(tiers, uploads={"targets": ["local", "mirror"]})
    data, digest = make_blob(5000)
    assert (await proxy.put(f"/sha1/{digest}", data=data)).status == 201
    queue = proxy.app[SERVICE].queue
    await wait_for(lambda: _failed_once(queue))
    await proxy.close()  # the proxy stops with the copy still owed

    (tmp_path / "mirror").unlink()
    (tmp_path / "mirror").mkdir()
    restarted = await make_proxy(tiers, uploads={"targets": ["local", "mirror"]})
    await wait_for(lambda: _exists(tmp_path / "mirror" / digest))
    assert (tmp_path / "mirror" / digest).read_bytes() == data
    await wait_for(lambda: _depth_is_zero(restarted))
    stats = await (await restarted.get("/stats")).json()
    assert stats["uploads"] == {
        "targets": ["local", "mirror"],
        "queue_depth": 0,
        "replicated": 1,
        "replication_failures": 0,
    }


async def _failed_once(queue: Any) -> bool:
    return any(row["attempts"] >= 1 for row in await queue.pending())


async def _exists(path: Path) -> bool:
    return path.exists()


async def _depth_is_zero(proxy: Client) -> bool:
    return await proxy.app[SERVICE].queue.depth() == 0


def test_non_loopback_bind_without_upload_tokens_refuses_to_start(tmp_path: Path) -> None:
    tiers = [folder(tmp_path)]
    cases: list[tuple[str, dict[str, Any], bool]] = [
        ("127.0.0.1", {}, False),
        ("localhost", {}, False),
        ("0.0.0.0", {}, True),
        ("10.1.2.3", {}, True),
        ("0.0.0.0", {"upload_tokens": ["t"]}, False),
        ("0.0.0.0", {"allow_anonymous_uploads": True}, False),
    ]
    for host, auth, refused in cases:
        path = write_config(tmp_path / "c.toml", tiers, server={"host": host}, auth=auth)
        config = load_config(str(path), environ={})
        if refused:
            with pytest.raises(ConfigError, match="upload_tokens"):
                check_exposure(config)
        else:
            check_exposure(config)


async def test_mismatch_reaches_no_target_not_even_the_bucket(
    make_proxy: ProxyFactory, tmp_path: Path, bucket: Bucket
) -> None:
    proxy = await make_proxy(
        [disk(tmp_path), folder(tmp_path), bucket.tier("bucket")], uploads={"targets": ["local", "bucket"]}
    )
    data, digest = make_blob(100_000)
    response = await proxy.put(f"/sha1/{digest}", data=data + b"!")
    assert response.status == 400
    await asyncio.sleep(0.5)  # give a wrongly queued copy time to arrive
    assert bucket.keys() == [] and stored_anywhere(tmp_path, digest) == []
    assert await proxy.app[SERVICE].queue.depth() == 0


def test_serve_refuses_a_public_bind_without_upload_tokens(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", [folder(tmp_path)], server={"host": "0.0.0.0", "port": 1})
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "upload_tokens" in out.stderr and "Traceback" not in out.stderr
