"""The durable queue that copies uploads into the upload targets after the first.

Each pending copy is a row (digest, target) in SQLite plus one verified file per digest in the
queue's own folder, so neither a restart nor the disk cache's evictions can lose queued work.
A failing target is retried with exponential backoff, forever: work is never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from proxy.digest import Digest
from proxy.tier import FilePayload, Payload, Tier

log = logging.getLogger(__name__)
MAX_BACKOFF = 300.0  # seconds: a target that is down for hours is still tried every 5 minutes
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    digest TEXT NOT NULL,
    target TEXT NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (digest, target)
)
"""


class ReplicationQueue:
    def __init__(self, directory: str, targets: Mapping[str, Tier], concurrency: int = 4) -> None:
        self.directory = os.path.abspath(directory)
        self.blob_dir = os.path.join(self.directory, "blobs")
        self.targets = dict(targets)
        self.concurrency = concurrency
        self.replicated = 0
        self.failures = 0
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="replication")  # one SQLite writer
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self._run(self._open)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="replication")

    def _open(self) -> None:
        os.makedirs(self.blob_dir, mode=0o700, exist_ok=True)
        self._db = sqlite3.connect(os.path.join(self.directory, "queue.sqlite3"), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()
        # Temp files of an enqueue that crashed before its commit hold nothing anyone waits for.
        for name in os.listdir(self.blob_dir):
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(self.blob_dir, name))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._db is not None:
            await self._run(self._db.close)
        self._executor.shutdown(wait=False)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "queue not started"
        return self._db

    # -- producing -----------------------------------------------------------------------

    async def enqueue(self, digest: Digest, payload: Payload, targets: list[str]) -> None:
        """Keep a copy of the blob and remember to put it into each target."""
        if targets:
            await self._run(self._enqueue, digest, payload, targets)
            self._wake.set()

    def _enqueue(self, digest: Digest, payload: Payload, targets: list[str]) -> None:
        path = os.path.join(self.blob_dir, digest)
        if not os.path.exists(path):
            temp = os.path.join(self.blob_dir, f".tmp-{digest}-{os.getpid()}")
            source = payload.open()
            if source is None:
                with open(temp, "wb") as out:
                    out.write(payload.data or b"")
            else:
                with source, open(temp, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            os.replace(temp, path)
        with self.db:
            self.db.executemany(
                "INSERT OR IGNORE INTO pending (digest, target, size, next_try) VALUES (?, ?, ?, ?)",
                [(str(digest), target, payload.size, time.time()) for target in targets],
            )

    # -- consuming -----------------------------------------------------------------------

    async def depth(self) -> int:
        return int(await self._run(lambda: self.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]))

    async def pending(self) -> list[dict[str, Any]]:
        rows = await self._run(
            lambda: self.db.execute(
                "SELECT digest, target, attempts, next_try, last_error FROM pending ORDER BY next_try"
            ).fetchall()
        )
        keys = ("digest", "target", "attempts", "next_try", "last_error")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    async def _work(self) -> None:
        while True:
            due, wait = await self._run(self._due)
            if due:
                await asyncio.gather(*(self._replicate(*row) for row in due))
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    def _due(self) -> tuple[list[tuple[str, str, int, int]], float]:
        now = time.time()
        rows = self.db.execute(
            "SELECT digest, target, size, attempts FROM pending WHERE next_try <= ? ORDER BY next_try LIMIT ?",
            (now, self.concurrency),
        ).fetchall()
        upcoming = self.db.execute("SELECT MIN(next_try) FROM pending").fetchone()[0]
        wait = MAX_BACKOFF if upcoming is None else max(0.05, min(MAX_BACKOFF, upcoming - now))
        return rows, wait

    async def _replicate(self, digest: str, target: str, size: int, attempts: int) -> None:
        path = os.path.join(self.blob_dir, digest)
        tier = self.targets.get(target)
        try:
            if tier is None:
                raise LookupError(f"no tier named {target!r} in the current config")
            if await self._run(os.path.getsize, path) != size:
                raise OSError(f"queued copy of {digest} has the wrong size")  # never store a torn copy
            await tier.put(Digest(digest), FilePayload(path, size))
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
            await self._run(self._retry_later, digest, target, delay, repr(error))
            return
        self.replicated += 1
        await self._run(self._done, digest, target)

    def _retry_later(self, digest: str, target: str, delay: float, error: str) -> None:
        with self.db:
            self.db.execute(
                "UPDATE pending SET attempts = attempts + 1, next_try = ?, last_error = ? "
                "WHERE digest = ? AND target = ?",
                (time.time() + delay, error[:500], digest, target),
            )

    def _done(self, digest: str, target: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM pending WHERE digest = ? AND target = ?", (digest, target))
            left = self.db.execute("SELECT COUNT(*) FROM pending WHERE digest = ?", (digest,)).fetchone()[0]
        if not left:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.blob_dir, digest))
