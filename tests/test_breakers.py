"""Circuit breakers end to end: a sick tier (hanging, or answering 500) in front of a good one,
over HTTP. After ``breaker.threshold`` failures the sick tier is skipped, /readyz and /stats
say so, one probe goes out after ``breaker.cooldown``, and a recovered tier serves again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.service import build_store
from proxy.store import breaker as breaker_module
from proxy.store.breaker import Breaker
from tests.conftest import ProxyFactory, Upstream, make_blob, write_config

Client = TestClient[web.Request, web.Application]
UpstreamFactory = Callable[..., Awaitable[Upstream]]

THRESHOLD = 3
COOLDOWN = 1.0
TIMEOUT = 0.3  # the sick tier's timeout: what every request would pay without the breaker


class Sick:
    """An upstream that hangs or answers 500 until told to recover, then serves its blobs."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.release = asyncio.Event()

    async def __call__(self, request: web.Request, up: Upstream) -> web.StreamResponse:
        if self.mode == "hang":
            await self.release.wait()
        elif self.mode == "500":
            return web.Response(status=500, text="boom")
        elif self.mode == "corrupt" and request.match_info["hash"] in up.blobs:
            return web.Response(body=b"not the bytes you named " + up.blobs[request.match_info["hash"]])
        data = up.blobs.get(request.match_info["hash"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data)


async def setup(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path, mode: str, role: str = "source"
) -> tuple[Client, Sick, Upstream, Upstream]:
    sick = Sick(mode)
    sick_up = await upstream(sick)
    good = await upstream()
    tiers = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "sick", "kind": "http", "url": sick_up.url, "timeout": TIMEOUT, "role": role},
        {"name": "good", "kind": "http", "url": good.url},
    ]
    breaker = {"threshold": THRESHOLD, "cooldown": f"{COOLDOWN}s"}
    client = await make_proxy(tiers, breaker=breaker, uploads={"targets": ["disk"]})
    return client, sick, sick_up, good


def new_blob(*ups: Upstream) -> str:
    data, digest = make_blob(4000)
    for up in ups:
        up.blobs[digest] = data
    return digest


async def get(client: Client, digest: str) -> tuple[int, str, float]:
    """Status, the tier that served, and how long it took."""
    began = time.monotonic()
    async with client.get(f"/sha1/{digest}") as response:
        await response.read()
        return response.status, response.headers.get("X-Cache-Tier", ""), time.monotonic() - began


async def tier_state(client: Client, route: str) -> dict[str, Any]:
    body = await (await client.get(route)).json()
    state: dict[str, Any] = body["tiers"]["sick"]
    return state


async def wait_for_half_open(client: Client) -> None:
    deadline = time.monotonic() + 10 * COOLDOWN
    while (await tier_state(client, "/readyz"))["breaker"] != "half-open":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ["hang", "500"])
async def test_a_sick_tier_is_skipped_probed_once_and_trusted_again_when_it_recovers(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path, mode: str
) -> None:
    client, sick, sick_up, good = await setup(make_proxy, upstream, tmp_path, mode)
    try:
        # Closed: every request asks the sick tier first, and pays for it when it hangs.
        for asked in range(1, THRESHOLD + 1):
            status, tier, took = await get(client, new_blob(good))
            assert (status, tier) == (200, "good")
            assert len(sick_up.requests) == asked
            if mode == "hang":
                assert took >= TIMEOUT * 0.9
        stats = await tier_state(client, "/stats")
        assert (stats["breaker"], stats["errors"]) == ("open", THRESHOLD)
        readyz = await client.get("/readyz")
        assert readyz.status == 200  # a source's breaker does not take the instance out of rotation
        ready_state = (await readyz.json())["tiers"]["sick"]
        assert ready_state["breaker"] == "open"
        assert 0 < ready_state["retry_in"] <= COOLDOWN
        assert ready_state["failures"] == THRESHOLD

        # Open: skipped, so requests cost the good tier's time, not the sick tier's timeout.
        began = time.monotonic()
        for _ in range(5):
            assert (await get(client, new_blob(good)))[:2] == (200, "good")
        assert time.monotonic() - began < 5 * TIMEOUT * 0.6  # coarse: would be at least 5 x 0.3 s if asked
        assert len(sick_up.requests) == THRESHOLD

        # Half-open: of many concurrent requests, exactly one probes the still-sick tier.
        await wait_for_half_open(client)
        answers = await asyncio.gather(*(get(client, new_blob(good)) for _ in range(10)))
        assert all(answer[:2] == (200, "good") for answer in answers)
        assert len(sick_up.requests) == THRESHOLD + 1
        assert (await tier_state(client, "/stats"))["breaker"] == "open"  # the probe failed: open again

        # Recovered: the next probe succeeds, the breaker closes, the tier serves again.
        sick.mode = "ok"
        await wait_for_half_open(client)
        status, tier, _ = await get(client, new_blob(sick_up, good))
        assert (status, tier) == (200, "sick")
        assert len(sick_up.requests) == THRESHOLD + 2
        assert (await tier_state(client, "/stats"))["breaker"] == "closed"
        assert (await tier_state(client, "/readyz"))["breaker"] == "closed"
        status, tier, _ = await get(client, new_blob(sick_up, good))
        assert (status, tier) == (200, "sick")
        assert len(sick_up.requests) == THRESHOLD + 3
    finally:
        sick.release.set()


async def test_an_open_breaker_with_nothing_else_to_ask_is_502_naming_it(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    client, _, sick_up, good = await setup(make_proxy, upstream, tmp_path, "500")
    for _ in range(THRESHOLD):
        assert (await get(client, new_blob(good)))[0] == 200
    response = await client.get(f"/sha1/{make_blob(10)[1]}")  # nowhere; the sick tier was not asked
    assert response.status == 502  # not 404: a skipped tier might have had it
    problem = await response.json(content_type=None)
    assert "sick: skipped (circuit open" in problem["detail"]
    assert len(sick_up.requests) == THRESHOLD


async def test_readyz_is_503_while_a_cache_tiers_breaker_is_open(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    # A shared cache in front of the source, e.g. a team's casproxy: when it is broken this
    # instance serves slowly, so it leaves rotation; once the cool-down is over it comes back
    # (half-open), or it would never get the request that probes the cache again.
    client, _, _, good = await setup(make_proxy, upstream, tmp_path, "500", role="cache")
    assert (await client.get("/readyz")).status == 200
    for _ in range(THRESHOLD):
        assert (await get(client, new_blob(good)))[:2] == (200, "good")
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["ready"] is False
    assert body["tiers"]["sick"]["breaker"] == "open"
    await wait_for_half_open(client)
    assert (await client.get("/readyz")).status == 200


# -- configuration -------------------------------------------------------------------------


def config_with(tmp_path: Path, **breaker: Any) -> Path:
    return write_config(
        tmp_path / "c.toml", [{"name": "local", "kind": "fs", "path": str(tmp_path / "b")}], breaker=breaker
    )


def test_breaker_settings_are_read_checked_and_wired_into_the_store(tmp_path: Path) -> None:
    defaults = load_config(str(write_config(tmp_path / "d.toml", [{"name": "l", "kind": "fs", "path": "b"}])), {})
    assert (defaults.breaker.threshold, defaults.breaker.cooldown) == (5, 30.0)

    config = load_config(str(config_with(tmp_path, threshold=2, cooldown="2m")), environ={})
    assert (config.breaker.threshold, config.breaker.cooldown) == (2, 120.0)
    env = load_config(str(config_with(tmp_path, threshold=2)), environ={"CASPROXY_BREAKER__COOLDOWN": "5s"})
    assert env.breaker.cooldown == 5.0
    breaker = build_store(config).breakers["local"]
    assert (breaker.threshold, breaker.cooldown) == (2, 120.0)

    mistakes: list[tuple[dict[str, Any], str]] = [
        ({"threshold": 0}, "breaker.threshold"),
        ({"cooldown": "soon"}, "breaker.cooldown"),
    ]
    for bad, key in mistakes:
        with pytest.raises(ConfigError, match=key):
            load_config(str(config_with(tmp_path, **bad)), environ={})
    with pytest.raises(ConfigError, match=r"breaker\.reset: unknown key"):
        load_config(str(config_with(tmp_path, reset="1s")), environ={})


# -- the breaker itself --------------------------------------------------------------------


class Clock:
    """Stands in for the time module inside proxy.store.breaker only."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_probe_that_never_reports_back_gives_up_its_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(breaker_module, "time", clock)
    breaker = Breaker(threshold=2, cooldown=10)
    breaker.failed()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failed()
    assert (breaker.state, breaker.allow(), breaker.retry_in) == ("open", False, 10)
    clock.now += 10
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # one at a time
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1  # the probe's caller was cancelled and never said how it went
    assert breaker.allow()
    breaker.failed()
    assert (breaker.state, breaker.trips) == ("open", 1)  # the same outage, opened again
    clock.now += 10
    assert breaker.allow()
    breaker.succeeded()
    assert (breaker.state, breaker.failures, breaker.allow()) == ("closed", 0, True)
    with pytest.raises(ValueError, match="threshold"):
        Breaker(threshold=0)


async def test_a_tier_that_answers_with_corrupt_bodies_trips_too(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    # The headers arrive fine; only the body is wrong. That must count as a failure, not a success.
    client, _, sick_up, good = await setup(make_proxy, upstream, tmp_path, "corrupt")
    for _ in range(THRESHOLD):
        assert (await get(client, new_blob(sick_up, good)))[:2] == (200, "good")
    state = await tier_state(client, "/readyz")
    assert state["breaker"] == "open"
    stats = (await (await client.get("/stats")).json())["tiers"]["sick"]
    assert stats["corrupt"] == THRESHOLD
    asked = len(sick_up.requests)
    assert (await get(client, new_blob(sick_up, good)))[:2] == (200, "good")
    assert len(sick_up.requests) == asked  # skipped while open
