"""Cold reads from S3 (moto): what a miss through casproxy costs over reading the bucket
directly with boto3, and whether concurrent cold reads of one blob share one upstream fetch."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import botocore.config
import requests
from harness import (
    PROCESSES,
    KiB,
    MiB,
    Server,
    child_env,
    disk_tier,
    free_port,
    log,
    proxy_stats,
    sha1_hex,
    wait_until_ok,
)

BUCKET = "casproxy-bench"
MISS_SIZES: dict[str, int] = {"4KiB": 4 * KiB, "8MiB": 8 * MiB}
COALESCE_SIZE = 8 * MiB


@contextmanager
def moto_server(workdir: Path, mode: str) -> Iterator[str]:
    """moto's S3 on loopback; yields its endpoint URL. "process" (the default) keeps moto's
    GIL away from the bench's client side; "thread" runs it inside this process."""
    os.environ.update(child_env())  # boto3 here and in the proxy: dummy credentials
    if mode == "thread":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
        return
    port = free_port()
    log_path = workdir / "moto.log"
    proc = PROCESSES.spawn(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log_path, env=child_env()
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ok(f"{url}/moto-api/", proc, log_path)
        yield url
    finally:
        PROCESSES.stop(proc)


def s3_client(endpoint: str) -> Any:
    """A boto3 client configured like casproxy's S3 tier, so the direct path is comparable."""
    config = botocore.config.Config(
        max_pool_connections=32,
        retries={"max_attempts": 3, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"addressing_style": "path"},
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


def upload(client: Any, size: int, count: int) -> list[str]:
    hashes = []
    for _ in range(count):
        data = os.urandom(size)
        digest = sha1_hex(data)
        client.put_object(Bucket=BUCKET, Key=digest, Body=data)
        hashes.append(digest)
    return hashes


def s3_tier(endpoint: str) -> dict[str, Any]:
    return {
        "name": "s3",
        "kind": "s3",
        "role": "source",
        "url": f"s3://{BUCKET}/",
        "endpoint_url": endpoint,
        "region": "us-east-1",
    }


def s3_proxy_tiers(workdir: Path, endpoint: str, name: str) -> list[dict[str, Any]]:
    return [disk_tier(workdir / f"{name}-cache"), s3_tier(endpoint)]


# -- miss overhead -----------------------------------------------------------------------


@dataclass
class MissResult:
    size: str
    proxy_s: list[float]
    direct_s: list[float]

    @property
    def ratio_total(self) -> float:
        return sum(self.proxy_s) / sum(self.direct_s)

    @property
    def ratio_median(self) -> float:
        return statistics.median(self.proxy_s) / statistics.median(self.direct_s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "count": len(self.proxy_s),
            "proxy_total_s": sum(self.proxy_s),
            "direct_total_s": sum(self.direct_s),
            "proxy_median_ms": statistics.median(self.proxy_s) * 1e3,
            "direct_median_ms": statistics.median(self.direct_s) * 1e3,
            "ratio_total": self.ratio_total,
            "ratio_median": self.ratio_median,
            "proxy_s": self.proxy_s,
            "direct_s": self.direct_s,
        }


def _timed(fetch: Callable[[], bytes]) -> tuple[float, bytes]:
    start = time.perf_counter()
    body = fetch()
    return time.perf_counter() - start, body


def _proxy_fetch(session: requests.Session, proxy: Server, digest: str) -> Callable[[], bytes]:
    def fetch() -> bytes:
        # stream + raw.read(): one read of the whole body, as botocore's Body.read() does;
        # requests' .content would iterate in 10 KiB pieces and tax the proxy side only.
        with session.get(f"{proxy.url}/sha1/{digest}", stream=True, timeout=60) as response:
            if response.status_code != 200 or response.headers.get("X-Cache") != "MISS":
                raise RuntimeError(f"{digest}: {response.status_code} X-Cache={response.headers.get('X-Cache')}")
            body: bytes = response.raw.read()
            return body

    return fetch


def _direct_fetch(client: Any, digest: str) -> Callable[[], bytes]:
    def fetch() -> bytes:
        body: bytes = client.get_object(Bucket=BUCKET, Key=digest)["Body"].read()
        return body

    return fetch


def measure_misses(proxy: Server, client: Any, label: str, hashes: Sequence[str]) -> MissResult:
    """Each blob once through the cold proxy and once directly, alternating which goes first
    so neither side always meets a warmer moto. Bodies are checked after the clock stops."""
    result = MissResult(label, [], [])
    with requests.Session() as session:
        # One throwaway request each, so neither side pays for its connection setup.
        session.get(f"{proxy.url}/healthz", timeout=10).raise_for_status()
        client.list_objects_v2(Bucket=BUCKET, MaxKeys=1)
        for index, digest in enumerate(hashes):
            fetches = [("proxy", _proxy_fetch(session, proxy, digest)), ("direct", _direct_fetch(client, digest))]
            if index % 2:
                fetches.reverse()
            for side, fetch in fetches:
                seconds, body = _timed(fetch)
                if sha1_hex(body) != digest:
                    raise RuntimeError(f"{side} read of {digest} returned wrong bytes")
                (result.proxy_s if side == "proxy" else result.direct_s).append(seconds)
    log(
        f"  miss {label:>5}: proxy median {statistics.median(result.proxy_s) * 1e3:7.1f} ms, "
        f"direct median {statistics.median(result.direct_s) * 1e3:7.1f} ms, total ratio {result.ratio_total:.2f}x"
    )
    return result


# -- coalescing --------------------------------------------------------------------------


@dataclass
class CoalesceResult:
    clients: int
    upstream_fetches: int
    coalesced: int
    hits_after_fill: int
    wall_concurrent_s: float
    wall_single_s: float
    wall_concurrent_hits_s: float
    bodies_ok: int

    @property
    def ratio(self) -> float:
        return self.wall_concurrent_s / self.wall_single_s

    def as_dict(self) -> dict[str, Any]:
        return {**vars(self), "ratio": self.ratio}


async def _get_and_hash(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    """Stream one body through sha1 (never held whole); (digest, X-Cache)."""
    hasher = hashlib.sha1()
    async with session.get(url) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_chunked(MiB):
            hasher.update(chunk)
        return hasher.hexdigest(), response.headers.get("X-Cache", "")


async def _concurrent_gets(url: str, clients: int) -> tuple[float, list[tuple[str, str]]]:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        answers = await asyncio.gather(*(_get_and_hash(session, url) for _ in range(clients)))
        return time.perf_counter() - start, answers


def _upstream_fetches(stats: dict[str, Any]) -> int:
    s3 = stats["tiers"]["s3"]
    return int(s3["hits"]) + int(s3["errors"]) + int(s3["corrupt"])


def measure_coalescing(proxy: Server, hashes: tuple[str, str], clients: int) -> CoalesceResult:
    """One cold GET of blob A (the baseline), then ``clients`` concurrent cold GETs of blob B,
    then the same again for B now cached (what serving the bytes alone costs)."""
    single, many = hashes
    single_s, answers = asyncio.run(_concurrent_gets(f"{proxy.url}/sha1/{single}", 1))
    if answers[0][0] != single:
        raise RuntimeError(f"single cold GET of {single} returned wrong bytes")
    before = proxy_stats(proxy)
    concurrent_s, answers = asyncio.run(_concurrent_gets(f"{proxy.url}/sha1/{many}", clients))
    after = proxy_stats(proxy)
    bodies_ok = sum(digest == many for digest, _ in answers)
    hits_s, hit_answers = asyncio.run(_concurrent_gets(f"{proxy.url}/sha1/{many}", clients))
    if bodies_ok != clients or any(digest != many for digest, _ in hit_answers):
        raise RuntimeError(f"{clients - bodies_ok} of {clients} concurrent bodies had wrong bytes")
    result = CoalesceResult(
        clients=clients,
        upstream_fetches=_upstream_fetches(after) - _upstream_fetches(before),
        coalesced=int(after["coalesced"]) - int(before["coalesced"]),
        hits_after_fill=sum(cache == "HIT" for _, cache in answers),
        wall_concurrent_s=concurrent_s,
        wall_single_s=single_s,
        wall_concurrent_hits_s=hits_s,
        bodies_ok=bodies_ok,
    )
    log(
        f"  coalesce: {clients} cold GETs -> {result.upstream_fetches} upstream fetch(es), "
        f"{result.coalesced} coalesced, {result.hits_after_fill} served as HIT; wall {concurrent_s * 1e3:.0f} ms "
        f"vs one cold GET {single_s * 1e3:.0f} ms ({result.ratio:.2f}x); {clients} hot GETs {hits_s * 1e3:.0f} ms"
    )
    return result
