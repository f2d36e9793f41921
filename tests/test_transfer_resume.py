"""Interrupted exports (SPEC 7): ``casproxy export`` killed (-9) or stopped with Ctrl-C half-way,
then run again with the same arguments. A small reverse proxy in front of moto counts every S3
request the command makes and pulls the trigger at an exact request, so "does not redo finished
work" is a count, not a guess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Bucket, make_blob, write_config

MiB = 1 << 20


def child_env() -> dict[str, str]:
    """The environment for a casproxy subprocess: moto's credentials (set by the s3 fixture),
    none of the developer's own CASPROXY_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}


_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect"}


class CountingProxy:
    """Forwards to moto; counts S3 operations (in all, and per bucket). Hooks: ``before(request,
    bucket, operation)`` is awaited as a request arrives and may hold it, or refuse it
    (False: answered 503, never sent); ``refuse(bucket, operation)`` True answers 500 (a
    broken bucket); ``after(operation, count)`` is awaited once a request has reached moto
    (so a kill there leaves that request done at the store, unanswered)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.counts: Counter[str] = Counter()
        self.by_bucket: Counter[tuple[str, str]] = Counter()
        self.before: Callable[[web.Request, str, str], Awaitable[bool]] | None = None
        self.refuse: Callable[[str, str], bool] | None = None
        self.after: Callable[[str, int], Awaitable[None] | None] | None = None
        self.delay = 0.0
        self.in_flight = 0
        self.url = ""
        self._session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            operation, bucket = _operation(request), request.path.lstrip("/").split("/", 1)[0]
            body = await request.read()
            if self.before is not None and not await self.before(request, bucket, operation):
                return web.Response(status=503)
            if self.refuse is not None and self.refuse(bucket, operation):
                self.by_bucket[bucket, f"refused {operation}"] += 1
                return web.Response(status=500, body=_S3_ERROR, content_type="application/xml")
            if self.delay:
                await asyncio.sleep(self.delay)
            assert self._session is not None
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
            async with self._session.request(
                request.method, self.upstream + request.raw_path, headers=headers, data=body, allow_redirects=False
            ) as answer:
                payload = await answer.read()
                reply = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
            self.counts[operation] += 1
            self.by_bucket[bucket, operation] += 1
            if self.after is not None:
                pending = self.after(operation, self.counts[operation])
                if pending is not None:
                    await pending
            return web.Response(status=answer.status, headers=reply, body=payload)
        finally:
            self.in_flight -= 1

    def reset(self) -> None:
        self.counts.clear()
        self.by_bucket.clear()
        self.before = self.refuse = self.after = None
        self.delay = 0.0

    async def settle(self) -> None:
        """Wait until requests the killed process left behind have reached moto."""
        for _ in range(500):
            if self.in_flight == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("requests still in flight")


_S3_ERROR = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>fault proxy</Message></Error>"


async def until(check: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll ``check`` (off the loop: it may read SQLite) until true; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


def _operation(request: web.Request) -> str:
    query, method = request.query, request.method
    if method == "PUT":
        return "UploadPart" if "partNumber" in query else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
    if method == "GET":
        return "ListObjects" if "list-type" in query else "ListParts" if "uploadId" in query else "GetObject"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    return "HeadObject" if method == "HEAD" else method


@pytest.fixture
async def counting(s3_endpoint: str) -> AsyncIterator[CountingProxy]:
    proxy = CountingProxy(s3_endpoint)
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    proxy.url = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        proxy._session = session
        yield proxy
    await server.close()


def origin(tmp_path: Path, sizes: list[int], seed: int) -> tuple[Path, dict[str, bytes]]:
    """A store (disk cache in front of a folder) holding blobs of ``sizes``, and a hashes file."""
    (tmp_path / "blobs").mkdir()
    blobs = {}
    for index, size in enumerate(sizes):
        data, digest = make_blob(size, seed=seed + index)
        (tmp_path / "blobs" / digest).write_bytes(data)
        blobs[digest] = data
    (tmp_path / "hashes.txt").write_text("".join(f"{h}\n" for h in blobs))
    config = write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
            {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
        ],
    )
    return config, blobs


async def export(
    tmp_path: Path, config: Path, target: str, proxy: CountingProxy, *extra: str
) -> tuple[asyncio.subprocess.Process, Callable[[], asyncio.Future[tuple[bytes, bytes]]]]:
    args = ["-m", "proxy", "export", "-c", str(config), "--hashes", str(tmp_path / "hashes.txt"), "--to", target]
    args += ["--endpoint-url", proxy.url, "--checkpoint", str(tmp_path / "export.sqlite"), *extra]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=tmp_path,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return process, lambda: asyncio.ensure_future(asyncio.wait_for(process.communicate(), 60))


def checkpoint_rows(tmp_path: Path, table: str, path: Path | None = None) -> int:
    with contextlib.closing(sqlite3.connect(path or tmp_path / "export.sqlite")) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_killed_export_of_many_blobs_redoes_nothing(
    tmp_path: Path, bucket: Bucket, counting: CountingProxy
) -> None:
    config, blobs = origin(tmp_path, [1000 + 37 * i for i in range(120)], seed=50_000)
    target = bucket.url("many/")
    process, output = await export(tmp_path, config, target, counting, "-j", "4")

    def kill_at(operation: str, count: int) -> None:
        if operation == "PutObject" and count == 60:
            process.kill()

    counting.after = kill_at
    await output()
    assert process.returncode == -signal.SIGKILL
    await counting.settle()
    stored = set(bucket.keys())
    recorded = checkpoint_rows(tmp_path, "items")
    assert 0 < recorded <= len(stored) < len(blobs), "half-way, and nothing recorded that is not stored"

    counting.reset()
    process, output = await export(tmp_path, config, target, counting, "-j", "4")
    _, err = await output()
    assert process.returncode == 0, err.decode()
    assert counting.counts["PutObject"] == len(blobs) - len(stored), "only what was not stored is sent"
    assert counting.counts["HeadObject"] == 0, "one listing answers what the bucket has"
    assert counting.counts["ListObjects"] == 1
    assert sorted(bucket.keys()) == sorted(f"many/{h}" for h in blobs)
    for digest in list(blobs)[::17]:
        assert bucket.get(f"many/{digest}") == blobs[digest]
    unrecorded = len(stored) - recorded  # stored just before the kill: found by the listing, skipped
    assert f"done {len(blobs) - unrecorded} ({recorded} by an earlier run), skipped {unrecorded}," in err.decode()
    assert not (tmp_path / "export.sqlite").exists()


async def test_killed_multipart_upload_resumes_from_its_last_part(
    tmp_path: Path, bucket: Bucket, counting: CountingProxy
) -> None:
    config, blobs = origin(tmp_path, [26 * MiB], seed=60_000)
    (digest, data), parts = next(iter(blobs.items())), 6  # 5 parts of 5 MiB and one of 1 MiB
    target = bucket.url("large/")
    flags = ("-j", "2", "--part-size", "5MiB", "--multipart-threshold", "5MiB")
    process, output = await export(tmp_path, config, target, counting, *flags)

    async def kill_at(operation: str, count: int) -> None:
        if operation == "UploadPart" and count == 3:
            # Parts are recorded in batches: kill once a finished part is committed (the point
            # of the test), not at whatever moment the third part happens to arrive.
            await until(lambda: checkpoint_rows(tmp_path, "parts") > 0, "a part recorded")
            process.kill()

    async def hold_later_parts(request: web.Request, bucket: str, operation: str) -> bool:
        if operation == "UploadPart" and int(request.query["partNumber"]) > 3:
            await asyncio.wait_for(process.wait(), 60)  # the kill comes first: these never reach moto
            return False
        return True

    counting.after = kill_at
    counting.before = hold_later_parts
    await output()
    assert process.returncode == -signal.SIGKILL
    await counting.settle()
    assert bucket.keys() == []
    (upload,) = bucket.client.list_multipart_uploads(Bucket=bucket.name)["Uploads"]
    held = bucket.client.list_parts(Bucket=bucket.name, Key=f"large/{digest}", UploadId=upload["UploadId"])["Parts"]
    assert 3 <= len(held) < parts
    assert checkpoint_rows(tmp_path, "uploads") == 1
    assert 0 < checkpoint_rows(tmp_path, "parts") <= len(held), "a part is recorded only once it is uploaded"

    counting.reset()
    process, output = await export(tmp_path, config, target, counting, *flags)
    _, err = await output()
    assert process.returncode == 0, err.decode()
    assert counting.counts["CreateMultipartUpload"] == 0, "the same upload goes on"
    assert counting.counts["UploadPart"] == parts - len(held), "finished parts are not sent again"
    assert counting.counts["CompleteMultipartUpload"] == 1
    assert bucket.get(f"large/{digest}") == data
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []


async def test_ctrl_c_pauses_cleanly_and_the_rerun_finishes(
    tmp_path: Path, bucket: Bucket, counting: CountingProxy
) -> None:
    config, blobs = origin(tmp_path, [2000] * 80, seed=70_000)
    target = bucket.url("paused/")
    counting.delay = 0.01  # slow enough that progress lines come out before the interrupt
    process, output = await export(tmp_path, config, target, counting, "-j", "2", "--progress-interval", "0.1")

    def interrupt_at(operation: str, count: int) -> None:
        if operation == "PutObject" and count == 40:
            process.send_signal(signal.SIGINT)

    counting.after = interrupt_at
    _, err = await output()
    text = err.decode()
    assert process.returncode == 130, text
    assert re.search(r"^export: \d+/80 blobs, [\d.]+ KiB of ~[\d.]+ KiB, ", text, re.M), (
        "status lines on a non-terminal"
    )
    assert re.search(r"^export: done \d+, skipped 0, failed 0, corrupt 0; ", text, re.M), text
    assert "interrupted; run the same command again to resume" in text
    assert "Traceback" not in text
    await counting.settle()
    stored = set(bucket.keys())
    recorded = checkpoint_rows(tmp_path, "items")
    assert 0 < recorded <= len(stored) < len(blobs)

    counting.reset()
    process, output = await export(tmp_path, config, target, counting, "-j", "2")
    _, err = await output()
    assert process.returncode == 0, err.decode()
    assert counting.counts["PutObject"] == len(blobs) - len(stored)
    assert sorted(bucket.keys()) == sorted(f"paused/{h}" for h in blobs)
