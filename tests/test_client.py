"""The client library and the ``put``/``get`` commands, against real proxies: in-process for the
async client, a ``casproxy serve`` subprocess for the blocking client and the command line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.cli import _Progress
from proxy.client import AsyncClient, Client
from proxy.errors import DigestMismatch, Forbidden, NotFound, Unauthorized, UpstreamFailed
from tests.conftest import ProxyFactory, free_port, make_blob, write_config

TOKEN = "up-token"
# The commands read CASPROXY_URL/CASPROXY_TOKEN: a developer's own must not leak into the tests.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}


def tiers(root: Path) -> list[dict[str, Any]]:
    return [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(root / "cache")},
        {"name": "local", "kind": "fs", "role": "source", "path": str(root / "local")},
    ]


@pytest.fixture
async def base_url(make_proxy: ProxyFactory, tmp_path: Path) -> str:
    proxy = await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]})
    return str(proxy.make_url(""))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``casproxy serve`` as users run it, on a free port, with an upload token."""
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    config = write_config(
        root / "config.toml",
        tiers(root),
        server={"port": port},
        uploads={"targets": ["local"]},
        auth={"upload_tokens": [TOKEN]},
    )
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "-c", str(config)], cwd=root, env=ENV, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            assert server.poll() is None, (root / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /healthz in time"
                time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def casproxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30, cwd=cwd, env=ENV
    )


async def serve(app: web.Application) -> tuple[TestServer, str]:
    server = TestServer(app)
    await server.start_server()
    return server, str(server.make_url(""))


# --- the async client against an in-process proxy ---------------------------------------------


async def test_put_and_get_bytes_paths_and_file_objects(base_url: str, tmp_path: Path) -> None:
    async with AsyncClient(base_url) as client:
        data, digest = make_blob(10_000)
        ticket = await client.put(data)
        assert (ticket.digest, ticket.size) == (digest, len(data))
        assert ticket.url.endswith(f"/sha1/{digest}") and ticket.ticket.startswith(ticket.url + "?expires=")
        assert ticket.expires > time.time()
        assert (tmp_path / "local" / digest).read_bytes() == data
        assert await client.get(digest) == data

        big, big_digest = make_blob(5 << 20)
        path = tmp_path / "big.bin"
        path.write_bytes(big)
        sent: list[int] = []
        assert (await client.put(path, progress=sent.append)).digest == big_digest
        assert sum(sent) == len(big) and len(sent) > 1  # streamed in chunks, not one buffer
        assert (await client.put(str(path))).digest == big_digest  # already there: 200, same ticket
        assert await client.get(big_digest) == big

        # A file object is uploaded from where it stands, not from its start.
        small, small_digest = make_blob(3000)
        with open(tmp_path / "framed.bin", "w+b") as file:
            file.write(b"header" + small)
            file.seek(len(b"header"))
            assert (await client.put(file)).digest == small_digest
        assert await client.get(small_digest) == small
        assert await client.get(small_digest.upper()) == small  # names are case-insensitive


async def test_sha256_upload_and_chunked_stream(base_url: str) -> None:
    data, _ = make_blob(3 << 20)
    async with AsyncClient(base_url) as client:
        ticket = await client.put(data, "sha256")
        assert ticket.digest == hashlib.sha256(data).hexdigest() and ticket.digest.algorithm == "sha256"
        assert ticket.url.endswith(f"/sha256/{ticket.digest}")
        chunks = [chunk async for chunk in client.stream(ticket.digest)]
        assert len(chunks) > 1 and b"".join(chunks) == data


async def test_get_many_keeps_input_order_and_raises_for_a_missing_blob(base_url: str) -> None:
    blobs = [make_blob(1000 + i * 500) for i in range(20)]
    async with AsyncClient(base_url) as client:
        for data, _ in blobs:
            await client.put(data)
        wanted = [digest for _, digest in reversed(blobs)]
        assert await client.get_many(wanted, concurrency=4) == [data for data, _ in reversed(blobs)]
        absent = make_blob(10)[1]
        with pytest.raises(NotFound, match=absent):
            await client.get_many([*wanted[:5], absent, *wanted[5:]], concurrency=4)


async def test_missing_answers_in_the_order_asked(base_url: str) -> None:
    async with AsyncClient(base_url) as client:
        present = [(await client.put(make_blob(100)[0])).digest for _ in range(3)]
        absent = [make_blob(10)[1] for _ in range(3)]
        sha256 = hashlib.sha256(b"nothing").hexdigest().upper()
        asked = [absent[0], *present, sha256, *absent[1:]]
        assert await client.missing(asked) == [absent[0], sha256.lower(), *absent[1:]]


async def test_missing_splits_large_queries_into_batches_the_server_takes() -> None:
    batches: list[int] = []

    async def missing(request: web.Request) -> web.Response:
        hashes = (await request.json())["hashes"]
        batches.append(len(hashes))
        if len(hashes) > 10_000:  # what the real server answers; looking up 10 000 for real is slow
            return web.json_response({"type": "bad-request", "title": "t", "status": 400, "detail": "many"}, status=400)
        return web.json_response({"missing": [h for h in hashes if int(h, 16) % 2]})

    app = web.Application()
    app.router.add_post("/sha1/missing", missing)
    server, url = await serve(app)
    try:
        asked = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(25_000)]
        async with AsyncClient(url) as client:
            assert await client.missing(asked) == [h for h in asked if int(h, 16) % 2]
        assert batches == [10_000, 10_000, 5_000]
    finally:
        await server.close()


async def test_tokens_and_tickets(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy = await make_proxy(
        tiers(tmp_path), uploads={"targets": ["local"]}, auth={"upload_tokens": [TOKEN], "require_ticket": True}
    )
    base = str(proxy.make_url("")).rstrip("/")
    data, digest = make_blob(2000)
    async with AsyncClient(base) as anonymous, AsyncClient(base, "wrong") as wrong, AsyncClient(base, TOKEN) as ok:
        with pytest.raises(Unauthorized, match="upload token"):
            await anonymous.put(data)
        with pytest.raises(Forbidden, match="not a valid upload token"):
            await wrong.put(data)
        ticket = await ok.put(data)
        assert await ok.get(digest) == data
        with pytest.raises(Forbidden):
            await anonymous.get(digest)
        # The ticket names the configured public URL; only its path and query are signed.
        parts = urlsplit(ticket.ticket)
        assert await anonymous.get(f"{base}{parts.path}?{parts.query}") == data


# --- a misbehaving server: the client must notice ----------------------------------------------


async def test_wrong_bytes_are_never_returned_nor_left_on_disk(tmp_path: Path) -> None:
    data, digest = make_blob(5000)

    async def corrupt(request: web.Request) -> web.Response:
        return web.Response(body=data[:-1] + bytes([data[-1] ^ 1]))

    app = web.Application()
    app.router.add_get("/sha1/{hash}", corrupt)
    server, url = await serve(app)
    try:
        async with AsyncClient(url) as client:
            with pytest.raises(DigestMismatch, match=digest):
                await client.get(digest)
            received: list[bytes] = []

            async def drain() -> None:
                async for chunk in client.stream(digest):
                    received.append(chunk)

            with pytest.raises(DigestMismatch):
                await drain()
            assert received == []  # the last chunk is held back until verified
            (tmp_path / "out").mkdir()
            with pytest.raises(DigestMismatch):
                await client.download(digest, tmp_path / "out" / digest)
        assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its temp
    finally:
        await server.close()


async def test_get_fills_the_announced_size_and_takes_chunked_and_encoded_bodies() -> None:
    """get() writes into a buffer of Content-Length; bodies without one (chunked) or with
    another length on the wire (gzip) still arrive whole and verified."""
    data, digest = make_blob(3 << 20)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(data), 700_001):
            await response.write(data[start : start + 700_001])
        await response.write_eof()
        return response

    async def plain(request: web.Request) -> web.Response:
        return web.Response(body=data)

    async def gzipped(request: web.Request) -> web.Response:  # Content-Length: the gzip's
        return web.Response(body=gzip.compress(data, 1), headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/chunked/sha1/{hash}", chunked)
    app.router.add_get("/gzip/sha1/{hash}", gzipped)
    app.router.add_get("/sha1/{hash}", plain)
    server, url = await serve(app)
    try:
        async with AsyncClient(url) as client:
            for ref in (digest, f"{url}/chunked/sha1/{digest}", f"{url}/gzip/sha1/{digest}"):
                got = await client.get(ref)
                assert type(got) is bytes and got == data, ref
    finally:
        await server.close()


async def test_retries_honour_retry_after_then_give_up() -> None:
    data, flaky = make_blob(100)
    broken, absent = make_blob(100)[1], make_blob(100)[1]
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        name = request.match_info["hash"]
        seen.append(name)
        if name == broken or (name == flaky and seen.count(flaky) == 1):
            body = {"type": "upstream-failed", "title": "t", "status": 502, "detail": "s3 timed out"}
            return web.json_response(body, status=502, headers={"Retry-After": "3600"})
        if name == flaky:
            return web.Response(body=data)
        return web.json_response({"type": "not-found", "title": "t", "status": 404, "detail": "gone"}, status=404)

    app = web.Application()
    app.router.add_get("/sha1/{hash}", answer)
    server, url = await serve(app)
    try:
        async with AsyncClient(url, retries=1, max_retry_after=0.05) as client:
            started = time.monotonic()
            assert await client.get(flaky) == data
            with pytest.raises(UpstreamFailed, match="s3 timed out") as failed:
                await client.get(broken)
            assert failed.value.headers["Retry-After"] == "3600"
            with pytest.raises(NotFound, match="gone"):
                await client.get(absent)
            assert seen == [flaky, flaky, broken, broken, absent]  # a 404 is an answer, not retried
            assert time.monotonic() - started < 5  # Retry-After was capped, not obeyed for an hour
    finally:
        await server.close()


async def test_plain_http_errors_are_typed_and_tokens_stay_home() -> None:
    seen: list[str | None] = []

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=401, text="go away")  # not problem+json: some other server

    app = web.Application()
    app.router.add_get("/{tail:.*}", refuse)
    server, url = await serve(app)
    digest = make_blob(10)[1]
    try:
        async with AsyncClient(f"{url}/mirror", TOKEN) as client:
            with pytest.raises(Unauthorized, match=f"HTTP 401 Unauthorized from {url}/mirror/sha1/{digest}$"):
                await client.get(digest)
            with pytest.raises(Unauthorized) as elsewhere:
                await client.get(f"{url}/sha1/{digest}?expires=1&sig=secret")
        assert "secret" not in str(elsewhere.value)
        assert seen == [f"Bearer {TOKEN}", None]  # a URL outside base_url never gets the token
    finally:
        await server.close()


# --- the blocking client and the command line, against `casproxy serve` -------------------------


def test_blocking_client_from_plain_code(served: str, tmp_path: Path) -> None:
    data, digest = make_blob(20_000)
    with Client(served, TOKEN) as client:
        ticket = client.put(data)
        assert ticket.ticket.startswith(f"{served}/sha1/{digest}?")  # the server's own public URL
        assert client.get(digest) == data
        assert client.get(ticket) == data
        assert client.put(io.BytesIO(data)).digest == digest
        assert client.download(ticket.ticket, tmp_path / "copy") == len(data)
        assert (tmp_path / "copy").read_bytes() == data
        assert client.get_many([digest, digest]) == [data, data]
        absent = make_blob(10)[1]
        assert client.missing([digest, absent]) == [absent]
        with pytest.raises(NotFound):
            client.get(absent)
    with Client(served) as anonymous, pytest.raises(Unauthorized):
        anonymous.put(data)


def test_cli_put_prints_one_ticket_per_file_in_order(served: str, tmp_path: Path) -> None:
    blobs = [make_blob(size) for size in (3 << 20, 10, 5000)]  # the big one first: it finishes last
    files = []
    for i, (data, _) in enumerate(blobs):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(data)
    done = casproxy("put", *map(str, files), "--url", served, "--token", TOKEN, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    tickets = [json.loads(line) for line in done.stdout.splitlines()]
    assert [t["sha1"] for t in tickets] == [digest for _, digest in blobs]
    assert [t["size"] for t in tickets] == [len(data) for data, _ in blobs]


def test_cli_get_writes_verified_files(served: str, tmp_path: Path) -> None:
    blobs = [make_blob(size) for size in (70_000, 5)]
    with Client(served, TOKEN) as client:
        tickets = [client.put(data) for data, _ in blobs]
    done = casproxy("get", *(d.upper() for _, d in blobs), "-o", "out", "--url", served, cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(d for _, d in blobs)
    for data, digest in blobs:
        assert (tmp_path / "out" / digest).read_bytes() == data
    # One ticket URL and -o naming a file.
    done = casproxy("get", tickets[0].ticket, "-o", "named.bin", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "named.bin").read_bytes() == blobs[0][0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["put", "nope.bin"], "casproxy: nope.bin: No such file or directory"),
        (["put", "here.bin"], "casproxy: this needs an upload token: Authorization: Bearer <token> (use --token"),
        (["get", "0" * 40], f"casproxy: {'0' * 40}: {'0' * 40} was found"),
        (["get", "xyz"], "casproxy: xyz: 'xyz' is not a digest"),
    ],
    ids=["missing-file", "no-token", "not-found", "bad-hash"],
)
def test_cli_errors_are_one_line(served: str, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "here.bin").write_bytes(b"here")
    done = casproxy(*args, "--url", served, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_cli_unreachable_server_is_one_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = casproxy("get", "0" * 40, "--url", url, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"casproxy: cannot reach {url}: ") and done.stderr.count("\n") == 1, done.stderr


def test_progress_draws_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = _Progress("put", 2, 4 << 20, stream=screen, delay=0)
    progress.add(1 << 20)
    progress.item_done()  # within 0.2 s of the first draw: not redrawn
    assert screen.getvalue().count("\r") == 1 and "put: 0/2 files, 1.0 MiB of 4.0 MiB" in screen.getvalue()
    progress.clear()
    assert screen.getvalue().endswith("\r\033[K")

    fetching = Terminal()  # get: the total grows as the server names each size
    getting = _Progress("get", 4, None, stream=fetching, delay=0)
    getting.expect(2 << 20)
    getting.add(1 << 20)
    assert "get: 0/4 files, 1.0 MiB of ~8.0 MiB, " in fetching.getvalue() and "s left" in fetching.getvalue()

    pipe = io.StringIO()
    quiet = _Progress("put", 1, 10, stream=pipe, delay=0)
    quiet.add(10)
    quiet.clear()
    assert pipe.getvalue() == ""
