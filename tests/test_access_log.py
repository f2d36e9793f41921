"""The access log of a real ``casproxy serve``: lines are batched off the loop (accesslog.AccessLog)
but each is the line a logging call would have written, for fast-path hits and aiohttp's answers
alike, text and JSON; and when the process stops, no line is lost."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import aiohttp
import pytest

from proxy.server.accesslog import AccessLog, AccessLogger, JsonAccessLogger
from tests.conftest import free_port, make_blob, write_config
from tests.processes import ProxyProcess, wait_until

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_every_request_has_its_line_on_both_paths(tmp_path: Path, log_format: str) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "config.toml",
        [{"name": "disk", "kind": "disk", "path": str(tmp_path / "cache")}],
        server={"host": "127.0.0.1", "port": port, "log_format": log_format},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    data, digest = make_blob(1000)
    hits = 300  # answered by the fast path (the blob is in memory once stored)
    try:
        async with aiohttp.ClientSession(headers={"User-Agent": 'probe "1"'}) as session:
            await proxy.wait_healthy(session, 60)
            async with session.put(f"{proxy.url}/sha1/{digest}", data=data) as stored:
                assert stored.status == 201
            ids = []
            for _ in range(hits):
                async with session.get(f"{proxy.url}/sha1/{digest}") as hit:
                    assert hit.status == 200
                    ids.append(hit.headers["X-Request-Id"])
            async with session.get(f"{proxy.url}/sha1/{make_blob(7)[1]}") as missing:
                assert missing.status == 404
            # a batch is written within FLUSH_SECONDS: the log shows every line without a stop
            await wait_until(lambda: proxy.log.read_text().count(ids[-1]) == 1, 10, "the last hit's line")
    finally:
        proxy.stop()  # a clean stop writes what is still batched
    lines = [line for line in proxy.log.read_text().splitlines() if "casproxy.access" in line]
    assert len(lines) == 1 + hits + 1 + 1, "\n".join(lines)  # healthz, PUT, hits, 404
    assert len(set(ids)) == hits
    if log_format == "text":
        head = rf"{TIME} INFO casproxy\.access: 127\.0\.0\.1"
        pattern = re.compile(rf'{head} GET /sha1/{digest} 200 \d+ [\d.]+ms \w+ disk (\S+) "probe \\"1\\""')
        logged = [match.group(1) for line in lines if (match := pattern.fullmatch(line))]
        assert logged == ids
        assert re.fullmatch(rf"{TIME} INFO casproxy\.access: 127\.0\.0\.1 GET /sha1/\w+ 404 .*", lines[-1])
    else:
        records = [json.loads(line) for line in lines]
        assert all(re.fullmatch(TIME, r["time"]) and r["level"] == "INFO" and r["pid"] for r in records)
        got = [r for r in records if r["method"] == "GET" and r["status"] == 200 and r["path"] == f"/sha1/{digest}"]
        assert [r["id"] for r in got] == ids
        assert {r["user_agent"] for r in got} == {'probe "1"'} and {r["tier"] for r in got} == {"disk"}
        assert records[-1]["status"] == 404


def test_every_connection_writes_into_the_one_access_log_of_its_logger() -> None:
    """aiohttp makes an access logger per connection: they must share one batch (and one exit
    flush), not add a buffer, a timer and an atexit hook per connection."""
    logger = logging.getLogger("test.access.shared")
    first, second = AccessLogger(logger, ""), AccessLogger(logger, "")
    assert first.lines is second.lines is AccessLog.of(logger, json_format=False)
    assert JsonAccessLogger(logger, "").lines is not first.lines  # another format, another log
