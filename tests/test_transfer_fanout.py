"""Export fan-out (issue 16): one run, several targets. Each blob is read once from the source
tier (an origin counting its GETs), written to every target that lacks it; a broken bucket (a
fault proxy answering 500) does not stop the others, and a rerun sends only what it missed; a
kill -9 in the middle of a multipart upload to one bucket resumes that upload part by part and
sends nothing to the targets that were complete."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tarfile
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import Bucket, Upstream, make_blob, write_config
from tests.test_transfer_resume import CountingProxy, child_env, counting, until

__all__ = ["counting"]  # the fixture, shared with test_transfer_resume
MiB = 1 << 20
UpstreamFactory = Callable[..., Awaitable[Upstream]]
MULTIPART = ("--part-size", "5MiB", "--multipart-threshold", "5MiB")


class Origin:
    """The source tier: an HTTP origin that counts every GET of every blob."""

    def __init__(self, up: Upstream, gets: Counter[str]) -> None:
        self.up = up
        self.gets = gets


@pytest.fixture
async def origin(upstream: UpstreamFactory) -> Origin:
    gets: Counter[str] = Counter()

    async def serve(request: web.Request, up: Upstream) -> web.StreamResponse:
        digest = request.match_info["hash"]
        if request.method == "GET":
            gets[digest] += 1
        data = up.blobs.get(digest)
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data)

    return Origin(await upstream(serve), gets)


def second_bucket(bucket: Bucket) -> Bucket:
    name = f"{bucket.name}-b"
    bucket.client.create_bucket(Bucket=name)
    return Bucket(name, bucket.client, bucket.endpoint)


def setup(tmp_path: Path, origin: Origin, sizes: list[int], seed: int) -> tuple[Path, dict[str, bytes]]:
    blobs = {}
    for index, size in enumerate(sizes):
        data, digest = make_blob(size, seed=seed + index)
        blobs[digest] = data
    origin.up.blobs.update(blobs)
    (tmp_path / "hashes.txt").write_text("".join(f"{h}\n" for h in blobs))
    config = write_config(
        tmp_path / "config.toml",
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(tmp_path / "cache")},
            {"name": "origin", "kind": "http", "url": origin.up.url},
        ],
    )
    return config, blobs


async def export(
    tmp_path: Path, config: Path, targets: list[str], proxy: CountingProxy, *extra: str
) -> asyncio.subprocess.Process:
    args = ["-m", "proxy", "export", "-c", str(config), "--hashes", str(tmp_path / "hashes.txt")]
    for target in targets:
        args += ["--to", target]
    args += ["--endpoint-url", proxy.url, "--checkpoint", str(tmp_path / "export.sqlite"), *extra]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=tmp_path,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> str:
    _, err = await asyncio.wait_for(process.communicate(), 120)
    return err.decode()


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {info.name: archive.extractfile(info).read() for info in archive if info.isreg()}  # type: ignore[union-attr]


def holds(bucket: Bucket, prefix: str, blobs: dict[str, bytes]) -> bool:
    return sorted(bucket.keys()) == sorted(f"{prefix}{h}" for h in blobs) and all(
        bucket.get(f"{prefix}{h}") == data for h, data in blobs.items()
    )


def checkpoint_of(tmp_path: Path, target: str) -> Path:
    """The checkpoint file of one target (one per target beside --checkpoint PATH)."""
    for path in tmp_path.glob("export-*.sqlite"):
        with sqlite3.connect(path) as db:
            (identity,) = db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
        if f'"{target}"' in identity:
            return path
    raise AssertionError(f"no checkpoint for {target}")


async def test_one_read_of_each_blob_for_two_buckets_and_a_tar(
    tmp_path: Path, bucket: Bucket, counting: CountingProxy, origin: Origin
) -> None:
    other = second_bucket(bucket)
    config, blobs = setup(tmp_path, origin, [0, 100, 3000, 2 * MiB, 11 * MiB] + [500 + i for i in range(20)], 80_000)
    targets = [bucket.url("a/"), other.url("b/"), str(tmp_path / "out.tar")]
    process = await export(tmp_path, config, targets, counting, "-j", "4", *MULTIPART)
    err = await finish(process)
    assert process.returncode == 0, err

    assert origin.gets == Counter({digest: 1 for digest in blobs}), "every blob read once, for all three targets"
    assert holds(bucket, "a/", blobs) and holds(other, "b/", blobs)
    assert members(tmp_path / "out.tar") == blobs
    assert counting.by_bucket[bucket.name, "CreateMultipartUpload"] == 1  # the 11 MiB blob, in parts
    assert counting.by_bucket[other.name, "CompleteMultipartUpload"] == 1
    total = sum(map(len, blobs.values()))
    assert f"export: done {3 * len(blobs)}, skipped 0, failed 0, corrupt 0;" in err, "blobs times targets"
    for target in targets:
        assert f"  export to {target}: done {len(blobs)}, skipped 0, failed 0, corrupt 0; " in err
    assert f"{total / MiB:.1f} MiB this run" in err
    assert not list(tmp_path.glob("export*.sqlite")), "complete: no checkpoint left"


async def test_a_failing_bucket_does_not_stop_the_others_and_a_rerun_sends_only_its_blobs(
    tmp_path: Path, bucket: Bucket, counting: CountingProxy, origin: Origin
) -> None:
    broken = second_bucket(bucket)
    config, blobs = setup(tmp_path, origin, [1000 + 7 * i for i in range(12)], 81_000)
    targets = [bucket.url("ok/"), broken.url("broken/"), str(tmp_path / "out.tar")]
    counting.refuse = lambda name, operation: name == broken.name and operation == "PutObject"
    process = await export(tmp_path, config, targets, counting, "-j", "3")
    err = await finish(process)

    assert process.returncode == 1, err
    assert holds(bucket, "ok/", blobs) and members(tmp_path / "out.tar") == blobs, "the others complete"
    assert broken.keys() == []
    assert f"  export to {broken.url('broken/')}: done 0, skipped 0, failed {len(blobs)}," in err
    assert f"  export to {bucket.url('ok/')}: done {len(blobs)}, skipped 0, failed 0," in err
    assert "Traceback" not in err
    assert set(origin.gets) == set(blobs) and max(origin.gets.values()) == 1, "still one read each"

    counting.reset()  # the bucket is fixed
    origin.gets.clear()
    process = await export(tmp_path, config, targets, counting, "-j", "3")
    err = await finish(process)
    assert process.returncode == 0, err
    assert counting.by_bucket[broken.name, "PutObject"] == len(blobs)
    assert counting.by_bucket[bucket.name, "PutObject"] == 0, "nothing sent again to the bucket that had them"
    assert holds(broken, "broken/", blobs)
    assert members(tmp_path / "out.tar") == blobs
    # The complete targets kept no checkpoint; what they hold answers (one listing, a scan).
    assert f"  export to {bucket.url('ok/')}: done 0, skipped {len(blobs)}, failed 0," in err
    assert sum(origin.gets.values()) <= len(blobs), "only the failed bucket's blobs are needed"


async def test_kill_mid_multipart_resumes_part_by_part_and_leaves_complete_targets_alone(
    tmp_path: Path, bucket: Bucket, counting: CountingProxy, origin: Origin
) -> None:
    done_bucket = second_bucket(bucket)
    big = 16 * MiB + 5  # parts of 5 MiB: 4 parts
    config, blobs = setup(tmp_path, origin, [big] + [2000 + i for i in range(10)], 82_000)
    (large, _), parts = next(iter(blobs.items())), 4
    targets = [bucket.url("slow/"), done_bucket.url("fast/"), str(tmp_path / "out.tar")]
    process = await export(tmp_path, config, targets, counting, "-j", "2", *MULTIPART)

    async def gate(request: web.Request, name: str, operation: str) -> bool:
        """The slow bucket's third part waits until the other targets hold everything (and
        their checkpoints say so); its later parts wait for the kill."""
        if name != bucket.name or operation != "UploadPart":
            return True
        number = int(request.query["partNumber"])
        if number == 3:
            await until(lambda: holds(done_bucket, "fast/", blobs), "the fast bucket complete")
            await until(lambda: len(members(tmp_path / "out.tar")) == len(blobs), "the tar complete", 60)
            return True
        if number > 3:
            await asyncio.wait_for(process.wait(), 60)
            return False
        return True

    async def kill_after_third(operation: str, count: int) -> None:
        if operation == "UploadPart" and counting.by_bucket[bucket.name, "UploadPart"] == 3:
            slow = checkpoint_of(tmp_path, bucket.url("slow/"))
            await until(lambda: _rows(slow, "parts") >= 1, "a finished part recorded")
            process.kill()

    counting.before, counting.after = gate, kill_after_third
    await finish(process)
    assert process.returncode == -9
    await counting.settle()
    (upload,) = bucket.client.list_multipart_uploads(Bucket=bucket.name)["Uploads"]
    held = bucket.client.list_parts(Bucket=bucket.name, Key=f"slow/{large}", UploadId=upload["UploadId"])["Parts"]
    assert 1 <= len(held) < parts
    tar_before = members(tmp_path / "out.tar")
    present = set(bucket.keys())
    lacking = {h for h in blobs if f"slow/{h}" not in present}

    counting.reset()
    origin.gets.clear()
    process = await export(tmp_path, config, targets, counting, "-j", "2", *MULTIPART)
    err = await finish(process)
    assert process.returncode == 0, err
    assert counting.by_bucket[bucket.name, "CreateMultipartUpload"] == 0, "the same upload goes on"
    assert counting.by_bucket[bucket.name, "UploadPart"] == parts - len(held), "only the missing parts"
    assert counting.by_bucket[bucket.name, "CompleteMultipartUpload"] == 1
    sent_to_done = {op: n for (name, op), n in counting.by_bucket.items() if name == done_bucket.name}
    assert not {op for op in sent_to_done if op not in ("ListObjects",)}, (
        f"nothing sent to the complete bucket: {sent_to_done}"
    )
    assert members(tmp_path / "out.tar") == tar_before == blobs
    assert f"resuming {bucket.url('slow/')}: " in err, "the killed run's checkpoints say how far it got"
    assert holds(bucket, "slow/", blobs) and holds(done_bucket, "fast/", blobs)
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []
    # Exports read without filling the cache: the rerun reads, once each, what the slow bucket lacked.
    assert set(origin.gets) == lacking and max(origin.gets.values()) == 1, (origin.gets, lacking)


def _rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
