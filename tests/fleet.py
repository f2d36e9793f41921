"""A fleet of real ``casproxy serve`` processes for the tests of coalescing across instances:
each with its own disk cache, all sharing a bucket cache tier (moto's S3), a Redis and one slow
API origin that counts its fetches (a small aiohttp app; each instance says who it is in a header).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from moto.server import ThreadedMotoServer

from tests.conftest import Bucket, free_port, write_config
from tests.processes import ProxyProcess

INSTANCE_HEADER = "X-Casproxy-Instance"
FIRST_CHUNK = 64 << 10


@dataclass
class Origin:
    """An API origin that takes ``delay`` seconds between a fetch's first chunk and the rest,
    or, while ``hold`` is clear, holds every fetch there (a holder to kill mid-fill)."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    fetches: list[tuple[str, str]] = field(default_factory=list)  # (digest, instance), in order
    started: asyncio.Event = field(default_factory=asyncio.Event)  # a fetch has begun
    hold: asyncio.Event | None = None
    delay: float = 0.3
    url: str = ""

    def count(self, digest: str) -> int:
        return sum(1 for fetched, _ in self.fetches if fetched == digest)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["hash"]
        data = self.blobs.get(digest)
        if data is None:
            raise web.HTTPNotFound()
        self.fetches.append((digest, request.headers.get(INSTANCE_HEADER, "?")))
        self.started.set()
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        await response.write(data[:FIRST_CHUNK])
        if self.hold is not None:
            await self.hold.wait()
        else:
            await asyncio.sleep(self.delay)
        await response.write(data[FIRST_CHUNK:])
        return response


@contextlib.asynccontextmanager
async def serving(origin: Origin) -> AsyncIterator[Origin]:
    app = web.Application()
    app.router.add_get("/blobs/{hash}", origin.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    origin.url = f"http://127.0.0.1:{server.port}/blobs/{{hash}}"
    try:
        yield origin
    finally:
        if origin.hold is not None:
            origin.hold.set()  # let a held handler finish, or the server's close waits on it
        await server.close()


@contextlib.contextmanager
def own_moto() -> Iterator[str]:
    """A moto S3 server for one test module: the fleet's bucket traffic (60 concurrent misses,
    5 MiB puts) neither waits behind nor disturbs the session's shared one."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(key, value)  # for boto3 here and in the instances, as conftest's moto
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class Fleet:
    instances: list[ProxyProcess]
    folder: Path

    def instance(self, name: str) -> ProxyProcess:
        return self.instances[int(name)]

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float:
        """A counter summed over the instances still running."""
        total = 0.0
        for proxy in self.instances:
            if proxy.process is None or proxy.process.poll() is not None:
                continue
            async with session.get(f"{proxy.url}/metrics") as response:
                text = await response.text()
            total += sum(float(value) for value in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
        return total


@contextlib.asynccontextmanager
async def running_fleet(
    folder: Path, size: int, bucket: Bucket, origin: Origin, redis_url: str | None, **origin_options: object
) -> AsyncIterator[Fleet]:
    """``size`` instances: own disk cache, then the shared bucket (role cache), then the origin
    (its tier's config plus ``origin_options``)."""
    instances = []
    for index in range(size):
        home = folder / f"instance-{index}"
        home.mkdir(parents=True)
        port = free_port()
        sections = {"server": {"host": "127.0.0.1", "port": port, "access_log": False}}
        if redis_url is not None:
            sections["coalesce"] = {"url": redis_url, "wait": "20s"}
        tiers = [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(home / "cache"), "min_free": 0},
            bucket.tier("bucket", role="cache"),
            {"name": "origin", "kind": "http", "url": origin.url, "headers": {INSTANCE_HEADER: str(index)}}
            | origin_options,
        ]
        config = write_config(home / "config.toml", tiers, **sections)
        instances.append(ProxyProcess(config, port, home / "casproxy.log"))
    fleet = Fleet(instances, folder)
    try:
        for proxy in instances:
            proxy.start()
        async with aiohttp.ClientSession() as session:
            for proxy in instances:
                await proxy.wait_healthy(session, 60)
        yield fleet
    finally:
        for proxy in instances:  # all at once: each takes a moment to finish
            if proxy.process is not None and proxy.process.poll() is None:
                proxy.process.terminate()
        for proxy in instances:
            proxy.stop()


async def sha1_of_get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """The status and the SHA-1 of the body (hashed as it arrives: 60 bodies of 5 MiB at once)."""
    hasher = hashlib.sha1()
    async with session.get(url) as response:
        async for chunk in response.content.iter_chunked(1 << 20):
            hasher.update(chunk)
        return response.status, hasher.hexdigest()
