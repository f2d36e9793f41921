"""The durable queue that copies uploads into the upload targets after the first.

Each pending copy is a row (digest, target) in SQLite plus one verified file per digest in the
queue's own folder, so neither a restart nor the disk cache's evictions can lose queued work.
A failing target is retried with exponential backoff, forever: work is never dropped silently.

Several processes (workers) may share one queue: a copy is leased to one of them while it runs,
and the file and its rows change together under SQLite's write lock, so no worker deletes a
file another has just queued again.

A copy that a target makes as a multipart upload (S3, for large blobs) notes the upload in its
row before the first part is sent. If the copy ends without completing it (it failed, the
server stopped, or its process was killed), the upload moves to ``abandoned`` and is aborted:
an incomplete upload would otherwise be kept (and billed) by the bucket forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.blocking import run
from proxy.database import Database
from proxy.digest import Digest
from proxy.liveness import orphans, temp_prefix, writer_gone
from proxy.tier import FilePayload, Payload, Tier

log = logging.getLogger(__name__)
MAX_BACKOFF = 300.0  # seconds: a target that is down for hours is still tried every 5 minutes
_TEMP = ".tmp-"  # a copy being written: ".tmp-<pid>-<digest>-<random>", renamed to "<digest>" when queued
LEASE = 300.0  # seconds a copy in progress is hidden from other workers; a dead holder's comes back at start
# Who holds a lease: the pid and a token of this run of the program (a restarted container's new
# process often gets the dead one's pid; the token tells them apart). Forked workers share the
# token but not the pid.
_RUN = secrets.token_hex(8)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    digest TEXT NOT NULL,
    target TEXT NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    holder TEXT NOT NULL DEFAULT '',
    upload TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (digest, target)
);
CREATE TABLE IF NOT EXISTS abandoned (
    target TEXT NOT NULL,
    digest TEXT NOT NULL,
    upload TEXT NOT NULL,
    next_try REAL NOT NULL,
    PRIMARY KEY (target, upload)
);
"""
_ABORT_RETRY = 60.0  # seconds before aborting an abandoned upload is tried again


class ReplicationQueue:
    def __init__(self, directory: str, targets: Mapping[str, Tier], concurrency: int = 4) -> None:
        self.directory = os.path.abspath(directory)
        self.blob_dir = os.path.join(self.directory, "blobs")
        self.targets = dict(targets)
        self.concurrency = concurrency
        self.replicated = 0
        self.failures = 0
        self.database = Database(os.path.join(self.directory, "queue.sqlite3"), _SCHEMA, "replication")
        self._wake = asyncio.Event()
        self._leased: set[tuple[str, str]] = set()  # copies this process is making now
        self._worker: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await run(self._prepare_folder)
        await self.database.open()
        await self.database.run(self._reclaim_leases)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="replication")

    def _reclaim_leases(self) -> None:
        """Copies leased by a process that is gone (killed mid-copy) are due again now, not when
        their lease runs out, and their uploads abandoned. A queue written by an earlier version
        gets the holder and upload columns."""
        with self.database.transaction() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(pending)")}
            for column in ("holder", "upload"):
                if column not in columns:
                    db.execute(f"ALTER TABLE pending ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
            holders = [row[0] for row in db.execute("SELECT DISTINCT holder FROM pending WHERE holder != ''")]
            gone = [holder for holder in holders if _holder_gone(holder)]
            for holder in gone:
                _give_back(db, "holder = ?", (holder,))
        if gone:
            log.info("replication: took back the copies of %d worker(s) that died mid-copy", len(gone))

    def _prepare_folder(self) -> None:
        os.makedirs(self.blob_dir, mode=0o700, exist_ok=True)
        # Temp files of an enqueue that crashed before its commit hold nothing anyone waits for.
        for path in orphans(self.blob_dir, _TEMP):
            with contextlib.suppress(FileNotFoundError):  # another worker starting removed it first
                os.unlink(path)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self.database.is_open:
            # On the database's thread, after a lease the cancelled worker may still be taking there.
            await self.database.run(self._release_leases)
        await self.database.close()

    # -- producing -----------------------------------------------------------------------

    async def enqueue(self, digest: Digest, payload: Payload, targets: list[str]) -> None:
        """Keep a copy of the blob and remember to put it into each target."""
        if targets:
            await self.database.run(self._enqueue, digest, payload, targets)
            self._wake.set()

    def _enqueue(self, digest: Digest, payload: Payload, targets: list[str]) -> None:
        # The copy is written outside the lock; renaming it and adding its rows happen together.
        # Unique per call too: two queues of one process may copy the same blob at once.
        temp = os.path.join(self.blob_dir, f"{temp_prefix(_TEMP)}{digest}-{secrets.token_hex(4)}")
        source = payload.open()
        if source is None:
            with open(temp, "wb") as out:
                out.write(payload.data or b"")
        else:
            with source, open(temp, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        with self.database.transaction() as db:
            os.replace(temp, os.path.join(self.blob_dir, digest))
            db.executemany(
                "INSERT OR IGNORE INTO pending (digest, target, size, next_try) VALUES (?, ?, ?, ?)",
                [(str(digest), target, payload.size, time.time()) for target in targets],
            )

    # -- consuming -----------------------------------------------------------------------

    async def depth(self) -> int:
        rows = await self.database.query("SELECT COUNT(*) FROM pending")
        return int(rows[0][0])

    async def pending(self) -> list[dict[str, Any]]:
        rows = await self.database.query(
            "SELECT digest, target, attempts, next_try, last_error FROM pending ORDER BY next_try"
        )
        return [dict(row) for row in rows]

    async def _work(self) -> None:
        while True:
            await self._abort_abandoned()
            due, wait = await self.database.run(self._due)
            if due:
                await asyncio.gather(*(self._replicate(*row) for row in due))
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    def _due(self) -> tuple[list[tuple[str, str, int, int]], float]:
        now = time.time()
        with self.database.transaction() as db:
            rows = db.execute(
                "SELECT digest, target, size, attempts FROM pending WHERE next_try <= ? ORDER BY next_try LIMIT ?",
                (now, self.concurrency),
            ).fetchall()
            db.executemany(
                "UPDATE pending SET next_try = ?, holder = ? WHERE digest = ? AND target = ?",
                [(now + LEASE, _holder(), digest, target) for digest, target, _, _ in rows],
            )
            upcoming = db.execute(
                "SELECT MIN(due) FROM (SELECT MIN(next_try) AS due FROM pending "
                "UNION ALL SELECT MIN(next_try) FROM abandoned)"
            ).fetchone()[0]
        self._leased.update((digest, target) for digest, target, _, _ in rows)
        wait = MAX_BACKOFF if upcoming is None else max(0.05, min(MAX_BACKOFF, upcoming - now))
        return rows, wait

    def _release_leases(self) -> None:
        """Copies interrupted by a shutdown are due again at once, not after their lease."""
        if not self._leased:
            return
        with self.database.transaction() as db:
            for digest, target in self._leased:
                _give_back(db, "digest = ? AND target = ?", (digest, target))
        self._leased.clear()

    async def _replicate(self, digest: str, target: str, size: int, attempts: int) -> None:
        await self._copy(digest, target, size, attempts)
        self._leased.discard((digest, target))  # not when cancelled: close() gives it back

    async def _copy(self, digest: str, target: str, size: int, attempts: int) -> None:
        path = os.path.join(self.blob_dir, digest)
        tier = self.targets.get(target)
        try:
            if tier is None:
                raise LookupError(f"no tier named {target!r} in the current config")
            if await self.database.run(os.path.getsize, path) != size:
                raise OSError(f"queued copy of {digest} has the wrong size")  # never store a torn copy
            await tier.put_noting_uploads(Digest(digest), FilePayload(path, size), self._noter(digest, target))
        except Exception as error:  # noqa: BLE001 - any failure is retried later, never dropped
            self.failures += 1
            delay = min(MAX_BACKOFF, 0.5 * 2**attempts)
            log.warning(
                "replicating %s to %s failed (attempt %d, next in %.1fs): %r",
                digest,
                target,
                attempts + 1,
                delay,
                error,
            )
            await self.database.run(self._retry_later, digest, target, delay, repr(error))
            return
        self.replicated += 1
        await self.database.run(self._done, digest, target)

    def _noter(self, digest: str, target: str) -> Callable[[str], None]:
        """What the target calls, in its thread, as it begins a multipart upload of this copy."""
        holder = _holder()

        def note(upload_id: str) -> None:
            self.database.run_from_thread(self._note, digest, target, holder, upload_id)

        return note

    def _note(self, digest: str, target: str, holder: str, upload_id: str) -> None:
        with self.database.transaction() as db:
            db.execute(
                "UPDATE pending SET upload = ? WHERE digest = ? AND target = ? AND holder = ?",
                (upload_id, digest, target, holder),
            )

    def _retry_later(self, digest: str, target: str, delay: float, error: str) -> None:
        with self.database.transaction() as db:
            # boto3 aborts the upload of a failed copy itself, unless the target failed that too.
            _give_back(db, "digest = ? AND target = ?", (digest, target))
            db.execute(
                "UPDATE pending SET attempts = attempts + 1, next_try = ?, last_error = ? "
                "WHERE digest = ? AND target = ?",
                (time.time() + delay, error[:500], digest, target),
            )

    async def _abort_abandoned(self) -> None:
        """Abort the due uploads of copies that ended without completing them."""
        rows = await self.database.query(
            "SELECT target, digest, upload FROM abandoned WHERE next_try <= ? LIMIT ?", (time.time(), self.concurrency)
        )
        for target, digest, upload in rows:
            tier = self.targets.get(target)
            try:
                if tier is None:
                    raise LookupError(f"no tier named {target!r} in the current config")
                await tier.abort_upload(Digest(digest), upload)
            except Exception as error:  # noqa: BLE001 - retried later, never dropped
                log.warning("aborting the abandoned upload of %s to %s failed: %r", digest, target, error)
                await self.database.run(self._abort_later, target, upload)
            else:
                log.info("replication: aborted the unfinished upload of %s to %s", digest, target)
                await self.database.run(self._aborted, target, upload)

    def _abort_later(self, target: str, upload: str) -> None:
        with self.database.transaction() as db:
            db.execute(
                "UPDATE abandoned SET next_try = ? WHERE target = ? AND upload = ?",
                (time.time() + _ABORT_RETRY, target, upload),
            )

    def _aborted(self, target: str, upload: str) -> None:
        with self.database.transaction() as db:
            db.execute("DELETE FROM abandoned WHERE target = ? AND upload = ?", (target, upload))

    def _done(self, digest: str, target: str) -> None:
        with self.database.transaction() as db:
            db.execute("DELETE FROM pending WHERE digest = ? AND target = ?", (digest, target))
            left = db.execute("SELECT COUNT(*) FROM pending WHERE digest = ?", (digest,)).fetchone()[0]
            if not left:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.blob_dir, digest))


def _give_back(db: sqlite3.Connection, where: str, params: tuple[str, ...]) -> None:
    """The copies ``where`` selects are due now and leased to nobody; an upload one of them noted
    is abandoned (to be aborted). On the database's thread, in a transaction."""
    now = time.time()
    db.execute(
        "INSERT OR IGNORE INTO abandoned (target, digest, upload, next_try) "
        f"SELECT target, digest, upload, ? FROM pending WHERE upload != '' AND {where}",
        (now, *params),
    )
    db.execute(f"UPDATE pending SET next_try = ?, holder = '', upload = '' WHERE {where}", (now, *params))


def _holder() -> str:
    return f"{os.getpid()}:{_RUN}"


def _holder_gone(holder: str) -> bool:
    """True if the process that leased a copy no longer runs (it was killed mid-copy)."""
    pid, _, _ = holder.partition(":")
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return holder != _holder()  # our pid with an earlier run's token: that run is gone
    return writer_gone(int(pid))
