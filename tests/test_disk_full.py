"""A full cache disk (issue 11, items 3 and 6): a fill makes room as its spool grows (min_free),
a blob the disk cannot hold is kept in memory or passed through from its source, verified and
uncached, never charged to the source and never a 507 for a read; DELETE and ``casproxy cache
check`` still work on a disk filled to the last byte. Real parts: a small tmpfs as the cache
folder, fs folders and aiohttp upstreams as sources, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy import Composite, DiskTier
from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, Upstream, make_blob, spool_files, write_config
from tests.processes import casproxy
from tests.test_library import DictAPI

Client = TestClient[web.Request, web.Application]
MiB = 1 << 20


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Small tmpfs filesystems: a cache disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def make(size: int) -> Path:
        path = tmp_path / f"small-{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(folder: Path) -> None:
    """What another program does to a shared disk: write until not one byte more fits."""
    with open(folder / "other-program.log", "ab", buffering=0) as file:
        for block in (64 << 10, 4 << 10, 512, 1):
            try:
                while True:
                    file.write(bytes(block))
            except OSError:
                continue
    assert os.statvfs(folder).f_bavail == 0


def disk(path: Path, **options: Any) -> dict[str, Any]:
    return {"name": "disk", "kind": "disk", "role": "cache", "path": str(path), **options}


def source(path: Path, blobs: list[tuple[bytes, str]]) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    for data, digest in blobs:
        (path / digest).write_bytes(data)
    return {"name": "local", "kind": "fs", "role": "source", "path": str(path)}


def chunked(request: web.Request, up: Upstream) -> Any:
    """An upstream that does not say how long its answer is (chunked, no Content-Length)."""

    async def answer() -> web.StreamResponse:
        data = up.blobs[request.match_info["hash"]]
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for offset in range(0, len(data) if request.method == "GET" else 0, 64 << 10):
            await response.write(data[offset : offset + (64 << 10)])
        await response.write_eof()
        return response

    return answer()


async def get(client: Client, digest: str, **headers: str) -> tuple[int, bytes, str]:
    response = await client.get(f"/sha1/{digest}", headers=headers)
    return response.status, await response.read(), response.headers.get("X-Cache", "")


def sources_unharmed(client: Client, *names: str) -> None:
    tiers = client.app[STORE].snapshot()["tiers"]
    assert {name: (tiers[name]["errors"], tiers[name]["breaker"]) for name in names} == {
        name: (0, "closed") for name in names
    }


async def test_a_fill_evicts_older_entries_as_its_spool_grows_and_is_cached(
    make_proxy: ProxyFactory, mount: Callable[[int], Path], tmp_path: Path
) -> None:
    cache = mount(16 * MiB) / "cache"
    old = [make_blob(3 * MiB) for _ in range(3)]
    big = make_blob(8 * MiB)  # more than the disk has free with the three cached
    client = await make_proxy(
        [disk(cache, min_free="1 MiB"), source(tmp_path / "local", [*old, big])], breaker={"threshold": 1}
    )
    for data, digest in old:
        assert await get(client, digest) == (200, data, "MISS")
        await client.app[STORE].wait_idle()
    assert os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize < len(big[0])

    assert await get(client, big[1]) == (200, big[0], "MISS")
    await client.app[STORE].wait_idle()
    assert await get(client, big[1]) == (200, big[0], "HIT")  # room was made: it is cached
    stats = client.app[STORE].snapshot()["tiers"]
    assert stats["disk"]["evictions"] >= 2
    sources_unharmed(client, "local")
    assert spool_files(cache) == []


async def test_an_upload_spooled_to_a_file_evicts_older_entries_to_make_room(
    make_proxy: ProxyFactory, mount: Callable[[int], Path]
) -> None:
    """The sidecar's usual shape: the disk cache is the upload target. A body larger than memory
    is spooled in the cache's folder; the cache evicts for it rather than answering 507."""
    cache = mount(16 * MiB) / "cache"
    client = await make_proxy([disk(cache, min_free="1 MiB")], uploads={"targets": ["disk"]})
    old = [make_blob(3 * MiB) for _ in range(3)]
    for data, digest in old:
        assert (await client.put(f"/sha1/{digest}", data=data)).status == 201
    free = os.statvfs(cache).f_bavail * os.statvfs(cache).f_frsize
    big, big_digest = make_blob(free + MiB)  # more than the disk has free with the three stored
    assert len(big) > 2 * MiB  # larger than memory: spooled to a file
    response = await client.put(f"/sha1/{big_digest}", data=big)
    assert response.status == 201, await response.text()
    assert await get(client, big_digest) == (200, big, "HIT")
    assert client.app[STORE].snapshot()["tiers"]["disk"]["evictions"] >= 2
    assert spool_files(cache) == []


async def test_on_a_full_disk_a_range_a_small_blob_and_an_unknown_size_are_passed_through(
    make_proxy: ProxyFactory, upstream: Callable[..., Any], mount: Callable[[int], Path], tmp_path: Path
) -> None:
    """No room on disk, and too little spool memory to keep them: each request reads its
    source again, verified as it goes, instead of a 507."""
    small_disk = mount(16 * MiB)
    large, small, streamed = make_blob(20 * MiB), make_blob(2 * MiB), make_blob(3 * MiB)
    up: Upstream = await upstream(chunked)
    up.blobs[streamed[1]] = streamed[0]
    tiers = [
        disk(small_disk / "cache"),
        source(tmp_path / "local", [large, small]),
        {"name": "origin", "kind": "http", "url": up.url},
    ]
    client = await make_proxy(tiers, server={"spool_memory": "1 MiB"}, breaker={"threshold": 1})
    fill_up(small_disk)

    response = await client.get(f"/sha1/{large[1]}", headers={"Range": "bytes=1000-2999"})
    assert (response.status, response.headers["Content-Range"]) == (206, f"bytes 1000-2999/{len(large[0])}")
    assert await response.read() == large[0][1000:3000]
    assert await get(client, large[1], Range="bytes=-10") == (206, large[0][-10:], "MISS")
    assert await get(client, large[1]) == (200, large[0], "MISS")
    assert await get(client, small[1]) == (200, small[0], "MISS")
    assert await get(client, streamed[1]) == (200, streamed[0], "MISS")
    assert await get(client, streamed[1], Range="bytes=0-9") == (200, streamed[0], "MISS")  # size unknown
    response = await client.head(f"/sha1/{streamed[1]}")  # the upstream's HEAD gives no size either
    assert (response.status, await response.read()) == (200, b"")
    await client.app[STORE].wait_idle()
    sources_unharmed(client, "local", "origin")
    assert client.app[STORE].snapshot()["tiers"]["disk"]["entries"] == 0
    assert spool_files(small_disk / "cache") == []


async def test_on_a_full_disk_a_corrupt_copy_passed_through_is_cut_before_its_last_byte(
    make_proxy: ProxyFactory, mount: Callable[[int], Path], tmp_path: Path
) -> None:
    small_disk = mount(16 * MiB)
    data, digest = make_blob(6 * MiB)
    bad = bytearray(data)
    bad[-1] ^= 0xFF  # only the very last byte is wrong: the client must not get it
    tiers = [disk(small_disk / "cache"), source(tmp_path / "local", [(bytes(bad), digest)])]
    client = await make_proxy(tiers, server={"spool_memory": "1 MiB"})
    fill_up(small_disk)
    for headers in ({"Range": f"bytes=10-{len(data) - 1}"}, {}):
        response = await client.get(f"/sha1/{digest}", headers=headers)
        assert response.status in (200, 206)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_on_a_full_disk_a_blob_that_fits_the_spool_memory_is_kept_there(
    make_proxy: ProxyFactory, upstream: Callable[..., Any], mount: Callable[[int], Path], tmp_path: Path
) -> None:
    small_disk = mount(16 * MiB)
    known, streamed = make_blob(6 * MiB), make_blob(3 * MiB)
    up: Upstream = await upstream(chunked)
    up.blobs[streamed[1]] = streamed[0]
    tiers = [
        disk(small_disk / "cache"),
        source(tmp_path / "local", [known]),
        {"name": "origin", "kind": "http", "url": up.url},
    ]
    client = await make_proxy(tiers, breaker={"threshold": 1})
    fill_up(small_disk)
    assert await get(client, known[1], Range="bytes=5-14") == (206, known[0][5:15], "MISS")
    assert await get(client, streamed[1]) == (200, streamed[0], "MISS")
    assert await get(client, streamed[1]) == (200, streamed[0], "MISS")
    assert len(up.requests) == 2  # one read each: kept in memory, not passed through again
    await client.app[STORE].wait_idle()
    sources_unharmed(client, "local", "origin")
    assert spool_files(small_disk / "cache") == []


async def test_delete_frees_space_on_a_disk_filled_to_the_last_byte(
    make_proxy: ProxyFactory, mount: Callable[[int], Path], tmp_path: Path
) -> None:
    small_disk = mount(16 * MiB)
    blobs = [make_blob(1000), make_blob(MiB), make_blob(1000)]
    tiers = [disk(small_disk / "cache"), source(tmp_path / "local", blobs)]
    client = await make_proxy(tiers, auth={"admin_tokens": ["admin"]})
    for data, digest in blobs:
        assert await get(client, digest) == (200, data, "MISS")
    await client.app[STORE].wait_idle()
    fill_up(small_disk)
    admin = {"Authorization": "Bearer admin"}
    for _, digest in blobs[:2]:  # a row in the database, then an entry with its own file
        response = await client.delete(f"/sha1/{digest}", headers=admin)
        assert response.status == 204, await response.text()
    assert await get(client, blobs[2][1]) == (200, blobs[2][0], "HIT")
    assert client.app[STORE].snapshot()["tiers"]["disk"]["entries"] == 1


def test_cache_check_removes_a_corrupt_entry_on_a_disk_filled_to_the_last_byte(
    mount: Callable[[int], Path], tmp_path: Path
) -> None:
    small_disk = mount(16 * MiB)
    blobs = [make_blob(1000), make_blob(200_000)]
    tiers = [disk(small_disk / "cache"), source(tmp_path / "local", [])]
    config = str(write_config(tmp_path / "config.toml", tiers))
    imported = casproxy(
        "import", "--from", str(source(tmp_path / "in", blobs)["path"]), "--into", "disk", "-c", config, cwd=tmp_path
    )
    assert imported.returncode == 0, imported.stderr
    [value] = [path for path in (small_disk / "cache").rglob("*.val") if path.stat().st_size == 200_000]
    rotten = bytearray(value.read_bytes())
    rotten[7] ^= 0x01
    value.write_bytes(rotten)
    fill_up(small_disk)

    checked = casproxy("cache", "check", "-c", config, cwd=tmp_path)
    assert checked.returncode == 1, checked.stderr  # 1: it removed something (see the README)
    assert json.loads(checked.stdout) == {"disk": {"checked": 2, "removed": [blobs[1][1]]}}
    checked = casproxy("cache", "check", "-c", config, cwd=tmp_path)
    assert (checked.returncode, json.loads(checked.stdout)) == (0, {"disk": {"checked": 1, "removed": []}})


async def test_the_library_reads_a_blob_its_full_disk_cannot_hold(mount: Callable[[int], Path]) -> None:
    small_disk = mount(16 * MiB)
    data, digest = make_blob(6 * MiB)
    origin = DictAPI({digest: data}, chunked=True)
    async with Composite([DiskTier(str(small_disk / "cache")), origin], spool_memory=MiB) as store:
        fill_up(small_disk)
        assert await store.get(digest) == data
        assert b"".join([chunk async for chunk in store.stream(digest)]) == data
        await store.wait_idle()
        assert (store.stats["api"].errors, store.breakers["api"].state) == (0, "closed")
