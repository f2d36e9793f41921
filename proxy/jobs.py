"""Export and import jobs run inside the server (SPEC 5.4 and 7).

Jobs live in SQLite next to the disk cache, so they survive restarts and every worker sees them.
A request only records what it wants (run, pause, cancel); one process at a time — whichever
holds ``runner.lock`` — runs the jobs, reconciles what is wanted with what runs, and writes each
job's progress back every second. If that process dies, another worker takes the lock over and
resumes the jobs from their checkpoints. A paused job keeps its checkpoints; resuming runs the
same spec again, which does only what is left at each target; resuming with a list of targets
retries only those (a target that failed, while the others are done).

A job is confined (SPEC 7): it reads and writes only under ``jobs.allow``, its hashes come in
the request, a bucket is reached with the endpoint and credentials of the configured s3 tier on
it, and the server chooses where checkpoints go. A job that cannot even start fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from proxy.blocking import run
from proxy.database import Database
from proxy.errors import BadRequest, Conflict, Forbidden, NotFound
from proxy.store.composite import Composite
from proxy.transfer import Snapshot, Transfer, TransferError, TransferSpec, UsageError
from proxy.transfer.bucket import tier_for
from proxy.transfer.locations import Location, parse_location
from proxy.transfer.wiring import checkpoint_path

log = logging.getLogger(__name__)
State = Literal["queued", "running", "paused", "done", "failed", "cancelled"]
Wanted = Literal["run", "pause", "cancel"]
FINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})
MAX_RUNNING = 2  # jobs moving bytes at once in this server; the rest wait their turn, queued
TICK = 0.5  # seconds between the runner's looks at the table (also how soon a pause is seen)
SAVE_EVERY = 1.0  # seconds between progress writes of a running job
# What a request may not choose: the server reads no files for it, and talks only to the
# endpoints of its own tiers.
REFUSED = {
    "hashes_file": "give the hashes in the request (hashes: [...]); a job reads no file of the server's",
    "endpoint_url": "a job reaches a bucket through the configured s3 tier on it, never an endpoint of its own",
    "checkpoint": "the server chooses where a job keeps its checkpoints",
}
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
);
CREATE TABLE IF NOT EXISTS retries (id TEXT PRIMARY KEY, targets TEXT NOT NULL);
"""


class Jobs:
    def __init__(
        self, store: Composite, directory: str, default_into: str | None = None, allow: Sequence[str] = ()
    ) -> None:
        self.store = store
        self.directory = os.path.abspath(directory)
        self.default_into = default_into
        self.allow = [parse_location(place) for place in allow]
        self.database = Database(os.path.join(self.directory, "jobs.sqlite3"), _SCHEMA, "jobs")
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock_fd: int | None = None
        self._running: dict[str, tuple[Transfer, asyncio.Task[Snapshot]]] = {}
        self._saved: dict[str, float] = {}
        self._earlier: dict[str, list[dict[str, Any]]] = {}  # targets a retry leaves alone: their progress

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
            await self.database.run(self._save, job_id, self._progress(job_id, transfer), None, None)
        self._running.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        await self.database.close()

    # -- what the API asks ---------------------------------------------------------------

    async def create(self, request: Any) -> dict[str, Any]:
        """Record a new job (it starts as soon as the runner sees it); its JSON. BadRequest for
        a spec that cannot run, Forbidden for a location outside ``jobs.allow``."""
        if not isinstance(request, Mapping):
            raise BadRequest('want a JSON object such as {"kind": "export", "targets": [...], "hashes": [...]}')
        for key, why in REFUSED.items():
            if key in request:
                raise BadRequest(f"{key}: not accepted in a job; {why}")
        job_id = uuid.uuid4().hex[:16]
        try:
            spec = TransferSpec.from_json(
                {**request, "checkpoint": os.path.join(self.directory, f"{job_id}.checkpoint")}
            )
            if spec.kind == "export" and not spec.hashes:
                raise UsageError("hashes: a job's hashes come in the request (hashes: [...])")
            locations = [parse_location(text) for text in spec.locations]
            if spec.kind == "import":
                self._check_into(spec.into or self.default_into)
        except UsageError as error:
            raise BadRequest(str(error)) from None
        for location in locations:
            await self._check_place(location)
        now = time.time()
        await self.database.run(self._insert, job_id, spec, now)
        self._wake.set()
        return await self.get(job_id)

    async def _check_place(self, location: Location) -> None:
        if location.kind == "stream":
            raise BadRequest("a job cannot use - (standard input or output): give a bucket, folder or .tar file")
        if not await run(self._allowed, location):
            allowed = ", ".join(place.text for place in self.allow) or "nothing (jobs.allow is empty)"
            raise Forbidden(f"{location.text}: outside jobs.allow; a job may use {allowed}")
        if location.kind == "s3" and tier_for(location, self.store.tiers) is None:
            raise BadRequest(f"{location.text}: no configured s3 tier on bucket {location.bucket} to reach it with")

    def _allowed(self, location: Location) -> bool:
        """Under a place of ``jobs.allow`` (folders compared after symlinks are resolved)."""
        for place in self.allow:
            if location.kind == "s3" and place.kind == "s3":
                if location.bucket == place.bucket and location.prefix.startswith(place.prefix):
                    return True
            elif location.kind != "s3" and place.kind != "s3":
                path, root = os.path.realpath(location.path), os.path.realpath(place.path)
                if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                    return True
        return False

    def _check_into(self, name: str | None) -> None:
        if not name:
            raise UsageError("into: no tier to import into (no uploads.targets, no writable source)")
        try:
            tier = self.store.tier(name)
        except KeyError:
            raise UsageError(f"into: no tier named {name!r}") from None
        if not tier.can_store:
            raise UsageError(f"into: tier {name!r} cannot store blobs")

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

    async def want(self, job_id: str, wanted: Wanted, targets: Sequence[str] | None = None) -> dict[str, Any]:
        """pause, resume (run) or cancel a job; Conflict if it has finished already. Resuming
        with ``targets`` runs only those of an export's targets (retrying one that failed)."""
        await self.database.run(self._set_wanted, job_id, wanted, targets)
        self._wake.set()
        return await self.get(job_id)

    def _set_wanted(self, job_id: str, wanted: Wanted, targets: Sequence[str] | None) -> None:
        with self.database.transaction() as db:
            row = db.execute("SELECT state, spec FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id!r}")
            state = row[0]
            retry = state == "failed" and wanted == "run"  # run it again: its checkpoints skip what is done
            if state in FINAL and not retry:
                raise Conflict(f"job {job_id} is {state}; only a failed job can be resumed")
            if targets is not None:
                known = TransferSpec.from_json(json.loads(row[1])).locations
                unknown = [target for target in targets if target not in known]
                if wanted != "run" or not targets or unknown:
                    raise BadRequest(f"targets: want some of this job's targets ({', '.join(known)}) to resume")
                db.execute("INSERT OR REPLACE INTO retries VALUES (?, ?)", (job_id, json.dumps(list(targets))))
            db.execute(
                "UPDATE jobs SET wanted = ?, state = ?, updated = ? WHERE id = ?",
                (wanted, "queued" if retry else state, time.time(), job_id),
            )

    # -- the runner ----------------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                if self._lock_fd is not None or await run(self._take_runner_lock):
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
                await self._launch(row)
            elif wanted in ("pause", "cancel"):
                if running is not None:
                    await self._stop(job_id, *running)
                new_state = "paused" if wanted == "pause" else "cancelled"
                if state != new_state:
                    await self.database.run(self._save, job_id, None, new_state, None)
                    if new_state == "cancelled":
                        await run(self._discard_checkpoints, json.loads(row["spec"]))
            elif running is not None and time.monotonic() - self._saved.get(job_id, 0) >= SAVE_EVERY:
                await self.database.run(self._save, job_id, self._progress(job_id, running[0]), None, None)
                self._saved[job_id] = time.monotonic()

    async def _launch(self, row: sqlite3.Row) -> None:
        """Start a job; one that cannot even start fails alone (the others go on)."""
        job_id = row["id"]
        try:
            spec = TransferSpec.from_json(json.loads(row["spec"]))
            only = await self.database.run(self._take_retry, job_id)
            if only:
                earlier = json.loads(row["progress"]).get("targets", [])
                self._earlier[job_id] = [part for part in earlier if part.get("location") not in only]
                spec = dataclasses.replace(spec, target="", targets=tuple(only))
            transfer = Transfer(spec, self.store, state_dir=self.directory, default_into=self.default_into)
        except (TransferError, ValueError, KeyError, TypeError) as error:
            log.warning("job %s cannot start: %s", job_id, error)
            await self.database.run(self._save, job_id, None, "failed", f"cannot start: {error}")
            return
        task = asyncio.get_running_loop().create_task(transfer.run(), name=f"job-{job_id}")
        task.add_done_callback(lambda _: self._wake.set())
        self._running[job_id] = (transfer, task)
        log.info("job %s: %s %s started", job_id, spec.kind, ", ".join(spec.locations))
        await self.database.run(self._save, job_id, None, "running", "")

    def _take_retry(self, job_id: str) -> list[str] | None:
        with self.database.transaction() as db:
            row = db.execute("SELECT targets FROM retries WHERE id = ?", (job_id,)).fetchone()
            db.execute("DELETE FROM retries WHERE id = ?", (job_id,))
        return None if row is None else list(json.loads(row[0]))

    async def _stop(self, job_id: str, transfer: Transfer, task: asyncio.Task[Snapshot]) -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # the transfer saves its checkpoints as it is cancelled
        del self._running[job_id]
        await self.database.run(self._save, job_id, self._progress(job_id, transfer), None, None)
        self._earlier.pop(job_id, None)

    async def _finished(self, job_id: str, transfer: Transfer, task: asyncio.Task[Snapshot]) -> None:
        del self._running[job_id]
        error = ""
        try:
            ok = task.result().ok
        except (TransferError, OSError) as failure:
            ok, error = False, str(failure)
        except Exception as failure:  # a bug in one job must not stop the others
            log.exception("job %s crashed", job_id)
            ok, error = False, f"internal error: {failure!r}"
        progress = self._progress(job_id, transfer)
        ok = ok and all(part.get("state") == "done" for part in progress.get("targets", []))
        state: State = "done" if ok else "failed"
        log.info("job %s: %s", job_id, state)
        await self.database.run(self._save, job_id, progress, state, error)
        self._earlier.pop(job_id, None)
        # A job that finished needs nothing resumed; one that failed keeps its checkpoints.

    def _progress(self, job_id: str, transfer: Transfer) -> dict[str, Any]:
        """A job's progress: this run's, with the targets a retry left alone as they were."""
        progress = {k: v for k, v in transfer.snapshot().as_json().items() if k not in ("kind", "state")}
        earlier = self._earlier.get(job_id)
        if earlier:
            progress["targets"] = earlier + progress["targets"]
            for key in ("done", "skipped", "failed", "corrupt", "resumed", "bytes", "earlier_bytes"):
                progress[key] += sum(part.get(key, 0) for part in earlier)
            progress["error_count"] += sum(part.get("error_count", 0) for part in earlier)
        return progress

    def _discard_checkpoints(self, spec_json: Mapping[str, Any]) -> None:
        spec = TransferSpec.from_json(spec_json)
        for text in spec.locations:
            path = checkpoint_path(spec, parse_location(text), self.directory, spec.into or self.default_into)
            for suffix in ("", "-wal", "-shm"):
                if path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + suffix)

    def _save(self, job_id: str, progress: Mapping[str, Any] | None, state: str | None, error: str | None) -> None:
        with self.database.transaction() as db:
            if progress is not None:
                db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (json.dumps(progress), job_id))
            if state is not None:
                db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state, job_id))
            if error is not None:
                db.execute("UPDATE jobs SET error = ? WHERE id = ?", (error, job_id))
            db.execute("UPDATE jobs SET updated = ? WHERE id = ?", (time.time(), job_id))


_NO_PROGRESS = {"total": None, "done": 0, "skipped": 0, "failed": 0, "corrupt": 0, "bytes": 0, "rate": 0.0}


def _as_json(row: sqlite3.Row) -> dict[str, Any]:
    """A job as the API shows it: its state, the progress of its last save (per target in
    ``targets``), and its spec."""
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
        "targets": [],
        **json.loads(row["progress"]),
        "spec": spec,
    }
