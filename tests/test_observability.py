"""/metrics: Prometheus text that prometheus-client's own parser reads, with series that move
as requests are made (counters are process-wide, so tests compare before and after); the
access log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.config import Config, load_config
from proxy.server.accesslog import AccessLogger, JsonAccessLogger, JsonFormatter, queued
from proxy.server.app import create_app
from proxy.server.keys import STORE
from tests.conftest import ProxyFactory, Upstream, free_port, make_blob, write_config
from tests.processes import ProxyProcess

UpstreamFactory = Callable[..., Awaitable[Upstream]]
Client = TestClient[web.Request, web.Application]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(proxy: Client) -> Samples:
    response = await proxy.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def slow_origin(request: web.Request, up: Upstream) -> web.StreamResponse:
    await asyncio.sleep(0.2)  # long enough for concurrent requests to find the fill in flight
    data = up.blobs.get(request.match_info["hash"])
    if data is None:
        raise web.HTTPNotFound()
    return web.Response(body=data)


async def test_metrics_parse_and_move_with_requests(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    up = await upstream(slow_origin)
    data, digest = make_blob(100_000)
    up.blobs[digest] = data
    proxy = await make_proxy(
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
            {"name": "origin", "kind": "http", "url": up.url},
        ]
    )
    before = await scrape(proxy)

    responses = await asyncio.gather(*(proxy.get(f"/sha1/{digest}") for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    await proxy.app[STORE].wait_idle()  # the copy is in the disk cache
    assert (await proxy.get(f"/sha1/{digest}")).status == 200  # a hit now
    absent = make_blob(10)[1]
    assert (await proxy.get(f"/sha1/{absent}")).status == 404
    assert (await proxy.get(f"/sha1/{absent}")).status == 404  # remembered
    assert (await proxy.get("/sha1/not-a-digest")).status == 400
    after = await scrape(proxy)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/sha1/{hash}"
    assert moved("casproxy_http_requests_total", route=route, method="GET", status="200") == 6
    assert moved("casproxy_http_requests_total", route=route, method="GET", status="404") == 2
    assert moved("casproxy_http_requests_total", route=route, method="GET", status="400") == 1
    assert moved("casproxy_http_request_duration_seconds_count", route=route, method="GET") == 9
    assert moved("casproxy_tier_lookups_total", tier="origin", result="hit") == 1  # one fetch for 5 GETs
    assert moved("casproxy_tier_lookups_total", tier="origin", result="miss") == 1  # the absent one
    assert moved("casproxy_tier_lookups_total", tier="disk", result="hit") == 1
    assert moved("casproxy_tier_bytes_total", tier="origin") == len(data)
    assert moved("casproxy_coalesced_waits_total", scope="process") == 4
    assert moved("casproxy_negative_cache_hits_total") == 1
    assert moved("casproxy_cache_writes_total", tier="disk", result="ok") == 1
    assert value(after, "casproxy_disk_cache_entries", tier="disk") == 1
    assert value(after, "casproxy_disk_cache_bytes", tier="disk") >= len(data)  # + the SQLite file
    assert value(after, "casproxy_upload_queue_depth") == 0


async def test_breaker_state_is_a_series(make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path) -> None:
    async def broken(request: web.Request, up: Upstream) -> web.StreamResponse:
        raise web.HTTPInternalServerError()

    up = await upstream(broken)
    proxy = await make_proxy([{"name": "flaky", "kind": "http", "url": up.url}])
    for seed in range(5):  # the default threshold
        assert (await proxy.get(f"/sha1/{make_blob(10, seed=1000 + seed)[1]}")).status == 502
    samples = await scrape(proxy)
    assert value(samples, "casproxy_breaker_open", tier="flaky") == 1
    assert value(samples, "casproxy_tier_lookups_total", tier="flaky", result="error") >= 5


async def test_json_access_log_has_one_line_per_request_and_no_secrets(tmp_path: Path) -> None:
    token, signature = "upload-token-never-logged", "signature-never-logged"
    config = load_config(
        str(write_config(tmp_path / "config.toml", [{"name": "disk", "kind": "disk", "path": str(tmp_path / "c")}])),
        environ={},
        overrides={"server": {"log_format": "json"}, "auth": {"upload_tokens": [token]}},
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("test.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    server = TestServer(create_app(config))
    await server.start_server(access_log_class=JsonAccessLogger, access_log=access)
    try:
        async with TestClient(server) as client:
            data, digest = make_blob(1000)
            put = await client.put(f"/sha1/{digest}", data=data, headers={"Authorization": f"Bearer {token}"})
            assert put.status == 201
            # not sig/expires: those are checked now (SPEC 5.2), and a bad ticket is a 403
            got = await client.get(f"/sha1/{digest}?signature={signature}")
            assert got.status == 200
    finally:
        access.removeHandler(handler)
    text = stream.getvalue()
    assert token not in text and signature not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("PUT", f"/sha1/{digest}", 201),
        ("GET", f"/sha1/{digest}", 200),
    ]
    assert lines[1]["tier"] == "disk" and lines[1]["bytes"] >= 1000 and lines[1]["pid"] > 0


def test_queued_log_lines_are_written_by_a_thread_with_their_message_bound_at_the_call() -> None:
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(JsonFormatter())
    writers: list[str] = []

    def note_writer(record: logging.LogRecord) -> bool:
        writers.append(threading.current_thread().name)
        return True

    target.addFilter(note_writer)
    handler = queued(target)
    logger = logging.getLogger("test.queued")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        tiers = ["disk"]
        logger.warning("tiers %s", tiers)
        tiers.append("later")  # after the call: the line must not show it
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    deadline = time.monotonic() + 10
    while stream.getvalue().count("\n") < 2:
        assert time.monotonic() < deadline, stream.getvalue()
        time.sleep(0.01)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "tiers ['disk']"
    assert second["message"] == "failed" and "ValueError: boom" in second["exception"]
    assert threading.current_thread().name not in writers


async def test_build_info_names_the_version_and_no_created_series(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy = await make_proxy([{"name": "disk", "kind": "disk", "path": str(tmp_path / "cache")}])
    assert (await proxy.get(f"/sha1/{make_blob(10)[1]}")).status == 404
    samples = await scrape(proxy)
    info = [dict(labels) for name, labels in samples if name == "casproxy_build_info"]
    assert info == [{"version": __version__, "python": platform.python_version()}]
    assert value(samples, "casproxy_build_info", version=__version__, python=platform.python_version()) == 1
    assert samples and not [name for name, _ in samples if name.endswith("_created")]


def access_log_of(config: Config) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger(f"test.access.{id(stream)}")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    return access, stream


async def test_json_access_log_has_time_request_id_user_agent_and_the_bytes_sendfile_sent(tmp_path: Path) -> None:
    config = load_config(
        str(write_config(tmp_path / "config.toml", [{"name": "disk", "kind": "disk", "path": str(tmp_path / "c")}])),
        environ={},
        overrides={"server": {"log_format": "json"}},
    )
    access, stream = access_log_of(config)
    size = 8 << 20
    big, big_digest = make_blob(size)  # well above the disk tier's file threshold: a sendfile hit
    server = TestServer(create_app(config))
    await server.start_server(access_log_class=JsonAccessLogger, access_log=access)
    try:
        async with TestClient(server) as client:
            assert (await client.put(f"/sha1/{big_digest}", data=big)).status == 201
            hit = await client.get(f"/sha1/{big_digest}", headers={"User-Agent": 'probe/1.0 "quoted"\tx'})
            assert (hit.status, len(await hit.read())) == (200, size)
            given = await client.get(f"/sha1/{make_blob(5)[1]}", headers={"X-Request-Id": "lb-4f2a.9"})
            assert (given.status, given.headers["X-Request-Id"]) == (404, "lb-4f2a.9")
            odd = await client.get("/sha1/not-a-digest", headers={"X-Request-Id": "two words\tand a tab"})
            assert odd.status == 400 and re.fullmatch(r"[0-9a-f]{16}", odd.headers["X-Request-Id"])
    finally:
        await server.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["method"], line["status"]) for line in lines] == [
        ("PUT", 201),
        ("GET", 200),
        ("GET", 404),
        ("GET", 400),
    ]
    put, sent, named, refused = lines
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line["time"]
        assert line["ms"] >= 0
    assert sent["id"] == hit.headers["X-Request-Id"] != put["id"]
    assert (named["id"], refused["id"]) == ("lb-4f2a.9", odd.headers["X-Request-Id"])
    assert sent["user_agent"] == 'probe/1.0 "quoted"\tx'  # JSON escapes what needs it
    assert sent["tier"] == "disk"
    assert size < sent["bytes"] < size + 2000  # the body sendfile sent, and the headers


async def test_text_access_line_ends_with_the_request_id_and_quoted_user_agent(tmp_path: Path) -> None:
    config = load_config(
        str(write_config(tmp_path / "config.toml", [{"name": "disk", "kind": "disk", "path": str(tmp_path / "c")}])),
        environ={},
    )
    access, stream = access_log_of(config)
    access.handlers[0].setFormatter(logging.Formatter("%(message)s"))
    server = TestServer(create_app(config))
    await server.start_server(access_log_class=AccessLogger, access_log=access)
    try:
        async with TestClient(server) as client:
            answer = await client.get("/healthz", headers={"User-Agent": "kube-probe/1.29 x"})
            assert answer.status == 200
    finally:
        await server.close()
    fields = stream.getvalue().strip().split(" ")
    assert fields[1:4] == ["GET", "/healthz", "200"]
    assert fields[-3:] == [answer.headers["X-Request-Id"], '"kube-probe/1.29', 'x"']


async def test_metrics_port_serves_only_the_operational_routes(tmp_path: Path) -> None:
    """A real `casproxy serve` bound to loopback with metrics_port: Prometheus and probes reach
    /metrics, /healthz and /readyz there; blobs are not served on it."""
    port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path / "config.toml",
        [{"name": "disk", "kind": "disk", "path": str(tmp_path / "cache")}],
        server={"host": "127.0.0.1", "port": port, "metrics_port": metrics_port, "metrics_host": "127.0.0.1"},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_healthy(session, 60)
            data, digest = make_blob(1000)
            async with session.put(f"{proxy.url}/sha1/{digest}", data=data) as stored:
                assert stored.status == 201
            side = f"http://127.0.0.1:{metrics_port}"
            async with session.get(f"{side}/metrics") as scraped:
                assert scraped.status == 200
                text = await scraped.text()
            names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
            assert {"casproxy_build_info", "casproxy_uploads_total", "casproxy_disk_cache_bytes"} <= names
            for route in ("/healthz", "/readyz"):
                async with session.get(f"{side}{route}") as answer:
                    assert answer.status == 200, route
            async with session.get(f"{side}/sha1/{digest}") as blob:
                assert blob.status == 404
        assert f"also on http://127.0.0.1:{metrics_port}" in proxy.log.read_text()
    finally:
        proxy.stop()


def test_a_taken_metrics_port_is_one_line_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(
            tmp_path / "config.toml",
            [{"name": "disk", "kind": "disk", "path": str(tmp_path / "cache")}],
            server={"port": free_port(), "metrics_port": taken.getsockname()[1], "metrics_host": "127.0.0.1"},
        )
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "-c", str(config)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert "server.metrics_host/metrics_port: cannot bind" in done.stderr
    assert "Traceback" not in done.stderr
