"""SPEC 4, "nothing is trusted blindly, not even the local disk": a byte flipped in a cached
entry (in the database, in a file read into memory, in a file sent by sendfile) is never served;
the entry is evicted, counted corrupt, and the blob fetched again from the next tier. Removals by
``casproxy cache purge|check`` reach a running server's memory at once."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import REGISTRY

from proxy import Composite, DiskTier
from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, free_port, make_blob, write_config
from tests.processes import REPO, ProxyProcess
from tests.test_library import DictAPI


def cached_store(disk: DiskTier, api: DictAPI) -> Composite:
    store = Composite([disk])
    store.append_source(api)
    return store


def flip_file_byte(cache: Path, size: int) -> None:
    """Flip one bit in the middle of the cache's value file of ``size`` bytes."""
    [path] = [path for path in cache.rglob("*.val") if path.stat().st_size == size]
    raw = bytearray(path.read_bytes())
    raw[size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def flip_database_byte(cache: Path, digest: str) -> None:
    """Flip one bit of an entry kept in the index database itself (a small blob)."""
    with sqlite3.connect(cache / "cache.db") as db:
        (value,) = db.execute("SELECT value FROM Cache WHERE key = ?", (digest,)).fetchone()
        raw = bytearray(value)
        raw[len(raw) // 2] ^= 0x01
        db.execute("UPDATE Cache SET value = ? WHERE key = ?", (bytes(raw), digest))


def flip(cache: Path, digest: str, size: int, where: str) -> None:
    if where == "database":
        flip_database_byte(cache, digest)
    else:
        flip_file_byte(cache, size)


def corrupt_count(tier: str) -> float:
    return REGISTRY.get_sample_value("casproxy_tier_lookups_total", {"tier": tier, "result": "corrupt"}) or 0.0


@pytest.mark.parametrize("where", ["database", "file"])
@pytest.mark.parametrize("restart", [True, False])
async def test_a_flipped_byte_on_disk_is_refetched_never_served(tmp_path: Path, where: str, restart: bool) -> None:
    size = 1000 if where == "database" else 100_000  # under / over file_threshold (32 KiB)
    data, digest = make_blob(size)
    api = DictAPI({digest: data})
    cache = tmp_path / "cache"

    def disk() -> DiskTier:
        # memory_limit 0: without a restart, the next read still comes from the disk
        return DiskTier(str(cache), memory_limit=0 if not restart else "64 MiB")

    first = disk()
    async with cached_store(first, api) as store:
        assert await store.get(digest) == data
        await store.wait_idle()
        assert first.usage().entries == 1
        if not restart:
            flip(cache, digest, size, where)
            assert await store.get(digest) == data
            assert first.describe()["corrupt_evicted"] == 1
            assert store.snapshot()["tiers"]["disk"]["corrupt"] == 1
            assert api.fetches == [digest, digest]
            return
    flip(cache, digest, size, where)
    before = corrupt_count("disk")
    second = disk()
    async with cached_store(second, api) as store:
        assert await store.get(digest) == data
        assert api.fetches == [digest, digest]  # refetched from the next tier
        assert second.describe()["corrupt_evicted"] == 1
        assert store.snapshot()["tiers"]["disk"]["corrupt"] == 1
        assert corrupt_count("disk") == before + 1
        await store.wait_idle()
        opened = await store.open(digest)
        assert opened.tier == "disk"  # the good copy is cached again
        await opened.close()
        assert await store.get(digest) == data


async def test_entries_of_older_versions_are_verified_once_then_trusted_or_evicted(tmp_path: Path) -> None:
    (good, good_digest), (bad, bad_digest) = make_blob(100_000), make_blob(100_000)
    api = DictAPI({good_digest: good, bad_digest: bad})
    cache = tmp_path / "cache"
    async with cached_store(DiskTier(str(cache)), api) as store:
        for digest in (good_digest, bad_digest):
            await store.get(digest)
        await store.wait_idle()
    with sqlite3.connect(cache / "cache.db") as db:  # what a version before checksums left
        db.execute("UPDATE Cache SET tag = NULL")
    with sqlite3.connect(cache / "cache.db") as db:
        (filename,) = db.execute("SELECT filename FROM Cache WHERE key = ?", (bad_digest,)).fetchone()
    path = cache / filename
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0x01
    path.write_bytes(bytes(raw))

    disk = DiskTier(str(cache), memory_limit=0)
    async with cached_store(disk, api) as store:
        assert await store.get(good_digest) == good
        assert await store.get(bad_digest) == bad
        assert api.fetches == [good_digest, bad_digest, bad_digest]  # the good one was a disk hit
    with sqlite3.connect(cache / "cache.db") as db:
        (tag,) = db.execute("SELECT tag FROM Cache WHERE key = ?", (good_digest,)).fetchone()
    assert isinstance(tag, str)  # adopted: checked by its checksum from now on


async def test_a_flipped_byte_in_a_file_sent_by_sendfile_cuts_the_connection(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    data, digest = make_blob(3 << 20)  # over memory_item_limit: sent from its file
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / digest).write_bytes(data)
    cache = tmp_path / "cache"
    client = await make_proxy(
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(cache)},
            {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
        ]
    )

    async def get() -> tuple[str, bytes]:
        async with client.get(f"/sha1/{digest}") as response:
            assert response.status == 200
            return response.headers["X-Cache"], await response.read()

    assert await get() == ("MISS", data)
    for _ in range(200):  # the cache is filled after the response: poll until it is a hit
        cached, body = await get()
        assert body == data
        if cached == "HIT":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("never cached")

    flip_file_byte(cache, len(data))
    before = corrupt_count("disk")
    with pytest.raises(aiohttp.ClientError):  # never a complete body of wrong bytes
        await get()
    assert corrupt_count("disk") == before + 1
    assert client.app[STORE].snapshot()["tiers"]["disk"]["corrupt"] == 1  # in /stats too
    cached, body = await get()  # evicted: fetched from the source again, correct
    assert (cached, body) == ("MISS", data)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def test_cache_purge_and_check_reach_a_running_server(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    data, digest = make_blob(100_000)  # held in each worker's memory once read
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / digest).write_bytes(data)
    cache = tmp_path / "cache"
    port = free_port()
    config = write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(cache)},
            {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
        ],
        server={"host": "127.0.0.1", "port": port, "access_log": False, "workers": 2},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")

    async def get() -> str:
        async with session.get(f"{proxy.url}/sha1/{digest}") as response:
            assert response.status == 200
            assert await response.read() == data
            return response.headers["X-Cache"]

    async def until_hits_everywhere() -> None:
        """Until several requests in a row hit (each worker then holds it in memory)."""
        hits = 0
        for _ in range(400):
            hits = hits + 1 if await get() == "HIT" else 0
            if hits >= 20:
                return
            await asyncio.sleep(0.01)
        pytest.fail("never cached")

    def cli(*args: str) -> int:
        command = [sys.executable, "-m", "proxy", "cache", *args, "-c", str(config)]
        env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, check=False).returncode

    try:
        proxy.start()
        await proxy.wait_healthy(session, limit=20)
        await until_hits_everywhere()
        assert await asyncio.to_thread(cli, "purge", digest) == 0
        assert await get() == "MISS"  # no worker serves it from memory any more

        await until_hits_everywhere()
        flip_file_byte(cache, len(data))  # rot under a copy the workers hold (verified) in memory
        assert await asyncio.to_thread(cli, "check") == 1  # found and removed
        assert await get() == "MISS"
    finally:
        proxy.stop()


async def test_a_flipped_byte_in_a_large_entry_under_uvloop_cuts_the_connection(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """uvloop has no sendfile: the file is copied through Python, checked the same way."""
    pytest.importorskip("uvloop")
    data, digest = make_blob(3 << 20)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / digest).write_bytes(data)
    cache = tmp_path / "cache"
    port = free_port()
    config = write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(cache)},
            {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
        ],
        server={"host": "127.0.0.1", "port": port, "access_log": False, "event_loop": "uvloop"},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")

    async def get() -> tuple[str, bytes]:
        async with session.get(f"{proxy.url}/sha1/{digest}") as response:
            assert response.status == 200
            return response.headers["X-Cache"], await response.read()

    try:
        proxy.start()
        await proxy.wait_healthy(session, limit=20)
        for _ in range(200):
            cached, body = await get()
            assert body == data
            if cached == "HIT":
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("never cached")
        flip_file_byte(cache, len(data))
        with pytest.raises(aiohttp.ClientError):
            await get()
        assert await get() == ("MISS", data)
    finally:
        proxy.stop()
