"""The runner: one process at a time (whichever holds ``runner.lock``) runs the jobs, reconciling
what each job's row wants with what runs, and writing each running job's progress back every
second. If that process dies, another worker takes the lock over and resumes the jobs from their
checkpoints."""

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
from collections.abc import Mapping
from typing import Any

from proxy.blocking import run
from proxy.jobs.table import FINAL, JobTable, State
from proxy.store.composite import Composite
from proxy.transfer import Snapshot, Transfer, TransferError, TransferSpec
from proxy.transfer.checkpoint import remove_files
from proxy.transfer.locations import parse_location
from proxy.transfer.wiring import checkpoint_path

log = logging.getLogger(__name__)
MAX_RUNNING = 2  # jobs moving bytes at once in this server; the rest wait their turn, queued
TICK = 0.5  # seconds between the runner's looks at the table (also how soon a pause is seen)
SAVE_EVERY = 1.0  # seconds between progress writes of a running job


class Runner:
    def __init__(self, store: Composite, table: JobTable, directory: str, default_into: str | None) -> None:
        self.store = store
        self.table = table
        self.directory = directory  # runner.lock, and the jobs' checkpoints
        self.default_into = default_into
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock_fd: int | None = None
        self._running: dict[str, tuple[Transfer, asyncio.Task[Snapshot]]] = {}
        self._saved: dict[str, float] = {}
        self._earlier: dict[str, list[dict[str, Any]]] = {}  # targets a retry leaves alone: their progress

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._reconcile_forever(), name="jobs")

    def wake(self) -> None:
        """Look at the table now (a request changed it), not at the next tick."""
        self._wake.set()

    async def close(self) -> None:
        """Stop running jobs where they are: their checkpoints hold what is done, and the table
        still says they should run, so the next start resumes them."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job_id, (transfer, task) in list(self._running.items()):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await self.table.save(job_id, self._progress(job_id, transfer))
        self._running.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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
        for row in await self.table.rows():
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
                new_state: State = "paused" if wanted == "pause" else "cancelled"
                if state != new_state:
                    await self.table.save(job_id, state=new_state)
                    if new_state == "cancelled":
                        await run(self._discard_checkpoints, json.loads(row["spec"]))
            elif running is not None and time.monotonic() - self._saved.get(job_id, 0) >= SAVE_EVERY:
                await self.table.save(job_id, self._progress(job_id, running[0]))
                self._saved[job_id] = time.monotonic()

    async def _launch(self, row: sqlite3.Row) -> None:
        """Start a job; one that cannot even start fails alone (the others go on)."""
        job_id = row["id"]
        try:
            spec = TransferSpec.from_json(json.loads(row["spec"]))
            only = await self.table.take_retry(job_id)
            if only:
                earlier = json.loads(row["progress"]).get("targets", [])
                self._earlier[job_id] = [part for part in earlier if part.get("location") not in only]
                spec = dataclasses.replace(spec, target="", targets=tuple(only))
            transfer = Transfer(spec, self.store, state_dir=self.directory, default_into=self.default_into)
        except (TransferError, ValueError, KeyError, TypeError) as error:
            log.warning("job %s cannot start: %s", job_id, error)
            await self.table.save(job_id, state="failed", error=f"cannot start: {error}")
            return
        task = asyncio.get_running_loop().create_task(transfer.run(), name=f"job-{job_id}")
        task.add_done_callback(lambda _: self._wake.set())
        self._running[job_id] = (transfer, task)
        log.info("job %s: %s %s started", job_id, spec.kind, ", ".join(spec.locations))
        await self.table.save(job_id, state="running", error="")

    async def _stop(self, job_id: str, transfer: Transfer, task: asyncio.Task[Snapshot]) -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task  # the transfer saves its checkpoints as it is cancelled
        del self._running[job_id]
        await self.table.save(job_id, self._progress(job_id, transfer))
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
        await self.table.save(job_id, progress, state, error)
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
            if path is not None:
                remove_files(path)
