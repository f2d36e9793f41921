"""/jobs: export and import run by the server, with progress, pause, resume, cancel, and a
restart of the server in the middle of a job. Real moto S3 as the target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import Bucket, ProxyFactory, Upstream, make_blob

Client = TestClient[web.Request, web.Application]
UpstreamFactory = Callable[..., Awaitable[Upstream]]
ADMIN = {"Authorization": "Bearer admin-token"}


def tiers(tmp_path: Path, up: Upstream, bucket: Bucket | None) -> list[dict[str, Any]]:
    found = [
        {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
        {"name": "origin", "kind": "http", "url": up.url},
    ]
    if bucket is not None:  # the tier a job borrows the bucket's endpoint and credentials from
        found.append(bucket.tier("bucket", "tier/"))
    return found


async def start_proxy(
    make_proxy: ProxyFactory, tmp_path: Path, up: Upstream, bucket: Bucket | None = None, *allow: str
) -> Client:
    places = list(allow) or ([bucket.url()] if bucket is not None else [])
    return await make_proxy(
        tiers(tmp_path, up, bucket),
        auth={"admin_tokens": ["admin-token"]},
        uploads={"targets": ["disk"]},
        jobs={"allow": places},
    )


async def slow_origin(request: web.Request, up: Upstream) -> web.StreamResponse:
    await asyncio.sleep(0.05)  # a job of 60 blobs, one at a time, takes ~3 s: time to pause it
    data = up.blobs.get(request.match_info["hash"])
    if data is None:
        raise web.HTTPNotFound()
    return web.Response(body=data)


def seed(up: Upstream, count: int) -> dict[str, bytes]:
    blobs = {digest: data for data, digest in (make_blob(2000) for _ in range(count))}
    up.blobs.update(blobs)
    return blobs


async def job(client: Client, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}", headers=ADMIN)
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def wait_for(
    client: Client, job_id: str, check: Callable[[dict[str, Any]], bool], limit: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        state = await job(client, job_id)
        if check(state):
            return state
        assert time.monotonic() < deadline, f"job never got there: {state}"
        await asyncio.sleep(0.05)


def export_request(bucket: Bucket, hashes: list[str], **extra: Any) -> dict[str, Any]:
    return {"kind": "export", "target": bucket.url("exported/"), "hashes": hashes, **extra}


async def test_export_job_runs_to_the_end_with_progress(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    up = await upstream()
    blobs = seed(up, 20)
    client = await start_proxy(make_proxy, tmp_path, up, bucket)

    response = await client.post("/jobs", json=export_request(bucket, list(blobs)), headers=ADMIN)
    assert response.status == 202
    created = await response.json()
    assert response.headers["Location"] == f"/jobs/{created['id']}"
    assert created["kind"] == "export" and created["state"] in ("queued", "running")

    done = await wait_for(client, created["id"], lambda j: j["state"] in ("done", "failed"))
    assert done["state"] == "done", done
    assert (done["done"], done["total"], done["failed"], done["bytes"]) == (20, 20, 0, 20 * 2000)
    assert done["eta_s"] is None and done["rate"] >= 0
    assert sorted(bucket.keys()) == sorted(f"exported/{digest}" for digest in blobs)
    assert all(bucket.get(f"exported/{digest}") == data for digest, data in blobs.items())

    listed = await (await client.get("/jobs", headers=ADMIN)).json()
    assert [j["id"] for j in listed["jobs"]] == [created["id"]]


async def test_import_job_verifies_and_stores(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    up = await upstream()
    client = await start_proxy(make_proxy, tmp_path, up, bucket)
    good, digest = make_blob(3000)
    bucket.put(f"in/{digest}", good)
    bad, bad_digest = make_blob(3000)
    bucket.put(f"in/{bad_digest}", bad[:-1] + bytes([bad[-1] ^ 1]))
    bucket.put("in/README.txt", b"not a blob")
    request = {"kind": "import", "source": bucket.url("in/"), "into": "disk"}
    created = await (await client.post("/jobs", json=request, headers=ADMIN)).json()

    finished = await wait_for(client, created["id"], lambda j: j["state"] in ("done", "failed"))
    assert finished["state"] == "failed"  # something was corrupt: reported, and the job says so
    assert (finished["done"], finished["corrupt"], finished["ignored"]) == (1, 1, 1)
    assert any(bad_digest in line for line in finished["errors"])
    assert await (await client.get(f"/sha1/{digest}")).read() == good
    assert up.requests == []  # served from the disk tier the job wrote into
    assert (await client.get(f"/sha1/{bad_digest}")).status == 404


async def test_jobs_need_the_admin_token_and_a_good_request(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    client = await start_proxy(make_proxy, tmp_path, await upstream(), bucket)
    body = export_request(bucket, [make_blob(10)[1]])
    assert (await client.post("/jobs", json=body)).status == 401
    assert (await client.post("/jobs", json=body, headers={"Authorization": "Bearer nope"})).status == 403
    assert (await client.get("/jobs")).status == 401
    for bad in (
        {**body, "surprise": 1},
        {**body, "target": "-"},
        {"kind": "export"},
        {"kind": "delete-everything"},
        ["not", "an", "object"],
    ):
        response = await client.post("/jobs", json=bad, headers=ADMIN)
        assert response.status == 400, bad
        assert (await response.json())["type"] == "bad-request"
    response = await client.post("/jobs", data=b"{not json", headers=ADMIN)
    assert response.status == 400
    assert (await client.get("/jobs/nosuchjob", headers=ADMIN)).status == 404
    assert (await client.post("/jobs/nosuchjob/pause", headers=ADMIN)).status == 404


async def test_pause_resume_and_cancel(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    up = await upstream(slow_origin)
    blobs = seed(up, 60)
    client = await start_proxy(make_proxy, tmp_path, up, bucket)
    created = await (await client.post("/jobs", json=export_request(bucket, list(blobs), jobs=1), headers=ADMIN)).json()
    job_id = created["id"]

    await wait_for(client, job_id, lambda j: j["done"] >= 5)
    assert (await client.post(f"/jobs/{job_id}/pause", headers=ADMIN)).status == 202
    paused = await wait_for(client, job_id, lambda j: j["state"] == "paused")
    await asyncio.sleep(0.5)
    still = await job(client, job_id)
    assert still["state"] == "paused" and still["done"] == paused["done"] < 60  # nothing moves

    assert (await client.post(f"/jobs/{job_id}/resume", headers=ADMIN)).status == 202
    done = await wait_for(client, job_id, lambda j: j["state"] in ("done", "failed"))
    # The blob in flight at the pause may have reached the bucket unrecorded: then it is skipped.
    assert (done["state"], done["done"] + done["skipped"], done["failed"]) == ("done", 60, 0), done
    assert done["resumed"] >= paused["done"]  # the resumed run took them from the checkpoint
    # Exports do not fill the cache: the blob in flight at the pause may be fetched again.
    assert len(up.requests) <= 61, "no blob but the one in flight was fetched twice"
    assert len(bucket.keys()) == 60

    # A finished job cannot be paused; a running one can be cancelled, and then not resumed.
    assert (await client.post(f"/jobs/{job_id}/pause", headers=ADMIN)).status == 409
    more = seed(up, 60)
    other = await (await client.post("/jobs", json=export_request(bucket, list(more), jobs=1), headers=ADMIN)).json()
    await wait_for(client, other["id"], lambda j: j["done"] >= 2)
    assert (await client.post(f"/jobs/{other['id']}/cancel", headers=ADMIN)).status == 202
    cancelled = await wait_for(client, other["id"], lambda j: j["state"] == "cancelled")
    await asyncio.sleep(0.3)
    assert (await job(client, other["id"]))["done"] == cancelled["done"] < 60
    assert not Path(cancelled["spec"]["checkpoint"]).exists()
    assert (await client.post(f"/jobs/{other['id']}/resume", headers=ADMIN)).status == 409


async def test_a_job_survives_a_server_restart(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    # The running job's origin serves 10 blobs, then holds the rest until the server has stopped:
    # the stop always lands mid-job, however fast this machine is.
    held: set[str] = set()
    served: list[str] = []
    restarted = asyncio.Event()

    async def held_origin(request: web.Request, up: Upstream) -> web.StreamResponse:
        if request.match_info["hash"] in held:
            if len(served) >= 10:
                await restarted.wait()
            served.append(request.match_info["hash"])
        return await slow_origin(request, up)

    up = await upstream(held_origin)
    blobs = seed(up, 60)
    held.update(blobs)
    first = await start_proxy(make_proxy, tmp_path, up, bucket)
    running = await (await first.post("/jobs", json=export_request(bucket, list(blobs), jobs=1), headers=ADMIN)).json()
    others = seed(up, 60)
    paused = await (await first.post("/jobs", json=export_request(bucket, list(others), jobs=1), headers=ADMIN)).json()
    await wait_for(first, paused["id"], lambda j: j["done"] >= 1)
    assert (await first.post(f"/jobs/{paused['id']}/pause", headers=ADMIN)).status == 202
    await wait_for(first, paused["id"], lambda j: j["state"] == "paused")
    before = await wait_for(first, running["id"], lambda j: j["done"] >= 5)
    assert before["done"] <= 10
    await first.close()  # the server stops in the middle of the job

    restarted.set()
    second = await start_proxy(make_proxy, tmp_path, up, bucket)
    done = await wait_for(second, running["id"], lambda j: j["state"] in ("done", "failed"))
    assert (done["state"], done["done"] + done["skipped"], done["failed"]) == ("done", 60, 0), done
    assert done["resumed"] >= before["done"]
    fetched = [digest for digest in up.requests if digest in blobs]
    assert len(fetched) <= 61, "at most the blob in flight at the stop was fetched again"
    assert (await job(second, paused["id"]))["state"] == "paused"  # listed as paused, not run


async def test_jobs_stay_inside_jobs_allow(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (exports / "escape").symlink_to(tmp_path / "elsewhere")
    unconfigured = f"{bucket.name}-nobody"
    allow = (bucket.url("allowed/"), str(exports), f"s3://{unconfigured}/")
    client = await start_proxy(make_proxy, tmp_path, await upstream(), bucket, *allow)
    hashes = [make_blob(10)[1]]

    async def post(body: dict[str, Any]) -> tuple[int, str]:
        response = await client.post("/jobs", json=body, headers=ADMIN)
        problem = await response.json()
        return response.status, str(problem.get("detail", ""))

    for target in (
        bucket.url("other/"),  # another prefix of the same bucket
        "s3://some-other-bucket/allowed/",
        str(tmp_path / "elsewhere"),
        str(exports / ".." / "elsewhere"),
        str(exports / "escape" / "out.tar"),  # a symlink out of the allowed folder
        "/etc/out.tar",
    ):
        status, detail = await post({"kind": "export", "target": target, "hashes": hashes})
        assert (status, "outside jobs.allow" in detail) == (403, True), (target, detail)
    status, _ = await post({"kind": "import", "source": str(tmp_path / "elsewhere"), "into": "disk"})
    assert status == 403

    refused = {
        "hashes_file": "/etc/passwd",
        "endpoint_url": "http://attacker.example/",
        "checkpoint": str(exports / "victim"),
    }
    for key, value in refused.items():
        status, detail = await post({"kind": "export", "target": str(exports), key: value, "hashes": hashes})
        assert (status, detail.startswith(f"{key}: ")) == (400, True), (key, detail)
    for body in (
        {"kind": "import", "source": "file:///etc/passwd"},
        {"kind": "export", "target": "file:///etc/passwd", "hashes": hashes},
        {"kind": "export", "target": f"s3://{unconfigured}/", "hashes": hashes},  # allowed, but no tier reaches it
        {"kind": "import", "source": str(exports), "into": "nosuchtier"},
        {"kind": "import", "source": str(exports), "into": "origin"},  # an http tier stores nothing
        {"kind": "export", "targets": [str(exports), "-"], "hashes": hashes},
    ):
        status, detail = await post(body)
        assert status == 400, (body, detail)

    allowed = await client.post(
        "/jobs",
        json={"kind": "export", "targets": [bucket.url("allowed/x/"), str(exports / "a.tar")], "hashes": hashes},
        headers=ADMIN,
    )
    assert allowed.status == 202
    spec = (await allowed.json())["spec"]
    assert spec["checkpoint"].startswith(str(tmp_path)) and spec["endpoint_url"] is None


async def test_a_job_that_fails_does_not_hold_up_the_others(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    up = await upstream()
    blobs = seed(up, 5)
    exports = tmp_path / "exports"
    exports.mkdir()
    client = await start_proxy(make_proxy, tmp_path, up, bucket, str(exports), bucket.url())
    failing = []
    for _ in range(3):  # more than run at once: were they stuck, the good job would never start
        body = {"kind": "import", "source": str(exports / "missing-folder"), "into": "disk"}
        failing.append((await (await client.post("/jobs", json=body, headers=ADMIN)).json())["id"])
    good = await (await client.post("/jobs", json=export_request(bucket, list(blobs)), headers=ADMIN)).json()

    done = await wait_for(client, good["id"], lambda j: j["state"] in ("done", "failed"))
    assert done["state"] == "done", done
    for job_id in failing:
        failed = await wait_for(client, job_id, lambda j: j["state"] in ("done", "failed"))
        assert failed["state"] == "failed" and "no such folder" in failed["error"], failed


async def test_an_export_job_to_two_targets_shows_each_and_retries_the_failed_one_alone(
    make_proxy: ProxyFactory, upstream: UpstreamFactory, bucket: Bucket, tmp_path: Path
) -> None:
    up = await upstream()
    blobs = seed(up, 8)
    exports = tmp_path / "exports"
    exports.mkdir()
    blocked = exports / "copy"
    blocked.write_text("a file where the folder target should be")
    client = await start_proxy(make_proxy, tmp_path, up, bucket, str(exports), bucket.url())
    body = {"kind": "export", "targets": [bucket.url("both/"), str(blocked)], "hashes": list(blobs)}
    job_id = (await (await client.post("/jobs", json=body, headers=ADMIN)).json())["id"]

    failed = await wait_for(client, job_id, lambda j: j["state"] in ("done", "failed"))
    assert failed["state"] == "failed" and "is not a folder" in failed["error"], failed
    by_target = {part["location"]: part for part in failed["targets"]}
    assert by_target[bucket.url("both/")]["state"] == "done" and by_target[bucket.url("both/")]["done"] == 8
    assert by_target[str(blocked)]["state"] == "failed"
    assert sorted(bucket.keys()) == sorted(f"both/{h}" for h in blobs)
    assert len(up.requests) == 8, "each blob read once"

    blocked.unlink()  # fixed: retry that target alone
    response = await client.post(f"/jobs/{job_id}/resume", json={"targets": ["s3://elsewhere/"]}, headers=ADMIN)
    assert response.status == 400, "only the job's own targets"
    response = await client.post(f"/jobs/{job_id}/resume", json={"targets": [str(blocked)]}, headers=ADMIN)
    assert response.status == 202
    done = await wait_for(client, job_id, lambda j: j["state"] in ("done", "failed"))
    assert done["state"] == "done", done
    by_target = {part["location"]: part for part in done["targets"]}
    assert by_target[str(blocked)]["done"] == 8 and by_target[bucket.url("both/")]["done"] == 8
    assert (done["done"], done["failed"]) == (16, 0)
    assert {path.name for path in blocked.iterdir()} == set(blobs)
    # Exports do not fill the cache: the retry read each blob once more, for the folder alone
    # (the bucket's part is the first run's: the retry did not even list it).
    assert len(up.requests) == 16
