"""Tickets: HMAC-signed expiring URLs, and auth.require_ticket on reads."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.digest import Digest
from proxy.errors import ConfigError, Forbidden, TicketExpired
from proxy.tickets import Signer, load_secret
from tests.conftest import ProxyFactory, make_blob, write_config

Client = TestClient[web.Request, web.Application]
SECRET = b"0123456789abcdef0123456789abcdef"


def test_signer_accepts_its_own_and_refuses_the_rest() -> None:
    signer = Signer(SECRET, "http://proxy", ttl=60)
    digest = Digest(make_blob(10)[1])
    query = parse_qs(signer.ticket(digest, 10).ticket.split("?", 1)[1])
    expires, sig = query["expires"][0], query["sig"][0]
    path = f"/sha1/{digest}"
    signer.verify(path, expires, sig)
    with pytest.raises(Forbidden, match="signature"):
        signer.verify(f"/sha1/{make_blob(10)[1]}", expires, sig)  # another blob's path
    with pytest.raises(Forbidden, match="signature"):
        signer.verify(path, str(int(expires) + 3600), sig)  # a later expiry
    with pytest.raises(Forbidden, match="signature"):
        Signer(b"another secret of enough bytes!!", "http://proxy", 60).verify(path, expires, sig)
    with pytest.raises(Forbidden):
        signer.verify(path, None, sig)
    with pytest.raises(Forbidden):
        signer.verify(path, "soon", sig)
    with pytest.raises(TicketExpired):
        signer.verify(path, expires, sig, now=int(expires) + 1)


def test_generated_secret_is_private_and_stable(tmp_path: Path) -> None:
    first = load_secret("", str(tmp_path / "state"))
    assert len(first) >= 32 and first == load_secret("", str(tmp_path / "state"))
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "ticket_secret").st_mode)
    assert mode == 0o600
    assert load_secret("configured", str(tmp_path / "state")) == b"configured"


def test_workers_generating_the_secret_at_once_all_get_the_same_whole_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers start on a fresh cache: the first is still writing its secret when the second
    looks. (Measured: one worker read an empty file and exited, taking the server down.)"""
    state = str(tmp_path / "state")
    second_done = threading.Event()
    generate = secrets.token_hex
    calls: list[str] = []

    def slow_first(nbytes: int) -> str:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            assert second_done.wait(10)  # the first writer is held until the second has its secret
        return generate(nbytes)

    monkeypatch.setattr("proxy.tickets.secrets.token_hex", slow_first)
    results: dict[str, bytes] = {}
    first = threading.Thread(target=lambda: results.update(first=load_secret("", state)), name="first")
    first.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # until the first writer is inside
        time.sleep(0.001)
    results["second"] = load_secret("", state)
    second_done.set()
    first.join(10)
    assert len(results["second"]) == 64 and results["first"] == results["second"]
    assert load_secret("", state) == results["second"]
    assert os.listdir(state) == ["ticket_secret"]  # no temporary file left


def test_a_secret_file_that_is_not_one_is_named(tmp_path: Path) -> None:
    (tmp_path / "ticket_secret").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"auth.ticket_secret is empty, and .*ticket_secret holds 0 bytes.*delete it"):
        load_secret("", str(tmp_path))


@pytest.fixture
async def guarded(make_proxy: ProxyFactory, tmp_path: Path) -> Client:
    (tmp_path / "local").mkdir()
    return await make_proxy(
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
            {"name": "local", "kind": "fs", "path": str(tmp_path / "local")},
        ],
        uploads={"targets": ["local"]},
        auth={"require_ticket": True, "upload_tokens": ["up"], "ticket_secret": SECRET.decode(), "ticket_ttl": "1h"},
    )


async def test_require_ticket_guards_reads(guarded: Client) -> None:
    data, digest = make_blob(100)
    response = await guarded.put(f"/sha1/{digest}", data=data, headers={"Authorization": "Bearer up"})
    ticket = await response.json()
    url = urlsplit(ticket["ticket"])
    good = f"{url.path}?{url.query}"
    assert await (await guarded.get(good)).read() == data
    assert (await guarded.head(good)).status == 200
    assert (await guarded.get(good.replace(digest, digest.upper()))).status == 200  # case does not matter
    assert (await guarded.get(f"/sha1/{digest}", headers={"Authorization": "Bearer up"})).status == 200

    denied = await guarded.get(f"/sha1/{digest}")
    assert denied.status == 403 and (await denied.json())["type"] == "forbidden"
    expires = parse_qs(url.query)["expires"][0]
    tampered = good.replace(f"expires={expires}", f"expires={int(expires) + 1}")
    assert (await guarded.get(tampered)).status == 403
    other = make_blob(5)[1]
    assert (await guarded.get(good.replace(digest, other))).status == 403  # signature is per path

    old_expiry = int(time.time()) - 10
    sig = Signer(SECRET, "", 60).signature(f"/sha1/{digest}", old_expiry)
    expired = await guarded.get(f"/sha1/{digest}?expires={old_expiry}&sig={sig}")
    assert expired.status == 403 and (await expired.json())["type"] == "ticket-expired"


async def test_without_require_ticket_reads_are_open(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    data, digest = make_blob(100)
    (tmp_path / "local" / digest).write_bytes(data)
    proxy = await make_proxy(
        [{"name": "local", "kind": "fs", "path": str(tmp_path / "local")}], uploads={"targets": ["local"]}
    )
    assert await (await proxy.get(f"/sha1/{digest}")).read() == data


def test_ticket_command_signs_offline(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        [{"name": "local", "kind": "fs", "path": str(tmp_path)}],
        uploads={"targets": ["local"]},
        auth={"ticket_secret": SECRET.decode()},
        server={"public_url": "https://cas.example"},
    )
    digest = make_blob(10)[1]
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "ticket", digest, "--ttl", "1h", "-c", str(config)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    ticket = json.loads(out.stdout)
    assert ticket["url"] == f"https://cas.example/sha1/{digest}"
    assert abs(ticket["expires"] - (time.time() + 3600)) < 60
    query = parse_qs(urlsplit(ticket["ticket"]).query)
    Signer(SECRET, "", 60).verify(f"/sha1/{digest}", query["expires"][0], query["sig"][0])
    bad = subprocess.run(
        [sys.executable, "-m", "proxy", "ticket", "xyz", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "not a digest" in bad.stderr and "Traceback" not in bad.stderr
