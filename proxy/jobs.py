"""Export and import jobs run inside the server (SPEC 5.4 and 7).

Jobs live in SQLite next to the disk cache, so they survive restarts and every worker sees them.
A request only records what it wants (run, pause, cancel); one process at a time — whichever
holds ``runner.lock`` — runs the jobs, reconciles what is wanted with what runs, and writes each
job's progress back every second. If that process dies, another worker takes the lock over and
resumes the jobs from their checkpoints. A paused job keeps its checkpoint; resuming runs the
same spec again, which does only what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from proxy.database import Database
from proxy.errors import BadRequest, Conflict, NotFound
from proxy.store.composite import Composite
from proxy.transfer import Snapshot, Transfer, TransferError, TransferSpec, UsageError

log = logging.getLogger(__name__)
State = Literal["queued", "running", "paused", "done", "failed", "cancelled"]
Wanted = Literal["run", "pause", "cancel"]
FINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})
MAX_RUNNING = 2  # jobs moving bytes at once in this server; the rest wait their turn, queued
TICK = 0.5  # seconds between the runner's looks at the table (also how soon a pause is seen)
SAVE_EVERY = 1.0  # seconds between progress writes of a running job
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    wanted TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
)
"""


class Jobs:
    def __init__(self, store: Composite, directory: str, default_into: str | None = None) -> None:
        self.store = store
        self.directory = os.path.abspath(directory)
        self.default_into = default_into
        self.database = Database(os.path.join(self.directory, "jobs.sqlite3"), _SCHEMA, "jobs")
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock_fd: int | None = None
        self._running: dict[str, tuple[Transfer, asyncio.Task[Snapshot]]] = {}
        self._saved: dict[str, float] = {}

    # -- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.database.run(self.database.connect)
        self._runner = asyncio.get_running_loop().create_task(self._reconcile_forever(), name="jobs")

    async def close(self) -> None:
        """Stop running jobs where they are: their checkpoints hold what is done, and the table
        still says they should run, so the next start resumes them."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for job_id, (transfer, task) in list(self._running.items()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await self.database.run(self._save, job_id, transfer.snapshot(), None, None)
        self._running.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        await self.database.close()

    # -- what the API asks ---------------------------------------------------------------

    async def create(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Record a new job (it starts as soon as the runner sees it); its JSON."""
        if not isinstance(request, Mapping):
            raise BadRequest('want a JSON object such as {"kind": "export", "target": ..., "hashes": [...]}')
        job_id = uuid.uuid4().hex[:16]
        fields = dict(request)
        fields.setdefault("checkpoint", os.path.join(self.directory, f"{job_id}.checkpoint"))
        try:
            spec = TransferSpec.from_json(fields)
        except UsageError as error:
            raise BadRequest(str(error)) from None
        if spec.location == "-":
            raise BadRequest("a job cannot use - (standard input or output): give a bucket, folder or .tar file")
        now = time.time()
        await self.database.run(self._insert, job_id, spec, now)
        self._wake.set()
        return await self.get(job_id)

    def _insert(self, job_id: str, spec: TransferSpec, now: float) -> None:
        with self.database.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, spec, state, wanted, created, updated) VALUES (?, ?, 'queued', 'run', ?, ?)",
                (job_id, json.dumps(spec.as_json()), now, now),
            )

    async def get(self, job_id: str) -> dict[str, Any]:
        rows = await self.database.run(self._select, job_id)
        if not rows:
            raise NotFound(f"no job {job_id!r}")
        return _as_json(rows[0])

    async def all(self) -> list[dict[str, Any]]:
        return [_as_json(row) for row in await self.database.run(self._select, None)]

    def _select(self, job_id: str | None) -> list[sqlite3.Row]:
        if job_id is None:
            rows: list[sqlite3.Row] = self.database.connection.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        else:
            rows = self.database.connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchall()
        return rows

    async def want(self, job_id: str, wanted: Wanted) -> dict[str, Any]:
        """pause, resume (run) or cancel a job; Conflict if it has finished already."""
        await self.database.run(self._set_wanted, job_id, wanted)
        self._wake.set()
        return await self.get(job_id)

    def _set_wanted(self, job_id: str, wanted: Wanted) -> None:
        with self.database.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id!r}")
            state = row[0]
            retry = state == "failed" and wanted == "run"  # run it again: its checkpoint skips what is done
            if state in FINAL and not retry:
                raise Conflict(f"job {job_id} is {state}; only a failed job can be resumed")
            db.execute(
                "UPDATE jobs SET wanted = ?, state = ?, updated = ? WHERE id = ?",
                (wanted, "queued" if retry else state, time.time(), job_id),
            )

    # -- the runner ----------------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                if self._lock_fd is not None or self._take_runner_lock():
                    await self._reconcile()
            except Exception as error:  # keep the runner alive, and say what went wrong
                log.exception("jobs: %r", error)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)

    def _take_runner_lock(self) -> bool:
        """One runner per job table: the lock is the process's while it lives."""
        fd = os.open(os.path.join(self.directory, "runner.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def _reconcile(self) -> None:
        rows: list[sqlite3.Row] = await self.database.run(self._select, None)
        for row in rows:
            job_id, state, wanted = row["id"], row["state"], row["wanted"]
            running = self._running.get(job_id)
            if running is not None and running[1].done():
                await self._finished(job_id, *running)
                continue
            if state in FINAL:
                continue
            if wanted == "run" and running is None and len(self._running) < MAX_RUNNING:
                self._launch(job_id, TransferSpec.from_json(json.loads(row["spec"])))
                await self.database.run(self._save, job_id, None, "running", "")
            elif wanted in ("pause", "cancel"):
                if running is not None:
                    await self._stop(job_id, *running)
                new_state = "paused" if wanted == "pause" else "cancelled"
                if state != new_state:
                    await self.database.run(self._save, job_id, None, new_state, None)
                    if new_state == "cancelled":
                        await self.database.run(_discard_checkpoint, json.loads(row["spec"]).get("checkpoint"))
            elif running is not None and time.monotonic() - self._saved.get(job_id, 0) >= SAVE_EVERY:
                await self.database.run(self._save, job_id, running[0].snapshot(), None, None)
                self._saved[job_id] = time.monotonic()

    def _launch(self, job_id: str, spec: TransferSpec) -> None:
        transfer = Transfer(spec, self.store, state_dir=self.directory, default_into=self.default_into)
        task = asyncio.get_running_loop().create_task(transfer.run(), name=f"job-{job_id}")
        task.add_done_callback(lambda _: self._wake.set())
        self._running[job_id] = (transfer, task)
        log.info("job %s: %s %s started", job_id, spec.kind, spec.location)

    async def _stop(self, job_id: str, transfer: Transfer, task: asyncio.Task[Snapshot]) -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # the transfer saves its checkpoint as it is cancelled
        del self._running[job_id]
        await self.database.run(self._save, job_id, transfer.snapshot(), None, None)

    async def _finished(self, job_id: str, transfer: Transfer, task: asyncio.Task[Snapshot]) -> None:
        del self._running[job_id]
        error = ""
        try:
            snapshot = task.result()
            state: State = "done" if snapshot.ok else "failed"
        except (TransferError, OSError) as failure:
            snapshot, state, error = transfer.snapshot(), "failed", str(failure)
        except Exception as failure:  # a bug in one job must not stop the others
            log.exception("job %s crashed", job_id)
            snapshot, state, error = transfer.snapshot(), "failed", f"internal error: {failure!r}"
        log.info("job %s: %s", job_id, state)
        await self.database.run(self._save, job_id, snapshot, state, error)
        # A job that finished needs nothing resumed; one that failed keeps its checkpoint.

    def _save(self, job_id: str, snapshot: Snapshot | None, state: str | None, error: str | None) -> None:
        with self.database.transaction() as db:
            if snapshot is not None:
                progress = {k: v for k, v in snapshot.as_json().items() if k not in ("kind", "state")}
                db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))
            if state is not None:
                db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state, job_id))
            if error is not None:
                db.execute("UPDATE jobs SET error = ? WHERE id = ?", (error, job_id))
            db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (time.time(), job_id))


_NO_PROGRESS = {"total": None, "done": 0, "skipped": 0, "failed": 0, "corrupt": 0, "bytes": 0, "rate": 0.0}


def _as_json(row: sqlite3.Row) -> dict[str, Any]:
    """A job as the API shows it: its state, the progress of its last save, and its spec."""
    spec = json.loads(row["spec"])
    return {
        "id": row["id"],
        "kind": spec["kind"],
        "state": row["state"],
        "wanted": row["wanted"],
        "error": row["error"] or None,
        "created": row["created"],
        "updated": row["updated"],
        **_NO_PROGRESS,
        "eta_s": None,
        "errors": [],
        **json.loads(row["progress"]),
        "spec": spec,
    }


def _discard_checkpoint(path: str | None) -> None:
    if path:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
