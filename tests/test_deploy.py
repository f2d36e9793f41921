"""What deploy/ ships for operators: the Prometheus alert rules (promtool checks and unit-tests
them), the Grafana dashboard (every query parses as PromQL and names only series a live casproxy
exposes), and the systemd unit (systemd-analyze verifies it and rates its hardening).

promtool comes with Debian's ``prometheus`` package and systemd-analyze with systemd;
scripts/test installs the first where it may. A test whose tool is missing is skipped, saying so.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Upstream, free_port, make_blob, write_config
from tests.processes import ProxyProcess

UpstreamFactory = Callable[..., Awaitable[Upstream]]

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "casproxy.json"
UNIT = ROOT / "deploy" / "systemd" / "casproxy.service"
SERIES = re.compile(r"\bcasproxy_[a-z0-9_]+\b")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/test installs promtool from Debian's 'prometheus')")
    return found


def dashboard_queries() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [
        variable["query"]["query"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"
    ]
    return queries


def alert_queries() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


# -- Prometheus and Grafana --------------------------------------------------------------------


def test_alert_rules_load_in_promtool_and_fire_when_they_should() -> None:
    promtool = tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    # The unit tests feed series for a healthy and a failing instance: each alert fires for the
    # failing one only, with its annotations rendered.
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yaml"], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}
    tests = (ALERTS.parent / "alerts.test.yaml").read_text()
    assert {name for name in names if f"alertname: {name}\n" in tests} == names, "every alert has a test"


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Grafana has no offline validator; promtool parses each query as a recording rule, with
    Grafana's variables given values."""
    promtool = tool("promtool")
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "casproxy" and len({panel["id"] for panel in dashboard["panels"]}) == len(
        dashboard["panels"]
    )
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": query.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for i, query in enumerate(dashboard_queries())
        if not query.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


async def test_every_series_the_dashboard_and_alerts_query_is_exposed(
    tmp_path: Path, upstream: UpstreamFactory
) -> None:
    """A fresh `casproxy serve` (its own registry: nothing left from other tests) after traffic
    of every kind: uploads, hits, fills, coalesced waits, misses, evictions and a tier failing
    until its breaker opens. Every casproxy_* name the dashboard or the alerts use is in /metrics."""
    gate = asyncio.Event()

    async def slow(request: web.Request, up: Upstream) -> web.StreamResponse:
        await gate.wait()  # held until several requests wait for the same fill
        data = up.blobs.get(request.match_info["hash"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data)

    async def broken(request: web.Request, up: Upstream) -> web.StreamResponse:
        raise web.HTTPInternalServerError()

    origin, flaky = await upstream(slow), await upstream(broken)
    cold, cold_digest = make_blob(200_000)
    origin.blobs[cold_digest] = cold
    port = free_port()
    config = write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache"), "size_limit": "1 MiB"},
            {"name": "origin", "kind": "http", "url": origin.url, "timeout": "120s"},  # held by the gate
            {"name": "flaky", "kind": "http", "url": flaky.url},
        ],
        server={"host": "127.0.0.1", "port": port},
        uploads={"targets": ["disk"]},
    )
    proxy = ProxyProcess(config, port, tmp_path / "proxy.log")
    proxy.start()
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_healthy(session, 60)
            for seed in range(12):  # 3.6 MB into a 1 MiB cache: evictions
                data, digest = make_blob(300_000, seed=seed)
                async with session.put(f"{proxy.url}/sha1/{digest}", data=data) as stored:
                    assert stored.status == 201
                async with session.get(f"{proxy.url}/sha1/{digest}") as hit:
                    assert hit.status == 200
            cold_reads = [asyncio.ensure_future(session.get(f"{proxy.url}/sha1/{cold_digest}")) for _ in range(4)]
            deadline = time.monotonic() + 30
            while "casproxy_coalesced_waits_total{" not in await scrape(session, proxy.url):
                assert time.monotonic() < deadline, "no request joined the fill held at the origin"
                await asyncio.sleep(0.05)
            gate.set()
            for response in await asyncio.gather(*cold_reads):
                assert response.status == 200
                response.release()
            for seed in range(6):  # absent: origin 404, flaky 500 until its breaker opens
                async with session.get(f"{proxy.url}/sha1/{make_blob(10, seed=500 + seed)[1]}") as absent:
                    assert absent.status in (404, 502)
            text = await scrape(session, proxy.url)
    finally:
        proxy.stop()
    exposed = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    wanted = {name for query in dashboard_queries() + alert_queries() for name in SERIES.findall(query)}
    assert len(wanted) >= 14
    assert sorted(wanted - exposed) == []


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as scraped:
        assert scraped.status == 200
        return await scraped.text()


# -- systemd -----------------------------------------------------------------------------------


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart naming this checkout's casproxy (verify checks it is executable)."""
    casproxy = Path(shutil.which("casproxy") or ROOT / ".venv" / "bin" / "casproxy")
    assert casproxy.exists(), casproxy
    path = tmp_path / "casproxy.service"
    path.write_text(UNIT.read_text().replace("/opt/casproxy/bin/casproxy", str(casproxy)))
    return path


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 for unknown keys too, with a warning naming the file: no output is allowed.
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, ""), verified.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(unit)], capture_output=True, text=True, timeout=60
    )
    exposure = re.search(r"Overall exposure level for casproxy\.service: ([\d.]+)", security.stdout)
    assert exposure, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.0, security.stdout  # systemd's own scale: 0 best, 10 worst
    text = UNIT.read_text()
    for setting in ("DynamicUser=yes", "StateDirectory=casproxy", "CacheDirectory=casproxy", "ProtectSystem=strict"):
        assert f"\n{setting}\n" in text, setting


def test_systemd_verify_reports_a_mistyped_key(tmp_path: Path) -> None:
    """The check above can fail: the same invocation speaks up about a key systemd does not know."""
    analyze = tool("systemd-analyze")
    unit = unit_for_this_machine(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ProtectSystm'" in verified.stderr
