"""What a transfer has finished, kept in SQLite (WAL) so a rerun does only what is left.

A row is written only after the thing it records is durable at the target (a PUT answered, a
file renamed into place, a part uploaded), so after ``kill -9`` at any moment the checkpoint
never claims more than is there. Rows are committed in batches on the database's own thread
(proxy.database): the event loop never waits on SQLite, and losing the last batch to a kill only
means redoing (or re-checking) those few items.

For a multipart upload it keeps the upload id and part size before the first part is sent, and
each finished part's number, ETag and MD5, so a rerun continues the same upload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from proxy.blocking import run
from proxy.database import Database
from proxy.transfer.spec import TransferError, UsageError

T = TypeVar("T")

State = Literal["done", "skipped"]
BATCH_DELAY = 0.05  # seconds
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (name TEXT PRIMARY KEY, size INTEGER NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (
    name TEXT PRIMARY KEY, upload_id TEXT NOT NULL, part_size INTEGER NOT NULL, size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    name TEXT NOT NULL, number INTEGER NOT NULL, etag TEXT NOT NULL, md5 TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (name, number)
);
"""


@dataclass(frozen=True)
class Part:
    etag: str
    md5: str  # hex MD5 of the part's bytes, to check a re-read part before reusing the upload's copy
    size: int


@dataclass
class Upload:
    """A multipart upload started by an earlier run (or this one)."""

    upload_id: str
    part_size: int
    size: int
    parts: dict[int, Part] = field(default_factory=dict)


class Checkpoint:
    """The record of one transfer. With ``path`` None (a tar stream) it records nothing."""

    def __init__(self, path: str | None, identity: Mapping[str, Any]) -> None:
        self.path = os.path.abspath(path) if path else None
        self.identity = dict(identity)
        self.finished: dict[str, tuple[int, State]] = {}
        self.uploads: dict[str, Upload] = {}
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._database = Database(self.path, _SCHEMA, "checkpoint") if self.path else None

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self._database is None:
            return
        try:
            recorded = await self._database.run(self._open)
        except sqlite3.DatabaseError as error:
            await self._database.close()
            raise UsageError(f"checkpoint {self.path}: {error}") from None
        if recorded is not None:
            await self._database.close()
            raise UsageError(f"checkpoint {self.path} belongs to another transfer: {recorded}")

    def _open(self) -> str | None:
        """Read what is recorded; the identity recorded instead, if it is another transfer's."""
        assert self._database is not None
        self._database.connect()
        with self._database.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'identity'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('identity', ?)", (json.dumps(self.identity, sort_keys=True),))
            elif json.loads(row[0]) != self.identity:
                return str(row[0])
            for name, size, state in db.execute("SELECT name, size, state FROM items"):
                self.finished[name] = (size, state)
            for name, upload_id, part_size, size in db.execute("SELECT name, upload_id, part_size, size FROM uploads"):
                self.uploads[name] = Upload(upload_id, part_size, size)
            for name, number, etag, md5, size in db.execute("SELECT name, number, etag, md5, size FROM parts"):
                upload = self.uploads.get(name)
                if upload is not None:
                    upload.parts[number] = Part(etag, md5, size)
        return None

    async def close(self) -> None:
        """Commit what is pending and close; the file stays for the next run."""
        try:
            await self.flush()
        finally:
            if self._database is not None:
                await self._database.close()
                self._database = None

    async def discard(self) -> None:
        """Close and remove the file: the transfer is complete, nothing is left to resume. (A
        checkpoint kept after success would skip blobs deleted from the target since.)"""
        await self.close()
        if self.path is not None:
            await run(remove_files, self.path)

    async def end(self, complete: bool) -> None:
        """Discard the checkpoint of a complete run with no problems (nothing is left to resume),
        else keep it for the next run."""
        if complete:
            await self.discard()
        else:
            await self.close()

    # -- recording -----------------------------------------------------------------------

    def finish(self, name: str, size: int, state: State) -> None:
        """``name`` is at the target (durably: call this only after the write returned)."""
        self.finished[name] = (size, state)
        self._queue("INSERT OR REPLACE INTO items VALUES (?, ?, ?)", (name, size, state))

    async def begin_upload(self, name: str, upload_id: str, part_size: int, size: int) -> Upload:
        """Record a new multipart upload, committed before any part is sent: a killed run must
        find its upload id to continue it (or to know it exists at all)."""
        upload = Upload(upload_id, part_size, size)
        self.uploads[name] = upload
        self._queue("DELETE FROM parts WHERE name = ?", (name,))
        self._queue("INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?)", (name, upload_id, part_size, size))
        await self.flush()
        return upload

    def part_done(self, name: str, number: int, part: Part) -> None:
        upload = self.uploads.get(name)
        if upload is not None:
            upload.parts[number] = part
        self._queue(
            "INSERT OR REPLACE INTO parts VALUES (?, ?, ?, ?, ?)", (name, number, part.etag, part.md5, part.size)
        )

    def end_upload(self, name: str) -> None:
        """The upload was completed or aborted: forget it."""
        self.uploads.pop(name, None)
        self._queue("DELETE FROM parts WHERE name = ?", (name,))
        self._queue("DELETE FROM uploads WHERE name = ?", (name,))

    # -- batching ------------------------------------------------------------------------

    def _queue(self, sql: str, params: tuple[Any, ...]) -> None:
        if self._database is None:
            return
        self._raise_failure()
        self._pending.append((sql, params))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_pending(), name="checkpoint")

    async def _write_pending(self) -> None:
        # Gather what finishes in the next moment into one transaction: a commit per blob would
        # cost an fsync-free but still real thread hop and write each, thousands a second.
        await asyncio.sleep(BATCH_DELAY)
        while self._pending:
            batch, self._pending = self._pending, []
            await self._run(self._commit, batch)

    def _commit(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        assert self._database is not None
        with self._database.transaction() as db:  # one transaction per batch
            for sql, params in batch:
                db.execute(sql, params)

    async def flush(self) -> None:
        """Wait until everything recorded so far is committed."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        self._raise_failure()
        if self._pending:  # queued while the last batch was committing
            self._writer = asyncio.get_running_loop().create_task(self._write_pending(), name="checkpoint")
            await self.flush()

    def _raise_failure(self) -> None:
        writer = self._writer
        if writer is not None and writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise TransferError(f"cannot write checkpoint {self.path}: {writer.exception()}")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._database is not None
        try:
            return await self._database.run(fn, *args)
        except sqlite3.Error as error:
            raise TransferError(f"checkpoint {self.path}: {error}") from error


def remove_files(path: str) -> None:
    """A checkpoint database's files, its write-ahead log and shared memory too (blocks)."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
