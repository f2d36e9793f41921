"""Shared fixtures: real servers on ephemeral ports (moto's S3, small aiohttp upstreams) and
a proxy built from a TOML config exactly as users write it."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from blockbuster import BlockBuster, blockbuster_ctx
from moto.server import ThreadedMotoServer

from proxy.config import Config, load_config
from proxy.server.app import create_app
from proxy.server.fastpath import make_runner

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

_counter = itertools.count()


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fails any blocking call (files, sockets, SQLite, sleep, locks) that proxy code makes on the
    event loop. Each allowance below says why that call is fine there, or whose work removes it."""
    with blockbuster_ctx("proxy") as guard:
        everything = list(guard.functions.values())
        # Resolving a path only asks the kernel for the working folder; constructors do it once.
        guard.functions["os.path.abspath"].deactivate()
        guard.functions["os.getcwd"].deactivate()
        for function in everything:
            # A module's first import reads its files; optional SDKs are imported on first use on
            # purpose (a gcs tier imports gcloud-aio when it is made).
            function.can_block_in("<frozen importlib._bootstrap>", "_find_and_load")
            # The server reads its config and builds its app before its loop starts; tests build
            # proxies from async tests and fixtures, so here that runs on their loop.
            function.can_block_in("proxy/config.py", "load_config")
            function.can_block_in("proxy/server/app.py", "create_app")
        # Two synchronous unlinks remain, each scoped to its one function. TODO: a spool's file is
        # removed when its last reader lets go (a sync refcount; its callers and the tests that
        # find no spool file left expect it gone at once), and a failed bulk upload's temp file in
        # an `except BaseException` (awaiting there could leave it on a second cancel).
        guard.functions["os.unlink"].can_block_in("proxy/store/spool.py", "release")
        guard.functions["os.unlink"].can_block_in("proxy/bulk.py", "store")
        yield guard


def make_blob(size: int, seed: int | None = None, algorithm: str = "sha1") -> tuple[bytes, str]:
    """Deterministic pseudo-random bytes (so failures reproduce) and their digest."""
    seed = next(_counter) if seed is None else seed
    block = hashlib.sha512(f"blob-{seed}".encode()).digest()
    data = (block * (size // len(block) + 1))[:size]
    if size >= 8:  # make every blob of a test unique even when sizes repeat
        data = seed.to_bytes(8, "big") + data[8:]
    return data, hashlib.new(algorithm, data).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spool_files(cache_dir: Path) -> list[Path]:
    """Temp files of blobs being received, in every process's spool folder of a disk tier."""
    return list(cache_dir.glob("spool/*/spool-*"))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(path: Path, tiers: list[dict[str, Any]], **sections: dict[str, Any]) -> Path:
    """A config.toml as a user would write it."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for tier in tiers:
        lines.append("[[tiers]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in tier.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def on_both_paths() -> Any:
    """A module's ``make_proxy = on_both_paths()``: every test there that starts a proxy runs with
    the hot-hit fast path in front of aiohttp, and without it (the HTTP behaviour must not differ)."""

    @pytest.fixture(params=[True, False], ids=["fast-path", "aiohttp-only"])
    def make_proxy(make_proxy: ProxyFactory, request: pytest.FixtureRequest) -> ProxyFactory:
        async def factory(
            tiers: list[dict[str, Any]], **sections: dict[str, Any]
        ) -> TestClient[web.Request, web.Application]:
            server = {**sections.pop("server", {}), "fast_path": request.param}
            return await make_proxy(tiers, server=server, **sections)

        return factory

    return make_proxy


@dataclass
class Bucket:
    name: str
    client: Any
    endpoint: str

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}"

    def tier(self, name: str, prefix: str = "", **options: Any) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "s3",
            "url": self.url(prefix),
            "endpoint_url": self.endpoint,
            "region": "us-east-1",
            **options,
        }

    def put(self, key: str, data: bytes, **extra: Any) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data, **extra)

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server, spoken to over real HTTP."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> Bucket:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    name = f"test-bucket-{next(_counter)}"
    client.create_bucket(Bucket=name)
    return Bucket(name, client, s3_endpoint)


class ProxyServer(TestServer):
    """A TestServer started as `casproxy serve` starts: with the fast path unless config says not."""

    def __init__(self, config: Config, keepalive_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(create_app(config), **kwargs)
        self.config = config
        self.keepalive_timeout = keepalive_timeout

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        if self.keepalive_timeout is not None:
            kwargs["keepalive_timeout"] = self.keepalive_timeout
        return make_runner(self.app, self.config, **kwargs)


ProxyFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProxyFactory]:
    """Start a proxy in-process on a real port from a list of tier tables."""
    monkeypatch.chdir(tmp_path)  # anything relative (./data) lands in the test's folder
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(
        tiers: list[dict[str, Any]], **sections: dict[str, Any]
    ) -> TestClient[web.Request, web.Application]:
        port = free_port()  # chosen up front so URLs the proxy writes (tickets, slots) are right
        sections = {**sections, "server": {"host": "127.0.0.1", "port": port, **sections.get("server", {})}}
        path = write_config(tmp_path / f"config-{len(clients)}.toml", tiers, **sections)
        config: Config = load_config(str(path), environ={})
        client = TestClient(ProxyServer(config, host="127.0.0.1", port=port))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@dataclass
class Upstream:
    """A small aiohttp app standing in for an origin, counting the requests it gets."""

    app: web.Application
    blobs: dict[str, bytes]
    requests: list[str]
    url: str = ""


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    servers: list[TestServer] = []

    async def factory(
        handler: Callable[[web.Request, Upstream], Awaitable[web.StreamResponse]] | None = None,
    ) -> Upstream:
        state = Upstream(web.Application(), {}, [])

        async def default(request: web.Request, up: Upstream) -> web.StreamResponse:
            data = up.blobs.get(request.match_info["hash"])
            if data is None:
                raise web.HTTPNotFound()
            return web.Response(body=data)

        chosen = handler or default

        async def route(request: web.Request) -> web.StreamResponse:
            state.requests.append(request.match_info["hash"])
            return await chosen(request, state)

        state.app.router.add_route("*", "/blobs/{hash}", route)
        server = TestServer(state.app)
        await server.start_server()
        servers.append(server)
        state.url = f"http://{server.host}:{server.port}/blobs/{{hash}}"  # yarl would escape the braces
        return state

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port; see tests/redis_server.py."""
    from tests.redis_server import running_redis  # it imports this module

    with running_redis(tmp_path / "redis") as server:
        yield server
