"""Export and import (SPEC 7) against real places: moto's S3 over HTTP, folders, tar files and
tar streams; through the engine in process, and as the ``casproxy export``/``import`` commands.
Kills and Ctrl-C half-way through are in test_transfer_resume.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import main
from proxy.config import load_config
from proxy.digest import Digest
from proxy.service import build_store
from proxy.store.composite import Composite
from proxy.transfer import Snapshot, Transfer, TransferSpec, UsageError, default_into
from proxy.transfer.locations import ByteBudget, parse_location
from proxy.transfer.progress import ProgressView, status_line, summary_line
from proxy.transfer.tally import Tally
from proxy.transfer.wiring import checkpoint_path, state_dir
from tests.conftest import Bucket, make_blob, write_config
from tests.faults import fault_proxy_before

MiB = 1 << 20


def child_env() -> dict[str, str]:
    """The environment for a casproxy subprocess: moto's credentials (set by the s3 fixture),
    none of the developer's own CASPROXY_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CASPROXY_")}


# Small multipart settings (S3's minimum part) so a blob of a few MiB goes up in several parts.
PARTS: dict[str, Any] = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB}


@dataclass
class World:
    """A store to export from (a disk cache in front of a folder of blobs) and its blobs."""

    root: Path
    config: Path
    blobs: dict[str, bytes]

    def hashes_file(self, hashes: list[str] | None = None) -> Path:
        path = self.root / "hashes.txt"
        path.write_text("".join(f"{h}\n" for h in (hashes if hashes is not None else list(self.blobs))))
        return path


def store_config(root: Path, name: str = "config.toml") -> Path:
    return write_config(
        root / name,
        [
            {"name": "disk", "kind": "disk", "role": "cache", "path": str(root / "cache")},
            {"name": "local", "kind": "fs", "role": "source", "path": str(root / "blobs")},
        ],
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative state (./data, where checkpoints go without a disk cache) lands in the test's folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def world(tmp_path: Path) -> World:
    root = tmp_path / "origin"
    (root / "blobs").mkdir(parents=True)
    blobs = {}
    # Empty, tiny, a few KiB, over the 1 MiB "small" line, and one that goes up in 3 parts.
    for size in [0, 1, 100, 4096, 4096, 65536, 3 * MiB // 2, 11 * MiB]:
        data, digest = make_blob(size)
        (root / "blobs" / digest).write_bytes(data)
        blobs[digest] = data
    return World(root, store_config(root), blobs)


def restored_config(tmp_path: Path) -> Path:
    """A fresh store that imports land in: one folder, the default upload target."""
    return write_config(
        tmp_path / "restored.toml", [{"name": "restored", "kind": "fs", "path": str(tmp_path / "restored")}]
    )


async def run(spec: TransferSpec, config_path: Path, **options: Any) -> Snapshot:
    config = load_config(str(config_path), environ={})
    store = build_store(config)
    try:
        return await Transfer(spec, store, default_into=default_into(config, store), **options).run()
    finally:
        await store.wait_idle()
        await store.close()


async def assert_serves(config_path: Path, blobs: dict[str, bytes]) -> None:
    store: Composite = build_store(load_config(str(config_path), environ={}))
    try:
        for digest, data in blobs.items():
            assert await store.get(digest) == data
    finally:
        await store.close()


def export(target: str, hashes: list[str], **options: Any) -> TransferSpec:
    return TransferSpec("export", target=target, hashes=tuple(hashes), **options)


# -- round trips -------------------------------------------------------------------------


async def test_round_trip_through_a_bucket(world: World, bucket: Bucket, tmp_path: Path) -> None:
    url = bucket.url("backup/")
    # Less memory than two parts: parts must still flow (one at a time), never deadlock.
    spec = export(url, list(world.blobs), endpoint_url=bucket.endpoint, jobs=4, memory=6 * MiB, **PARTS)
    snap = await run(spec, world.config)
    assert (snap.state, snap.done, snap.failed, snap.total) == ("done", len(world.blobs), 0, len(world.blobs))
    assert snap.bytes == sum(map(len, world.blobs.values()))
    assert sorted(bucket.keys()) == sorted(f"backup/{h}" for h in world.blobs)
    for digest, data in world.blobs.items():
        assert bucket.get(f"backup/{digest}") == data
    large = next(h for h, d in world.blobs.items() if len(d) == 11 * MiB)
    head = bucket.client.head_object(Bucket=bucket.name, Key=f"backup/{large}")
    assert head["ETag"].endswith('-3"'), "11 MiB in 5 MiB parts: a 3-part upload"
    assert head["Metadata"]["casproxy-size"] == str(11 * MiB)
    assert bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []

    again = await run(spec, world.config)
    assert (again.done, again.skipped) == (0, len(world.blobs)), "what the bucket has is not sent again"

    restored = restored_config(tmp_path)
    snap = await run(TransferSpec("import", source=url, endpoint_url=bucket.endpoint), restored)
    assert (snap.state, snap.done, snap.corrupt, snap.ignored) == ("done", len(world.blobs), 0, 0)
    await assert_serves(restored, world.blobs)


async def test_round_trip_through_a_folder(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "exported"
    snap = await run(export(str(folder), list(world.blobs)), world.config)
    assert (snap.done, snap.failed) == (len(world.blobs), 0)
    assert sorted(os.listdir(folder)) == sorted(world.blobs), "one file per blob, no temp files left"
    for digest, data in world.blobs.items():
        assert (folder / digest).read_bytes() == data

    restored = restored_config(tmp_path)
    snap = await run(TransferSpec("import", source=str(folder)), restored)
    assert (snap.done, snap.failed, snap.corrupt) == (len(world.blobs), 0, 0)
    await assert_serves(restored, world.blobs)


async def test_round_trip_through_a_tar_file(world: World, tmp_path: Path) -> None:
    archive = tmp_path / "blobs.tar"
    spec = export(str(archive), list(world.blobs))
    assert (await run(spec, world.config)).done == len(world.blobs)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert members == world.blobs

    again = await run(spec, world.config)
    assert (again.done, again.skipped) == (0, len(world.blobs))
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted(world.blobs), "no member twice"

    restored = restored_config(tmp_path)
    snap = await run(TransferSpec("import", source=str(archive)), restored)
    assert (snap.done, snap.failed, snap.corrupt) == (len(world.blobs), 0, 0)
    await assert_serves(restored, world.blobs)


async def test_tar_file_cut_short_is_repaired_by_the_rerun(world: World, tmp_path: Path) -> None:
    """A kill mid-member leaves a partial member: the rerun cuts it off and writes it again."""
    archive = tmp_path / "blobs.tar"
    first = [h for h, d in world.blobs.items() if 0 < len(d) < MiB][:4]
    await run(export(str(archive), first), world.config)
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    with open(archive, "r+b") as file:
        file.truncate(last.offset_data + last.size // 2)

    snap = await run(export(str(archive), list(world.blobs)), world.config)
    assert (snap.done, snap.skipped, snap.failed) == (len(world.blobs) - 3, 3, 0)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        assert len(tar.getmembers()) == len(world.blobs)
    assert members == world.blobs


def test_round_trip_through_a_tar_stream(world: World, tmp_path: Path) -> None:
    """``casproxy export --to - | casproxy import --from -``."""
    restored = restored_config(tmp_path)
    hashes = world.hashes_file()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "proxy", "export", "-c", str(world.config), "--hashes", str(hashes), "--to", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=child_env(),
    )
    importer = subprocess.run(
        [sys.executable, "-m", "proxy", "import", "-c", str(restored), "--from", "-"],
        stdin=exporter.stdout,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env(),
        timeout=60,
    )
    assert exporter.stdout is not None and exporter.stderr is not None
    exporter.stdout.close()
    export_err = exporter.stderr.read().decode()
    assert exporter.wait(30) == 0, export_err
    assert importer.returncode == 0, importer.stderr
    assert f"export: done {len(world.blobs)}, skipped 0, failed 0, corrupt 0" in export_err
    assert f"import: done {len(world.blobs)}, skipped 0, failed 0, corrupt 0" in importer.stderr
    asyncio.run(assert_serves(restored, world.blobs))


def test_sigterm_stops_an_import_waiting_on_a_pipe(tmp_path: Path) -> None:
    """The archive's writer is still there but silent: a signal ends the import at once, with
    the summary, not when (if ever) the pipe delivers more."""
    restored = restored_config(tmp_path)
    data, digest = make_blob(3000)
    member = io.BytesIO()
    with tarfile.open(fileobj=member, mode="w") as tar:
        info = tarfile.TarInfo(digest)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    importer = subprocess.Popen(
        [sys.executable, "-m", "proxy", "import", "-c", str(restored), "--from", "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=child_env(),
    )
    assert importer.stdin is not None and importer.stderr is not None
    importer.stdin.write(member.getvalue()[: 512 + 3072])  # one member, then nothing more for now
    importer.stdin.flush()
    deadline = time.monotonic() + 30
    while not (tmp_path / "restored" / digest).exists():  # stored: the import is running, waiting
        if time.monotonic() > deadline or importer.poll() is not None:
            importer.kill()
            pytest.fail(f"the member was not imported: {importer.communicate()[1].decode()}")
        time.sleep(0.05)
    importer.send_signal(signal.SIGTERM)
    assert importer.wait(10) == 128 + signal.SIGTERM
    err = importer.stderr.read().decode()
    importer.stdin.close()
    assert "import: done 1, skipped 0, failed 0, corrupt 0" in err
    assert "Traceback" not in err


# -- bad data --------------------------------------------------------------------------------


def _source_with_bad_objects(kind: str, root: Path, bucket: Bucket | None) -> tuple[str, dict[str, bytes], str]:
    """A source holding good blobs (one in a sharded path), a corrupt one and a non-digest name."""
    good = dict(make_blob(size)[::-1] for size in (10, 5000, 2 * MiB))
    corrupt_digest = make_blob(300)[1]
    objects = {**{h: d for h, d in list(good.items())[:-1]}, corrupt_digest: b"not the bytes it is named for"}
    sharded = list(good)[-1]
    objects[f"{sharded[:2]}/{sharded}"] = good[sharded]
    objects["notes.txt"] = b"a file that is not a blob"
    if kind == "s3":
        assert bucket is not None
        for name, data in objects.items():
            bucket.put(f"src/{name}", data)
        return bucket.url("src/"), good, corrupt_digest
    if kind == "folder":
        for name, data in objects.items():
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "src" / name).write_bytes(data)
        return str(root / "src"), good, corrupt_digest
    with tarfile.open(root / "src.tar", "w") as tar:
        for name, data in objects.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(root / "src.tar"), good, corrupt_digest


@pytest.mark.parametrize("kind", ["s3", "folder", "tar"])
async def test_import_reports_corrupt_objects_and_other_names_and_stores_neither(
    kind: str, bucket: Bucket, tmp_path: Path
) -> None:
    source, good, corrupt = _source_with_bad_objects(kind, tmp_path, bucket)
    restored = restored_config(tmp_path)
    reported: list[str] = []
    spec = TransferSpec("import", source=source, endpoint_url=bucket.endpoint)
    snap = await run(spec, restored, report=reported.append)
    assert (snap.done, snap.corrupt, snap.ignored, snap.failed) == (len(good), 1, 1, 0)
    assert snap.state == "failed", "a corrupt object makes the run fail"
    assert any(line.startswith(corrupt) and "not stored" in line for line in reported), reported
    assert any(line.startswith("notes.txt") and "not a digest" in line for line in reported), reported
    assert list(snap.errors) == reported
    assert sorted(os.listdir(tmp_path / "restored")) == sorted(good), "neither the corrupt one nor notes.txt"
    await assert_serves(restored, good)


def test_import_command_exits_1_on_a_corrupt_object(
    bucket: Bucket, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, good, corrupt = _source_with_bad_objects("s3", tmp_path, bucket)
    restored = restored_config(tmp_path)
    status = main(["import", "-c", str(restored), "--from", source, "--endpoint-url", bucket.endpoint])
    err = capsys.readouterr().err
    assert status == 1
    assert f"casproxy: import: {corrupt}: bytes hash to" in err
    assert "casproxy: import: notes.txt: not a digest; not imported" in err
    assert f"import: done {len(good)}, skipped 0, failed 0, corrupt 1, ignored 1" in err


async def test_export_reports_what_it_cannot_read_and_goes_on(world: World, tmp_path: Path) -> None:
    missing = make_blob(77)[1]
    bad_data, bad = make_blob(5000)
    (world.root / "blobs" / bad).write_bytes(b"x" + bad_data[1:])  # the only copy is corrupt
    hashes = ["not-a-hash", missing, bad, *world.blobs]
    reported: list[str] = []
    snap = await run(export(str(tmp_path / "out"), hashes), world.config, report=reported.append)
    assert (snap.done, snap.failed + snap.corrupt, snap.total) == (len(world.blobs), 3, len(hashes))
    assert sorted(os.listdir(tmp_path / "out")) == sorted(world.blobs)
    assert f"{missing}: found in no tier" in reported
    assert any(line.startswith(f"{bad}: ") and "hash to" in line for line in reported), reported
    assert "not-a-hash: not a digest" in reported


def test_export_command_exit_status_and_summary(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = make_blob(78)[1]
    hashes = world.hashes_file([*world.blobs, missing])
    status = main(["export", "-c", str(world.config), "--hashes", str(hashes), "--to", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    assert f"casproxy: export: {missing}: found in no tier" in err
    assert f"export: done {len(world.blobs)}, skipped 0, failed 1, corrupt 0" in err
    assert "run the same command again to retry them" in err

    hashes = world.hashes_file()
    assert main(["export", "-c", str(world.config), "--hashes", str(hashes), "--to", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"export: done {len(world.blobs)} ({len(world.blobs)} by an earlier run)" in err
    assert "Traceback" not in err


# -- pausing -------------------------------------------------------------------------------------


async def test_cancelled_export_resumes_with_only_what_is_left(world: World, bucket: Bucket, tmp_path: Path) -> None:
    """What a job API's pause/resume does: cancel the task, later run the same spec again."""
    many = {}
    for seed in range(150):
        data, digest = make_blob(2000, seed=10_000 + seed)
        (world.root / "blobs" / digest).write_bytes(data)
        many[digest] = data
    checkpoint = tmp_path / "export.sqlite"
    async with fault_proxy_before(bucket.endpoint) as (proxy, endpoint):
        # The bucket holds every PUT past the 40th: the cancel always lands mid-run, however
        # fast or slow the machine is.
        proxy.hung_puts = {f"p/{digest}" for digest in list(many)[40:]}
        spec = export(bucket.url("p/"), list(many), endpoint_url=endpoint, jobs=2, checkpoint=str(checkpoint))
        config = load_config(str(world.config), environ={})
        store = build_store(config)
        transfer = Transfer(spec, store)
        task = asyncio.create_task(transfer.run())
        while transfer.snapshot().done < 20:  # noqa: ASYNC110 - watching progress as a job API would
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        paused = transfer.snapshot()
        assert paused.state == "cancelled" and 20 <= paused.done <= 40
        assert checkpoint.exists()
        await store.close()

        proxy.hung_puts.clear()
        snap = await run(spec, world.config)
    assert snap.state == "done"
    assert snap.resumed >= paused.done, "work recorded before the pause is not redone"
    assert snap.done + snap.skipped == len(many)
    assert sorted(bucket.keys()) == sorted(f"p/{h}" for h in many)
    assert not checkpoint.exists(), "a finished transfer leaves no checkpoint behind"


# -- mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "--hashes", "{hashes}", "--to", "gs://b/p/"], "unsupported location"),
        (["export", "--hashes", "{hashes}", "--to", "out.tar.gz"], "compressed archives are not supported"),
        (["export", "--hashes", "missing.txt", "--to", "out/"], "missing.txt: no such file"),
        (["export", "--hashes", "{hashes}", "--to", "{not_a_tar}"], "is not a tar archive"),
        (["export", "--hashes", "{hashes}", "--to", "s3://no-such-bucket/p/"], "no such bucket"),
        (["export", "--hashes", "{hashes}", "--to", "out/", "--part-size", "1MiB"], "at least 5 MiB"),
        (["import", "--from", "nowhere/"], "no such folder"),
        (["import", "--from", "x/", "--into", "nope"], "no such tier"),
        (["import", "--from", "x/", "--into", "disk", "--checkpoint", "{not_a_tar}"], "checkpoint"),
    ],
)
def test_mistakes_exit_2_with_one_line(
    world: World,
    bucket: Bucket,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    not_a_tar = tmp_path / "notes.tar"
    not_a_tar.write_text("precious notes, not an archive\n")
    names = {"hashes": str(world.hashes_file()), "not_a_tar": str(not_a_tar)}
    argv = [arg.format(**names) for arg in args] + ["-c", str(world.config), "--endpoint-url", bucket.endpoint]
    # A status line is due every --progress-interval seconds; on a loaded machine the mistake may be
    # found only after the first one, which is right for a user but not what this test looks at.
    argv += ["--progress-interval", "3600"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not_a_tar.read_text() == "precious notes, not an archive\n", "never touched"


def test_spec_is_json_and_checked() -> None:
    spec = TransferSpec("export", target="s3://b/p/", hashes=("a" * 40,), jobs=3, part_size=8 * MiB)
    assert TransferSpec.from_json(spec.as_json()) == spec
    assert TransferSpec.from_json({"kind": "import", "source": "x/", "part_size": "32 MiB"}).part_size == 32 * MiB
    mistakes: list[tuple[dict[str, Any], str]] = [
        ({"kind": "export", "target": "x/"}, "hashes"),
        ({"kind": "import"}, "source"),
        ({"kind": "import", "source": "x/", "jobs": 0}, "jobs"),
        ({"kind": "import", "source": "x/", "speed": 1}, "speed"),
        ({"kind": "sideways", "source": "x/"}, "kind"),
    ]
    for bad, word in mistakes:
        with pytest.raises(UsageError, match=word):
            TransferSpec.from_json(bad)
    assert parse_location("s3://b/deep/prefix").identity == "s3://b/deep/prefix/"
    assert parse_location("-").resumable is False


# -- progress ------------------------------------------------------------------------------------


def test_progress_line_summary_and_bar() -> None:
    tally = Tally("export")
    tally.total = 10
    for _ in range(3):
        meter = tally.meter(1000)
        meter.moved(1000)
        tally.release(meter)
        tally.finished("done", 1000)
    tally.finished("skipped")
    tally.error("failed", "abc: found in no tier")
    snap = tally.snapshot("running")
    assert (snap.processed, snap.bytes, snap.error_count) == (5, 3000, 1)
    assert snap.eta_s is not None and snap.eta_s > 0, "5 left at the rate so far"
    assert snap.as_json()["errors"] == ["abc: found in no tier"]
    assert status_line(snap).startswith("export: 5/10 blobs, 2.9 KiB of ~7.8 KiB, "), "5 left at 1000 bytes each"
    assert "(skipped 1, failed 1)" in status_line(snap)
    assert summary_line(snap).startswith("export: done 3, skipped 1, failed 1, corrupt 0; 2.9 KiB this run in ")

    lines = io.StringIO()
    view = ProgressView(lines, interval=0, tty=False)
    view.update(snap)
    view.close(tally.snapshot("done"))
    assert lines.getvalue().splitlines()[0] == status_line(snap)
    assert lines.getvalue().splitlines()[1].startswith("export: done 3")

    terminal = io.StringIO()
    bar = ProgressView(terminal, tty=True)
    bar.update(snap)
    bar.message("casproxy: export: abc: found in no tier")
    bar.close(snap)
    assert "5/10 blobs" in terminal.getvalue() and "eta" in terminal.getvalue()
    assert "casproxy: export: abc: found in no tier\n" in terminal.getvalue()
    unknown = io.StringIO()
    ProgressView(unknown, tty=True).update(Tally("import").snapshot("running"))  # no total yet
    assert "import: 0/? blobs" in unknown.getvalue()


def test_progress_is_weighted_by_bytes_and_the_bar_is_gone_before_the_summary() -> None:
    tally = Tally("import")
    tally.total, tally.total_bytes = 2001, 2000 * 1024 + 300 * MiB  # as an import's listing says
    for _ in range(2000):
        tally.finished("done", 1024)
    big = tally.meter(300 * MiB)
    big.moved(150 * MiB)
    snap = tally.snapshot("running")
    assert snap.fraction is not None and 0.49 < snap.fraction < 0.51, "half the bytes, not 2000 of 2001 items"

    estimated = Tally("export")  # sizes unknown up front: the items not started weigh the average
    estimated.total = 4
    estimated.finished("done", 10, resumed=True)
    meter = estimated.meter(30)
    meter.moved(30)
    estimated.release(meter)
    estimated.finished("done", 30)
    assert estimated.snapshot("running").total_bytes == 80

    terminal = io.StringIO()
    view = ProgressView(terminal, tty=True)
    view.update(snap)
    assert " 50%|" in terminal.getvalue()
    view.close(tally.snapshot("done"))
    last = terminal.getvalue().rsplit("\r", 1)[-1]
    assert last.startswith("import: done 2000, "), "the summary starts on a line the bar has left"
    assert "of ~" not in last and last.endswith("\n")


async def test_byte_budget_is_first_come_first_served() -> None:
    budget = ByteBudget(10)
    assert await budget.take(6) == 6
    big = asyncio.create_task(budget.take(50))  # more than the whole budget: cut down to it
    await asyncio.sleep(0)
    small = asyncio.create_task(budget.take(1))  # fits, but waits its turn behind big
    await asyncio.sleep(0)
    assert not big.done() and not small.done()
    budget.give(6)
    assert await big == 10
    await asyncio.sleep(0)
    assert not small.done()
    budget.give(10)
    assert await small == 1 and budget.used == 1


def test_checkpoint_default_is_per_location(world: World) -> None:
    config = load_config(str(world.config), environ={})
    store = build_store(config)
    state = str(world.root / "state")
    paths = set()
    for target in ["s3://b/p/", "s3://b/p", "./out", "out/", "x.tar"]:
        spec = export(target, ["a" * 40])
        paths.add(checkpoint_path(spec, parse_location(target), state))
    assert len(paths) == 3, paths
    assert all(str(path).startswith(str(world.root / "state" / "transfers")) for path in paths)
    assert checkpoint_path(export("-", ["a" * 40]), parse_location("-"), state) is None, "a stream cannot be resumed"
    # A target keeps its checkpoint whichever other targets a run names: each resumes on its own.
    both = TransferSpec("export", targets=("s3://b/p/", "x.tar"), hashes=("a" * 40,))
    assert checkpoint_path(both, parse_location("s3://b/p"), state) in paths
    assert state_dir(store) == str(world.root / "cache"), "the disk cache's folder"
    named = TransferSpec("export", targets=("s3://b/p/", "x.tar"), hashes=("a" * 40,), checkpoint="/c/run.sqlite")
    apart = {checkpoint_path(named, parse_location(t), state) for t in named.targets}
    assert len(apart) == 2 and all(str(p).startswith("/c/run-") and str(p).endswith(".sqlite") for p in apart)


def test_hashes_file_takes_sha1sum_output(world: World, tmp_path: Path) -> None:
    listing = tmp_path / "sums.txt"
    listing.write_text("# made by sha1sum\n\n" + "".join(f"{h}  blobs/{h}\n" for h in world.blobs))
    spec = TransferSpec("export", target=str(tmp_path / "out"), hashes_file=str(listing))
    snap = asyncio.run(run(spec, world.config))
    assert (snap.total, snap.done) == (len(world.blobs), len(world.blobs))
    assert hashlib.sha1((tmp_path / "out" / next(iter(world.blobs))).read_bytes()).hexdigest() == next(
        iter(world.blobs)
    )


async def test_an_export_to_two_targets_does_not_fill_the_disk_cache(world: World, tmp_path: Path) -> None:
    spec = TransferSpec(
        "export", targets=(str(tmp_path / "one"), str(tmp_path / "two.tar")), hashes=tuple(world.blobs), **PARTS
    )
    snap = await run(spec, world.config)
    assert (snap.done, snap.failed, len(snap.targets)) == (2 * len(world.blobs), 0, 2)
    assert [(part.location, part.state, part.done) for part in snap.targets] == [
        (str(tmp_path / "one"), "done", len(world.blobs)),
        (str(tmp_path / "two.tar"), "done", len(world.blobs)),
    ]
    assert {path.name: path.read_bytes() for path in (tmp_path / "one").iterdir()} == world.blobs
    store = build_store(load_config(str(world.config), environ={}))
    try:
        await store.start()
        disk = store.tier("disk")
        assert [await disk.stat(Digest(digest)) for digest in world.blobs] == [None] * len(world.blobs), (
            "no hot blob pushed out"
        )
    finally:
        await store.close()
