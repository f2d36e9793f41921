"""Unit tests of the disk tier's modules: the hot cache, the purge generation, checksums, the
index, checked reads, eviction's access times and crash recovery, each on its own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.digest import Digest
from proxy.errors import CorruptBlob
from proxy.tiers.disk import integrity, recovery, reserve
from proxy.tiers.disk.eviction import AccessTimes, make_room
from proxy.tiers.disk.generation import Generation
from proxy.tiers.disk.hot import HotCache
from proxy.tiers.disk.index import Index
from proxy.tiers.disk.reads import READ_LIMIT, CheckedReads, LargeEntry
from tests.conftest import make_blob


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_hot_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    hot = HotCache(limit=300, item_limit=200)
    hot.add("a", b"a" * 100, 0)
    hot.add("b", b"b" * 100, 0)
    hot.add("big", b"x" * 201, 0)  # over the item limit: never kept
    assert hot.get("a") == b"a" * 100  # a is now the most recently used
    hot.add("c", b"c" * 150, 0)
    assert hot.get("b") is None and hot.get("a") is not None and hot.get("c") is not None
    assert hot.get("big") is None
    assert hot.size == 250


def test_hot_cache_refuses_what_was_read_before_a_purge() -> None:
    hot = HotCache(limit=1000, item_limit=1000)
    hot.add("a", b"old", 0)
    hot.clear(1)  # a purge happened
    assert hot.get("a") is None and hot.size == 0
    hot.add("a", b"old", 0)  # a read that began before the purge ends after it
    assert hot.get("a") is None
    hot.add("a", b"new", 1)
    assert hot.get("a") == b"new"


def test_hot_cache_keeps_its_size_right_under_threads() -> None:
    hot = HotCache(limit=50_000, item_limit=1000)
    blobs = [(str(n), bytes(100 + n % 7)) for n in range(2000)]

    def churn(offset: int) -> None:
        for key, data in blobs[offset::4]:
            hot.add(key, data, 0)
            hot.get(blobs[(int(key) * 7) % len(blobs)][0])
            if int(key) % 5 == 0:
                hot.discard(key)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [data for key, data in blobs if hot.get(key) is not None]
    assert hot.size == sum(len(data) for data in held) <= hot.limit


def test_a_generation_bump_is_seen_by_every_mapping_of_the_folder(tmp_path: Path) -> None:
    mine, theirs = Generation(str(tmp_path)), Generation(str(tmp_path))
    try:
        assert mine.current() == theirs.current() == 0
        theirs.bump()
        assert mine.current() == 1
        # Another process, through its own mapping of the same file.
        script = "import sys; from proxy.tiers.disk.generation import Generation; Generation(sys.argv[1]).bump()"
        subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
        assert mine.current() == 2
    finally:
        mine.close()
        theirs.close()


def test_checksums_of_bytes_and_files_agree_and_see_one_flipped_bit(tmp_path: Path) -> None:
    data, digest = make_blob(3 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with path.open("rb") as file:
        assert integrity.file_checksum(file.fileno(), len(data)) == integrity.checksum(data)
        assert integrity.legacy_checksum(Digest(digest), None, file.fileno(), len(data)) == integrity.checksum(data)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    assert integrity.checksum(bytes(flipped)) != integrity.checksum(data)
    assert integrity.legacy_checksum(Digest(digest), bytes(flipped), None, len(data)) is None
    with path.open("rb") as file:  # a truncated file does not match either
        assert integrity.file_checksum(file.fileno(), len(data) + 1) != integrity.checksum(data)


def test_index_keeps_checksums_and_names_files_by_their_writer(tmp_path: Path) -> None:
    index = Index(str(tmp_path), size_limit=1 << 30, file_threshold=1000)
    try:
        small, small_digest = make_blob(100)
        large, large_digest = make_blob(5000)
        index.set_bytes(small_digest, small, "s")
        spooled = tmp_path / "spooled"
        spooled.write_bytes(large)
        index.set_file(large_digest, str(spooled), "l")
        assert index.get(small_digest) == (small, "s")
        found = index.get(large_digest)
        assert found is not None and found[1] == "l" and not isinstance(found[0], bytes)
        found[0].close()
        [name] = index.files()
        assert os.path.basename(name).startswith(f"{os.getpid()}-")
        index.set_checksum(small_digest, "t")
        assert index.get(small_digest) == (small, "t")
        assert sorted(index.digests()) == sorted([small_digest, large_digest])
        assert index.count() == 2 and index.volume() > 5100
        assert index.delete(small_digest) and not index.delete(small_digest)
        assert index.get(small_digest) is None
    finally:
        index.close()


def test_make_room_evicts_least_recent_first_and_gives_up_when_nothing_is_left(tmp_path: Path) -> None:
    index = Index(str(tmp_path), size_limit=1 << 30, file_threshold=1 << 20)
    try:
        for key in ("a", "b", "c"):
            index.set_bytes(key, bytes(10_000), "x")
            time.sleep(0.01)  # distinct store times: the LRU order
        index.touch(["a"])  # a hit: a is the most recently used now
        evicted: list[str] = []
        base = index.volume() - 30_000
        fits = make_room(
            index,
            str(tmp_path),
            incoming=10_000,
            new_bytes=0,
            size_limit=base + 25_000,
            min_free=0,
            evicted=evicted.append,
        )
        assert fits and evicted == ["b", "c"]
        # More than even an empty cache could take: nothing is evicted for it.
        assert not make_room(
            index, str(tmp_path), incoming=1 << 40, new_bytes=0, size_limit=base, min_free=0, evicted=evicted.append
        )
        assert not make_room(
            index, str(tmp_path), incoming=0, new_bytes=1 << 60, size_limit=1 << 30, min_free=0, evicted=evicted.append
        )
        assert index.count() == 1
        # What fits once the others are gone makes them go.
        limit = base + 20_000
        assert make_room(
            index, str(tmp_path), incoming=20_000, new_bytes=0, size_limit=limit, min_free=0, evicted=evicted.append
        )
        assert evicted == ["b", "c", "a"] and index.count() == 0
    finally:
        index.close()


def test_access_times_are_taken_once() -> None:
    access = AccessTimes()
    access.record("a")
    access.record("a")
    access.record("b")
    assert access.take() == {"a", "b"}
    assert access.take() == set()


def test_claiming_the_spool_removes_only_folders_of_gone_processes(tmp_path: Path) -> None:
    spool = tmp_path / recovery.SPOOL_DIR
    gone, alive = spool / str(dead_pid()), spool / str(os.getppid())
    for folder in (gone, alive):
        folder.mkdir(parents=True)
        (folder / "spool-x").write_bytes(b"partial")
    (spool / "spool-old-layout").write_bytes(b"partial")
    mine = recovery.claim_spool(str(tmp_path))
    assert mine == str(spool / str(os.getpid()))
    assert sorted(p.name for p in spool.iterdir()) == sorted([alive.name, str(os.getpid())])


def test_the_sweep_removes_torn_entries_of_gone_writers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = Index(str(tmp_path), size_limit=1 << 30, file_threshold=10)
    try:
        data, digest = make_blob(1000)
        index.set_bytes(digest, data, "x")  # a committed entry: a file the index knows
        [known] = index.files()
        folder = tmp_path / os.path.dirname(known)
        torn = folder / f"{dead_pid()}-aaaa.val"  # linked in, then its writer was killed
        in_flight = folder / f"{os.getppid()}-bbbb.val"  # a live writer about to commit
        mine_before = folder / f"{os.getpid()}-cccc.val"  # a dead namesake's, before we started
        legacy = folder / "dddd.val"  # no pid: an older version's, recent
        for path in (torn, in_flight, mine_before, legacy):
            path.write_bytes(b"torn")
        started = time.time() + 1
        removed = recovery.sweep_torn(index, started)
        assert sorted(removed) == sorted([str(torn), str(mine_before)])
        assert (tmp_path / known).exists() and in_flight.exists() and legacy.exists()
        monkeypatch.setattr(recovery, "LEGACY_GRACE", -1.0)  # ctime cannot be set back: "old enough"
        assert recovery.sweep_torn(index, started) == [str(legacy)]
        assert (tmp_path / known).exists() and in_flight.exists()
    finally:
        index.close()


def test_checked_reads_serve_only_bytes_matching_their_checksum(tmp_path: Path) -> None:
    index = Index(str(tmp_path), size_limit=1 << 30, file_threshold=1000)
    hot, access, removals = HotCache(1 << 20, 2000), AccessTimes(), []
    reads = CheckedReads("disk", index, hot, access, lambda: removals.append(1))
    try:
        (small, small_digest), (large, large_digest) = make_blob(500), make_blob(5000)
        index.set_bytes(small_digest, small, integrity.checksum(small))
        assert reads.read(Digest(small_digest), hot.generation) == small
        assert hot.get(small_digest) == small and access.take() == {small_digest}

        spooled = tmp_path / "spooled"
        spooled.write_bytes(large)
        index.set_file(large_digest, str(spooled), integrity.checksum(large))
        entry = reads.read(Digest(large_digest), hot.generation)  # over the hot item limit
        assert isinstance(entry, LargeEntry) and entry.size == len(large)
        reads.check_copy(Digest(large_digest), os.dup(entry.file.fileno()), entry)
        with pytest.raises(CorruptBlob):
            reads.check_copy(Digest(large_digest), os.dup(entry.file.fileno()), replace(entry, checksum="0" * 16))
        entry.file.close()
        assert index.get(large_digest) is None and reads.corrupt == 1

        index.set_bytes(small_digest, small, "0" * 16)  # bytes that no longer match
        hot.discard(small_digest)
        with pytest.raises(CorruptBlob):
            reads.read(Digest(small_digest), hot.generation)
        assert index.get(small_digest) is None and hot.get(small_digest) is None
        assert reads.corrupt == 2 and len(removals) == 2
    finally:
        index.close()


def test_a_large_entry_that_fits_memory_is_kept_by_the_check_that_goes_with_its_send(tmp_path: Path) -> None:
    """Sent by sendfile the first time (over READ_LIMIT); the check's one read keeps it in the
    hot cache, so its next hit is answered from memory. A corrupt one is not kept."""
    index = Index(str(tmp_path), size_limit=1 << 30, file_threshold=1000)
    hot, access = HotCache(8 << 20, 2 << 20), AccessTimes()
    reads = CheckedReads("disk", index, hot, access, lambda: None)
    try:
        for number, corrupt in enumerate((False, True)):
            data, digest = make_blob(READ_LIMIT + 1000 + number)
            spooled = tmp_path / f"spooled-{number}"
            spooled.write_bytes(data)
            index.set_file(digest, str(spooled), integrity.checksum(data))
            entry = reads.read(Digest(digest), hot.generation)
            assert isinstance(entry, LargeEntry) and hot.get(digest) is None
            if corrupt:
                entry = replace(entry, checksum="0" * 16)
                with pytest.raises(CorruptBlob):
                    reads.check_copy(Digest(digest), os.dup(entry.file.fileno()), entry)
            else:
                reads.check_copy(Digest(digest), os.dup(entry.file.fileno()), entry)
            entry.file.close()
            assert hot.get(digest) == (None if corrupt else data)
    finally:
        index.close()


def test_a_reserve_that_cannot_be_made_is_done_without(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No inode, no permission (here: a folder in the reserve's place): the disk tier goes on
    without its reserve, with a warning, rather than failing to start or to delete."""
    (tmp_path / reserve.FILE).mkdir()
    with caplog.at_level(logging.WARNING):
        assert reserve.restore(str(tmp_path)) is False
    assert "cannot keep the" in caplog.text
