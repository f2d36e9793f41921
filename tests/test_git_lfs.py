"""Git LFS through casproxy with the stock git-lfs client: push, clone elsewhere, pull, compare."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import ProxyFactory, make_blob

Client = TestClient[web.Request, web.Application]
TOKEN = "lfs-test-token-123"
MEDIA = "application/vnd.git-lfs+json"

needs_git_lfs = pytest.mark.skipif(
    shutil.which("git") is None or shutil.which("git-lfs") is None,
    reason="git and git-lfs are not installed (scripts/test installs them with apt-get when root)",
)


def tiers(tmp_path: Path) -> list[dict[str, Any]]:
    (tmp_path / "blobs").mkdir(exist_ok=True)
    return [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "local", "kind": "fs", "role": "source", "path": str(tmp_path / "blobs")},
    ]


async def git(cwd: Path, *args: str, check: bool = True) -> tuple[int, str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd.parent),  # no user's ~/.gitconfig
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    text = output.decode(errors="replace")
    assert process.returncode is not None
    if check:
        assert process.returncode == 0, f"git {' '.join(args)}: {text}"
    return process.returncode, text


async def configure(repo: Path, url: str, token: str | None) -> None:
    await git(repo, "config", "lfs.url", url)
    await git(repo, "config", "lfs.locksverify", "false")  # casproxy has no locking API
    if token is not None:  # what a credential helper answers: HTTP Basic with the token as password
        await git(repo, "config", "credential.helper", f"!f() {{ echo username=lfs; echo password={token}; }}; f")


async def make_repo(tmp_path: Path, url: str, token: str | None) -> tuple[Path, dict[str, bytes]]:
    """A repository with tracked binaries, pushed to a bare remote and its LFS objects to casproxy."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    remote.mkdir()
    work.mkdir()
    await git(remote, "init", "-q", "--bare", "-b", "main")
    await git(work, "init", "-q", "-b", "main")
    await git(work, "lfs", "install", "--local")
    await configure(work, url, token)
    await git(work, "lfs", "track", "*.bin")
    files = {"big.bin": make_blob(300_000)[0], "small.bin": make_blob(1000)[0], "empty.bin": b""}
    for name, data in files.items():
        (work / name).write_bytes(data)
    await git(work, "add", ".")
    await git(work, "commit", "-q", "-m", "binaries")
    await git(work, "remote", "add", "origin", str(remote))
    await git(work, "push", "-q", "--no-verify", "origin", "main")  # the commits only
    await git(work, "lfs", "push", "--all", "origin")
    return remote, files


async def clone(tmp_path: Path, remote: Path, url: str, token: str | None) -> Path:
    clone = tmp_path / "clone"
    await git(
        tmp_path, "-c", "filter.lfs.smudge=", "-c", "filter.lfs.required=false", "clone", "-q", str(remote), "clone"
    )
    await git(clone, "lfs", "install", "--local")
    await configure(clone, url, token)
    return clone


@needs_git_lfs
@pytest.mark.parametrize("token", [None, TOKEN])
async def test_push_clone_pull(make_proxy: ProxyFactory, tmp_path: Path, token: str | None) -> None:
    auth = {"upload_tokens": [TOKEN], "require_ticket": True} if token else {}
    proxy = await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]}, auth=auth)
    url = str(proxy.make_url("/lfs"))
    remote, files = await make_repo(tmp_path, url, token)
    for data in files.values():  # stored through the verified upload path, named by sha256
        if data:
            assert (tmp_path / "blobs" / hashlib.sha256(data).hexdigest()).read_bytes() == data
    copy = await clone(tmp_path, remote, url, token)
    assert (copy / "big.bin").read_bytes() != files["big.bin"]  # a pointer until pulled
    await git(copy, "lfs", "pull")
    for name, data in files.items():
        assert (copy / name).read_bytes() == data


@needs_git_lfs
async def test_an_object_the_server_lacks_is_the_clients_own_error(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy = await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]})
    url = str(proxy.make_url("/lfs"))
    remote, files = await make_repo(tmp_path, url, None)
    lost = hashlib.sha256(files["big.bin"]).hexdigest()
    (tmp_path / "blobs" / lost).unlink()
    copy = await clone(tmp_path, remote, url, None)
    code, output = await git(copy, "lfs", "pull", check=False)
    assert code != 0
    assert "object does not exist" in output.lower(), output
    assert (copy / "small.bin").read_bytes() == files["small.bin"]  # the others still came


async def test_batch_api(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy = await make_proxy(tiers(tmp_path), uploads={"targets": ["local"]}, auth={"upload_tokens": [TOKEN]})
    data, oid = make_blob(5000, algorithm="sha256")
    headers = {"Accept": MEDIA, "Content-Type": MEDIA}

    async def batch(operation: str, size: int, **extra: str) -> Any:
        body = {"operation": operation, "transfers": ["basic"], "objects": [{"oid": oid, "size": size}]}
        response = await proxy.post("/lfs/objects/batch", json=body, headers={**headers, **extra})
        assert response.headers["Content-Type"].startswith(MEDIA)
        return response.status, response.headers, await response.json(content_type=None)

    status, answer_headers, body = await batch("upload", len(data))
    assert status == 401 and answer_headers["LFS-Authenticate"].startswith("Basic")
    assert body["message"] and body["documentation_url"]
    basic = "Basic " + base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    status, _, body = await batch("upload", len(data), Authorization=basic)
    assert status == 200
    href = body["objects"][0]["actions"]["upload"]["href"]
    # the signed URL is for this name only, and the body must still hash to it
    assert (await proxy.session.put(href, data=data[:-1])).status == 400
    assert (await proxy.session.put(href.replace(oid, make_blob(9, algorithm="sha256")[1]), data=data)).status == 403
    assert (await proxy.session.put(href, data=data)).status == 201
    status, _, body = await batch("upload", len(data), Authorization=f"Bearer {TOKEN}")
    assert status == 200 and "actions" not in body["objects"][0]  # already stored
    status, _, body = await batch("download", len(data))
    download = body["objects"][0]["actions"]["download"]["href"]
    assert (await (await proxy.session.get(download)).read()) == data
    status, _, body = await batch("download", len(data) + 1)
    assert body["objects"][0]["error"]["code"] == 422
    status, _, body = await batch("download", 0, Authorization=basic)
    response = await proxy.post(
        "/some/repo.git/info/lfs/objects/batch",
        json={"operation": "download", "objects": [{"oid": make_blob(3, algorithm="sha256")[1], "size": 3}]},
        headers=headers,
    )
    assert response.status == 200
    assert (await response.json(content_type=None))["objects"][0]["error"]["code"] == 404
    for garbage in ("Basic ***", "Basic é"):  # a 401 like no credentials, not a 500
        status, _, body = await batch("upload", len(data), Authorization=garbage)
        assert status == 401 and body["message"]
    bad = await proxy.post("/lfs/objects/batch", data=b"{", headers=headers)
    assert bad.status == 400 and (await bad.json(content_type=None))["message"]
