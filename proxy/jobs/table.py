"""The jobs table: what each job is (its spec), what it is doing, what a request wants of it,
and its last saved progress. SQLite next to the disk cache, so every worker reads the same jobs
and they survive restarts; each method runs on the database's own thread."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from proxy.database import Database
from proxy.errors import BadRequest, Conflict, NotFound
from proxy.transfer import TransferSpec

State = Literal["queued", "running", "paused", "done", "failed", "cancelled"]
Wanted = Literal["run", "pause", "cancel"]
FINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})
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


class JobTable:
    def __init__(self, path: str) -> None:
        self.database = Database(path, _SCHEMA, "jobs")

    async def open(self) -> None:
        await self.database.run(self.database.connect)

    async def close(self) -> None:
        await self.database.close()

    async def insert(self, job_id: str, spec: TransferSpec, now: float) -> None:
        await self.database.run(self._insert, job_id, spec, now)

    async def rows(self, job_id: str | None = None) -> list[sqlite3.Row]:
        """The job ``job_id`` (none if there is no such job), or all of them, oldest first."""
        return await self.database.run(self._select, job_id)

    async def set_wanted(self, job_id: str, wanted: Wanted, targets: Sequence[str] | None) -> None:
        """Record what a request wants; Conflict if the job has finished (only a failed one can
        be run again), BadRequest for targets that are not all the job's own."""
        await self.database.run(self._set_wanted, job_id, wanted, targets)

    async def take_retry(self, job_id: str) -> list[str] | None:
        """The targets a resume asked to retry (once: taking them forgets them), if any."""
        return await self.database.run(self._take_retry, job_id)

    async def save(
        self,
        job_id: str,
        progress: Mapping[str, Any] | None = None,
        state: State | None = None,
        error: str | None = None,
    ) -> None:
        """Write what is given (progress, state, error) and the time."""
        await self.database.run(self._save, job_id, progress, state, error)

    # -- on the database's thread --------------------------------------------------------

    def _insert(self, job_id: str, spec: TransferSpec, now: float) -> None:
        with self.database.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, spec, state, wanted, created, updated) VALUES (?, ?, 'queued', 'run', ?, ?)",
                (job_id, json.dumps(spec.as_json()), now, now),
            )

    def _select(self, job_id: str | None) -> list[sqlite3.Row]:
        if job_id is None:
            rows: list[sqlite3.Row] = self.database.connection.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        else:
            rows = self.database.connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchall()
        return rows

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

    def _take_retry(self, job_id: str) -> list[str] | None:
        with self.database.transaction() as db:
            row = db.execute("SELECT targets FROM retries WHERE id = ?", (job_id,)).fetchone()
            db.execute("DELETE FROM retries WHERE id = ?", (job_id,))
        return None if row is None else list(json.loads(row[0]))

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


def as_json(row: sqlite3.Row) -> dict[str, Any]:
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
