"""casproxy in a real browser: Debian's headless Chromium driven by Playwright (no browser
download: the system's /usr/bin/chromium). A page on one loopback port reads blobs from
casproxy on another and uploads through bulk-data presigned URLs; a page of another site cannot
write with a no-cors POST; the status page renders, names every tier and its numbers move."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ProxyFactory, free_port, make_blob

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/test installs Debian's package when root)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # A persistent context is how Playwright takes a fresh --user-data-dir of our choosing.
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=FLAGS, headless=True
        )
        try:
            yield context
        finally:
            await context.close()


async def site(html: str, port: int | None = None) -> TestServer:
    """A web app's own origin: one page on a loopback port of its own."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    server = TestServer(app, host="127.0.0.1", port=port or free_port())
    await server.start_server()
    return server


def tiers(tmp_path: Path) -> list[dict[str, Any]]:
    (tmp_path / "blobs").mkdir(exist_ok=True)
    return [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache"), "size_limit": "1 GiB"},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]


APP_JS = """
async ([proxy, digest]) => {
  const got = await fetch(`${proxy}/sha1/${digest}`);
  const bytes = new Uint8Array(await got.arrayBuffer());
  const part = await fetch(`${proxy}/sha1/${digest}`, {headers: {Range: "bytes=0-3"}});
  const slots = await (await fetch(`${proxy}/bulk-data`, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({count: 2}),
  })).json();
  const post = slots[1].presignedPost, form = new FormData();
  for (const [key, value] of Object.entries(JSON.parse(post.fields))) form.append(key, value);
  form.append("file", new Blob(["posted from a page"]), "bulk_data");
  const posted = await fetch(post.url, {method: "POST", body: form});
  const postedBack = await fetch(slots[1].presignedGet);
  const put = slots[0].presignedPut;
  const body = new TextEncoder().encode("uploaded from a page");
  const stored = await fetch(put.url, {method: "PUT", headers: JSON.parse(put.headers), body});
  const back = await fetch(slots[0].presignedGet);
  return {
    status: got.status, size: bytes.length, first: Array.from(bytes.slice(0, 4)),
    xcache: got.headers.get("X-Cache"), etag: got.headers.get("ETag"),
    range: part.status, contentRange: part.headers.get("Content-Range"),
    stored: stored.status, back: await back.text(),
    posted: posted.status, postedBack: await postedBack.text(),
  };
}
"""


async def test_a_page_on_another_origin_reads_and_uploads(
    browser: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    page_port = free_port()
    page_origin = f"http://127.0.0.1:{page_port}"
    proxy = await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]}, cors={"allow_origins": [page_origin]})
    data, digest = make_blob(100_000)
    (tmp_path / "blobs" / digest).write_bytes(data)
    app = await site("<p>a web app</p>", page_port)
    try:
        page = await browser.new_page()
        await page.goto(f"{page_origin}/")
        result = await page.evaluate(APP_JS, [str(proxy.make_url("")).rstrip("/"), digest])
    finally:
        await app.close()
    assert result["status"] == 200 and result["size"] == len(data) and bytes(result["first"]) == data[:4]
    assert result["xcache"] == "MISS" and result["etag"] == f'"{digest}"'  # exposed to the page
    assert result["range"] == 206 and result["contentRange"] == f"bytes 0-3/{len(data)}"
    assert result["stored"] == 201 and result["back"] == "uploaded from a page"
    assert result["posted"] == 201 and result["postedBack"] == "posted from a page"


CROSS_SITE_JS = """
async ([proxy]) => {
  // A "simple" request: no preflight, the page cannot read the answer; it only needs to land.
  await fetch(`${proxy}/sha1`, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                body: "written by another site"});
  return "sent";
}
"""


async def test_a_cross_site_no_cors_post_stores_nothing(browser: Any, make_proxy: ProxyFactory, tmp_path: Path) -> None:
    # No tokens, loopback: the default sidecar, which any page the user opens could reach.
    proxy = await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]})
    evil = await site("<p>another site</p>")
    try:
        page = await browser.new_page()
        async with page.expect_response(lambda r: r.url.endswith("/sha1")) as answer:
            await page.goto(str(evil.make_url("/")))
            assert await page.evaluate(CROSS_SITE_JS, [str(proxy.make_url("")).rstrip("/")]) == "sent"
        assert (await answer.value).status == 403
    finally:
        await evil.close()
    digest = hashlib.sha1(b"written by another site").hexdigest()
    assert not (tmp_path / "blobs" / digest).exists()
    assert list((tmp_path / "blobs").iterdir()) == []
    assert (await proxy.get(f"/sha1/{digest}")).status == 404


async def test_the_status_page_renders_names_every_tier_and_moves(
    browser: Any, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]})
    page = await browser.new_page()
    await page.set_viewport_size({"width": 1100, "height": 260})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("requestfailed", lambda request: errors.append(request.url))
    response = await page.goto(str(proxy.make_url("/")))
    assert "default-src 'none'" in response.headers["content-security-policy"]  # no assets from elsewhere
    for tier in ("disk", "local"):
        await page.wait_for_selector(f'tr[data-tier="{tier}"]', timeout=10_000)
    hits = 'document.querySelector(\'tr[data-tier="local"] td[data-key="hits"]\').textContent'
    assert await page.evaluate(hits) == "0"
    for size in (300_000, 5000, 5000):  # misses from the source, then hits from the disk cache
        data, digest = make_blob(size)
        (tmp_path / "blobs" / digest).write_bytes(data)
        for _ in range(3):
            assert (await proxy.get(f"/sha1/{digest}")).status == 200
    # the page refreshes itself: no reload
    await page.wait_for_function(f"() => {hits} === '3'", timeout=15_000)
    await page.wait_for_function(
        "() => document.querySelector('tr[data-tier=\"disk\"] td[data-key=\"hits\"]').textContent !== '0'",
        timeout=15_000,
    )
    text = await page.inner_text("body")
    assert "hit ratio" in text and "%" in text and "uptime" in text
    assert await page.locator('tr[data-tier="disk"] .bar').count() == 1  # use against the limit
    assert errors == []  # nothing fetched from elsewhere, no script error
    shot = os.environ.get("CASPROXY_STATUS_SCREENSHOT")  # docs/status-page.png is made this way
    await page.screenshot(path=shot or str(tmp_path / "status.png"), full_page=True)
