"""A regional cache (SPEC 8, deploy/regional/): a real nginx running the shipped nginx.conf over
three casproxy instances that share a Redis and a bucket. Each blob lands on exactly one node's
disk, and stopping a node moves only that node's share."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Bucket, free_port, make_blob
from tests.fleet import Fleet, Origin, own_moto, running_fleet, serving
from tests.redis_server import RedisServer

BLOBS = 30
SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "regional" / "nginx.conf"
INSTALL_HINT = "nginx is not installed: scripts/test installs it (or apt-get install nginx)"


def nginx_config(folder: Path, port: int, fleet: Fleet) -> str:
    """deploy/regional/nginx.conf as shipped, on loopback: the nodes' and the listen addresses
    replaced, files kept in ``folder``, and a header naming the node that answered."""
    text = SHIPPED.read_text()
    for index, proxy in enumerate(fleet.instances):
        text = text.replace(f"server casproxy-{index}:8080 ", f"server {proxy.url.removeprefix('http://')} ")
    assert "casproxy-" not in text.split("upstream casproxy")[1], "a node the test does not run"
    temp = "".join(
        f"  {kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("http {\n", "http {\n" + temp, 1)
    text = text.replace("location / {\n", "location / {\n      add_header X-Upstream $upstream_addr always;\n", 1)
    return f"daemon off;\nmaster_process off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n{text}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """This module's own moto (see tests.fleet.own_moto), in place of the session's."""
    with own_moto() as endpoint:
        yield endpoint


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with serving(Origin(delay=0)) as origin:
        yield origin


@pytest.fixture
async def regional(
    tmp_path: Path, bucket: Bucket, origin: Origin, redis_server: RedisServer
) -> AsyncIterator[tuple[Fleet, str]]:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if nginx is None:
        pytest.fail(INSTALL_HINT)
    async with running_fleet(tmp_path / "fleet", 3, bucket, origin, redis_server.url) as fleet:
        folder = tmp_path / "nginx"
        folder.mkdir()
        port = free_port()
        (folder / "nginx.conf").write_text(nginx_config(folder, port, fleet))
        process = start_nginx(nginx, folder)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_for_nginx(url, process, folder)
            yield fleet, url
        finally:
            process.terminate()
            process.wait(timeout=10)


def start_nginx(nginx: str, folder: Path) -> subprocess.Popen[bytes]:
    with (folder / "nginx.log").open("ab") as log:
        return subprocess.Popen(
            [nginx, "-e", str(folder / "error.log"), "-p", str(folder), "-c", str(folder / "nginx.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_for_nginx(url: str, process: subprocess.Popen[bytes], folder: Path) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, (folder / "error.log").read_text()
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "nginx did not start"
            await asyncio.sleep(0.05)


async def served_by(
    session: aiohttp.ClientSession, url: str, digests: list[str], data: dict[str, bytes]
) -> dict[str, str]:
    """Which node (host:port) answered each GET through nginx; every body checked."""
    nodes = {}
    for digest in digests:
        async with session.get(f"{url}/sha1/{digest}") as response:
            assert response.status == 200
            assert await response.read() == data[digest]
            nodes[digest] = response.headers["X-Upstream"].split(",")[-1].strip()  # after any retry
    return nodes


async def on_disk(session: aiohttp.ClientSession, fleet: Fleet, digests: list[str]) -> dict[str, list[str]]:
    """For each digest, the nodes whose own disk cache holds it (HEAD names the tier that has it)."""
    found: dict[str, list[str]] = {digest: [] for digest in digests}
    for proxy in fleet.instances:
        if proxy.process is None or proxy.process.poll() is not None:
            continue
        for digest in digests:
            async with session.head(f"{proxy.url}/sha1/{digest}") as response:
                assert response.status == 200
                if response.headers["X-Cache-Tier"] == "disk":
                    found[digest].append(proxy.url.removeprefix("http://"))
    return found


async def test_each_blob_lives_on_one_node_and_a_lost_node_moves_only_its_share(
    regional: tuple[Fleet, str], origin: Origin
) -> None:
    fleet, url = regional
    data = dict(make_blob(1000)[::-1] for _ in range(BLOBS))
    origin.blobs.update(data)
    digests = list(data)
    async with aiohttp.ClientSession() as session:
        first = await served_by(session, url, digests, data)
        assert await on_disk(session, fleet, digests) == {digest: [first[digest]] for digest in digests}
        assert len(origin.fetches) == BLOBS

        # Stop the node with the largest share (so the share that moves is never empty).
        lost, share = Counter(first.values()).most_common(1)[0]
        next(proxy for proxy in fleet.instances if proxy.url.endswith(lost)).stop()
        second = await served_by(session, url, digests, data)
        moved = {digest for digest in digests if second[digest] != first[digest]}
        assert moved == {digest for digest in digests if first[digest] == lost}, "only the lost node's share moves"
        assert len(moved) == share
        # The moved blobs came from the bucket, not the origin, and now live on one survivor each.
        assert len(origin.fetches) == BLOBS
        assert await on_disk(session, fleet, digests) == {digest: [second[digest]] for digest in digests}
