"""A GET that follows a completed GET of the same blob is a hit, always (issue 12).

The cache commit of a miss ends before the client has the whole answer, so there is no window
in which a client that read one answer to its end asks again and misses. No sleeps: each pair
is two sequential requests through a real server, over fresh connections, on cold sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ProxyFactory, Upstream, make_blob

PAIRS = 12
# Verified before the first byte (< stream_threshold), streamed from a spool in memory, and
# streamed from a spool that spilled to a file (whose commit is a hard link).
SIZES = [1, 5000, 300_000, 3 << 20]


async def pairs_are_hits(port: int, blobs: list[tuple[bytes, str]]) -> list[str]:
    """GET each blob twice in a row; the X-Cache of every second answer that was not a HIT."""
    misses = []
    for data, digest in blobs:
        for attempt in ("first", "second"):
            # A new connection each time: nothing shared with the first answer but the cache.
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/sha1/{digest}") as response,
            ):
                assert response.status == 200
                assert await response.read() == data
                cache = response.headers["X-Cache"]
            if attempt == "first":
                assert cache == "MISS"
            elif cache != "HIT":
                misses.append(f"{len(data)} bytes: {cache}")
    return misses


def sources(kind: str, tmp_path: Path, upstream: Upstream) -> dict[str, Any]:
    if kind == "fs":
        return {"name": "origin", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")}
    return {"name": "origin", "kind": "http", "role": "source", "url": upstream.url}


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp-only"])
@pytest.mark.parametrize("kind", ["fs", "http"])
async def test_second_sequential_get_is_a_hit(
    make_proxy: ProxyFactory, upstream: Any, tmp_path: Path, kind: str, fast_path: bool
) -> None:
    origin: Upstream = await upstream()
    (tmp_path / "blobs").mkdir()
    blobs = [make_blob(size) for _ in range(PAIRS // len(SIZES)) for size in SIZES]
    for data, digest in blobs:
        (tmp_path / "blobs" / digest).write_bytes(data)
        origin.blobs[digest] = data
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        sources(kind, tmp_path, origin),
    ]
    # A small memory budget for spools, so the largest blobs spill to a file as they arrive.
    client = await make_proxy(tiers, server={"fast_path": fast_path, "stream_threshold": 65536})
    assert client.port is not None
    assert await pairs_are_hits(client.port, blobs) == []


async def test_a_failed_cache_write_does_not_fail_the_request(
    make_proxy: ProxyFactory, tmp_path: Path, upstream: Any
) -> None:
    """The answer waits for the first cache's commit, but a commit that fails releases it."""
    origin: Upstream = await upstream()
    blobs = [make_blob(size) for size in (5000, 300_000)]  # verified first, and streamed
    origin.blobs.update((digest, data) for data, digest in blobs)
    cache = tmp_path / "cache"
    client = await make_proxy(
        [
            {"name": "cache", "kind": "fs", "role": "cache", "path": str(cache)},
            {"name": "origin", "kind": "http", "role": "source", "url": origin.url},
        ],
        server={"stream_threshold": 65536},
    )
    cache.rmdir()
    cache.write_bytes(b"a file where the cache's folder was: every write into it fails")
    for data, digest in blobs:
        for _ in range(2):
            response = await client.get(f"/sha1/{digest}")
            assert response.status == 200 and await response.read() == data
            assert response.headers["X-Cache"] == "MISS"
    assert len(origin.requests) == 4
