"""The library API of SPEC 4: tiers composed in-process, no server."""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import diskcache
import pytest

from proxy import APIOrigin, Composite, CorruptBlob, DiskTier, FsTier, NotFound, TierError, UpstreamFailed
from proxy.digest import Digest
from proxy.encoding import encode_bytes
from proxy.store.negative import NegativeCache
from proxy.store.spool import MemoryBudget, Spool
from proxy.tier import Blob, Payload, Tier
from tests.conftest import make_blob, spool_files


class DictAPI(APIOrigin):
    """An origin answering from a dict, counting its fetches."""

    def __init__(self, blobs: dict[str, bytes] | None = None, delay: float = 0.0, chunked: bool = False) -> None:
        self.blobs = blobs or {}
        self.fetches: list[str] = []
        self.delay = delay
        self.chunked = chunked

    async def fetch(self, digest: Digest) -> bytes | AsyncIterator[bytes] | None:
        self.fetches.append(digest)
        await asyncio.sleep(self.delay)
        data = self.blobs.get(digest)
        if data is None or not self.chunked:
            return data

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(data), 1000):
                yield data[offset : offset + 1000]

        return chunks()


class BrokenTier(Tier):
    """Fails every call, counting them."""

    def __init__(self, name: str = "broken", role: str = "source") -> None:
        self.name = name
        self.role = role  # type: ignore[assignment]
        self.calls = 0

    async def open(self, digest: Digest) -> Blob | None:
        self.calls += 1
        raise TierError(f"{self.name}: connection refused")

    async def put(self, digest: Digest, payload: Payload) -> None:
        self.calls += 1
        raise TierError(f"{self.name}: disk full")


async def test_spec_example_api_origin_behind_a_disk_cache(tmp_path: Path) -> None:
    data, digest = make_blob(10_000)
    api = DictAPI({digest: data})
    store = Composite()
    store.append_cache(DiskTier(str(tmp_path / "cache"), size_limit="10 MiB"))
    store.append_source(api)
    try:
        assert await store.get(digest) == data
        await store.wait_idle()
        assert await store.get(digest.upper()) == data
        assert api.fetches == [digest]  # the second read came from the disk cache
        assert b"".join([chunk async for chunk in store.stream(digest)]) == data
        with pytest.raises(NotFound):
            await store.get(make_blob(10)[1])
    finally:
        await store.close()


async def test_streamed_origin_large_blob_is_spooled_and_cached(tmp_path: Path) -> None:
    data, digest = make_blob(3 << 20)
    store = Composite([DiskTier(str(tmp_path / "cache"))])
    store.append_source(DictAPI({digest: data}, chunked=True))
    async with store:
        chunks = [chunk async for chunk in store.stream(digest)]
        assert b"".join(chunks) == data
        assert max(map(len, chunks)) <= 1 << 20  # bounded memory
        await store.wait_idle()
        opened = await store.open(digest)
        assert opened.hit and opened.tier == "disk"
        await opened.close()
    assert spool_files(tmp_path / "cache") == []  # no temp files left behind


async def test_corrupt_copy_is_skipped_counted_and_never_cached(tmp_path: Path) -> None:
    data, digest = make_blob(5000)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / digest).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    store = Composite([DiskTier(str(tmp_path / "cache")), FsTier(str(tmp_path / "bad"), name="bad")])
    store.append_source(DictAPI({digest: data}))
    async with store:
        assert await store.get(digest) == data
        await store.wait_idle()
        assert store.stats["bad"].corrupt == 1
        assert store.stats["api"].hits == 1
    (tmp_path / "bad" / digest).unlink()
    async with Composite([DiskTier(str(tmp_path / "cache"))]) as cached:
        assert await cached.get(digest) == data  # the disk holds the good copy only


async def test_only_a_corrupt_copy_is_a_failure_not_a_success(tmp_path: Path) -> None:
    _, digest = make_blob(100)
    api = DictAPI({digest: b"not the bytes"})
    async with Composite([api]) as store:
        with pytest.raises(UpstreamFailed, match="hash to"):
            await store.get(digest)


async def test_concurrent_reads_make_one_origin_fetch(tmp_path: Path) -> None:
    data, digest = make_blob(200_000)
    api = DictAPI({digest: data}, delay=0.2)
    async with Composite([DiskTier(str(tmp_path / "cache")), api]) as store:
        results = await asyncio.gather(*(store.get(digest) for _ in range(30)))
        assert all(result == data for result in results)
        assert api.fetches == [digest]
        assert store.coalesced == 29


async def test_cache_write_failure_never_fails_the_read() -> None:
    data, digest = make_blob(100)
    broken = BrokenTier("cachebroken", role="cache")
    async with Composite([broken, DictAPI({digest: data})]) as store:
        assert await store.get(digest) == data
        await store.wait_idle()
        assert store.stats["cachebroken"].cache_write_errors == 1


async def test_failing_tier_gives_502_detail_and_opens_its_breaker() -> None:
    broken = BrokenTier()
    store = Composite([broken], breaker_threshold=3, breaker_cooldown=60)
    async with store:
        for _ in range(3):
            with pytest.raises(UpstreamFailed, match="broken: connection refused") as caught:
                await store.get(make_blob(10)[1])
            assert caught.value.headers["Retry-After"]
        assert store.breakers["broken"].state == "open"
        with pytest.raises(UpstreamFailed, match="circuit open"):
            await store.get(make_blob(10)[1])
        assert broken.calls == 3  # skipped while open


async def test_breaker_probes_after_cooldown_and_closes_on_success() -> None:
    data, digest = make_blob(100)
    api = DictAPI({digest: data})
    store = Composite([api], breaker_threshold=1, breaker_cooldown=0.05)
    async with store:
        store.breakers["api"].failed()
        assert store.breakers["api"].state == "open"
        await asyncio.sleep(0.06)
        assert await store.get(digest) == data
        assert str(store.breakers["api"].state) == "closed"  # str(): mypy still holds it "open"


async def test_negative_cache_remembers_and_an_upload_forgets(tmp_path: Path) -> None:
    data, digest = make_blob(100)
    api = DictAPI()
    async with Composite([FsTier(str(tmp_path / "blobs")), api], negative_cache=NegativeCache(ttl=60)) as store:
        for _ in range(2):
            with pytest.raises(NotFound):
                await store.get(digest)
        assert len(api.fetches) == 1
        spool = Spool(Digest(digest))
        await spool.write(data)
        await spool.finish()
        await store.put(digest, spool, [store.tier("fs")])
        assert await store.get(digest) == data


async def test_disk_tier_refuses_pickles_and_foreign_writable_dirs(tmp_path: Path) -> None:
    data, digest = make_blob(100)
    path = tmp_path / "cache"
    async with Composite([DiskTier(str(path))]):
        pass
    with diskcache.Cache(str(path)) as raw:  # someone writes a pickle into our database
        raw.set(digest, {"evil": pickle.dumps(object)})
    store = Composite([DiskTier(str(path)), DictAPI({digest: data})])
    async with store:
        assert await store.get(digest) == data  # the entry is a tier failure, not a value
        await store.wait_idle()
        assert store.stats["disk"].errors >= 1
        assert (await store.open(digest)).tier == "disk"  # the good copy replaced the entry
    os.chmod(path, 0o777)
    with pytest.raises(Exception, match="writable by others"):
        await Composite([DiskTier(str(path))]).start()


async def test_disk_min_free_evicts_to_keep_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, first_digest = make_blob(4 << 20)
    second, second_digest = make_blob(4 << 20)
    # A filesystem of its own whose free space only this cache uses up: the machine's real one
    # changes under the test as other processes write.
    total = 1 << 40
    disk = DiskTier(str(tmp_path / "cache"), min_free=total - (6 << 20), memory_limit=0)

    def usage(path: str) -> SimpleNamespace:
        # Blobs over 1 MiB arrive in a spool file, which takes its space before the commit links it.
        spooled = sum(file.stat().st_size for file in spool_files(tmp_path / "cache"))
        try:
            cached = disk.index.volume()
        except TierError:  # asked while starting, before the index is open
            cached = 0
        return SimpleNamespace(free=total - cached - spooled)

    monkeypatch.setattr("proxy.tiers.disk.eviction.shutil.disk_usage", usage)
    # Room for one blob above min_free, not two (2 MiB margins either way).
    async with Composite([disk, DictAPI({first_digest: first, second_digest: second})]) as store:
        await store.get(first_digest)
        await store.wait_idle()
        assert disk.describe()["entries"] == 1
        await store.get(second_digest)
        await store.wait_idle()
        assert disk.describe()["entries"] == 1  # the first was evicted to make room
        assert disk.evictions == 1
        assert (await store.open(second_digest)).tier == "disk"


async def test_disk_that_cannot_keep_min_free_does_not_cache_but_still_serves(tmp_path: Path) -> None:
    data, digest = make_blob(100_000)
    free = shutil.disk_usage(tmp_path).free
    disk = DiskTier(str(tmp_path / "cache"), min_free=free + (1 << 30), memory_limit=0)
    async with Composite([disk, DictAPI({digest: data})]) as store:
        assert await store.get(digest) == data
        await store.wait_idle()
        assert disk.describe()["entries"] == 0


async def test_fs_tier_layouts_and_encodings_round_trip(tmp_path: Path) -> None:
    data, digest = make_blob(70_000)
    for layout in ("flat", "sharded"):
        for encoding in ("identity", "gzip", "deflate"):
            folder = tmp_path / f"{layout}-{encoding}"
            target = folder / (f"{digest[:2]}/{digest}" if layout == "sharded" else digest)
            target.parent.mkdir(parents=True)
            target.write_bytes(encode_bytes(data, encoding))
            tier = FsTier(str(folder), layout=layout, encoding=encoding)
            async with Composite([tier]) as store:
                assert await store.get(digest) == data


async def test_truncated_encoded_copy_is_a_failure(tmp_path: Path) -> None:
    data, digest = make_blob(70_000)
    (tmp_path / digest).write_bytes(encode_bytes(data, "gzip")[:-20])
    async with Composite([FsTier(str(tmp_path), encoding="gzip")]) as store:
        with pytest.raises(UpstreamFailed):
            await store.get(digest)


def test_corrupt_blob_is_a_tier_error() -> None:
    assert issubclass(CorruptBlob, TierError)


async def test_disk_evicts_the_least_recently_used_with_batched_access_times(tmp_path: Path) -> None:
    blobs = [make_blob(100_000) for _ in range(3)]
    api = DictAPI(dict((digest, data) for data, digest in blobs))
    disk = DiskTier(str(tmp_path / "cache"), size_limit=260_000, memory_limit=0)
    (a, a_digest), (_, b_digest), (_, c_digest) = blobs
    async with Composite([disk, api]) as store:
        for digest in (a_digest, b_digest):
            await store.get(digest)
            await store.wait_idle()
            await asyncio.sleep(0.01)  # distinct store times
        assert await store.get(a_digest) == a  # a disk hit: a is now the more recently used
        await disk.flush_access_times()
        await store.get(c_digest)  # over the size limit: one entry must go
        await store.wait_idle()
        assert disk.describe()["entries"] == 2
        assert (await store.open(a_digest)).tier == "disk"
        assert (await store.open(c_digest)).tier == "disk"
        assert (await store.open(b_digest)).tier == "api"  # the least recently used was evicted


async def test_spools_share_a_memory_budget_and_spill_to_files_beyond_it(tmp_path: Path) -> None:
    budget = MemoryBudget(1 << 20)
    first_data, first_digest = make_blob(700_000)
    second_data, second_digest = make_blob(700_000)
    first = Spool(Digest(first_digest), str(tmp_path), memory_limit=8 << 20, budget=budget)
    second = Spool(Digest(second_digest), str(tmp_path), memory_limit=8 << 20, budget=budget)
    await first.write(first_data)
    await second.write(second_data)  # would pass the 1 MiB budget: goes to a file
    await first.finish()
    await second.finish()
    assert first.data == first_data and first.path is None
    assert second.data is None and second.path is not None and Path(second.path).read_bytes() == second_data
    assert budget.used == 700_000
    first.release()
    second.release()
    assert budget.used == 0 and not list(tmp_path.iterdir())
