"""The jobs as the server's API sees them: a request records what it wants (a new job, run,
pause, cancel) in the table and wakes the runner, and is answered from the table, so any worker
answers for any job. The runner (one process at a time) does the rest."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

from proxy.errors import BadRequest, NotFound
from proxy.jobs.confinement import Confinement
from proxy.jobs.runner import Runner
from proxy.jobs.table import JobTable, Wanted, as_json
from proxy.store.composite import Composite
from proxy.transfer import TransferSpec, UsageError
from proxy.transfer.locations import parse_location


class Jobs:
    def __init__(
        self, store: Composite, directory: str, default_into: str | None = None, allow: Sequence[str] = ()
    ) -> None:
        self.store = store
        self.directory = os.path.abspath(directory)
        self.default_into = default_into
        self.confinement = Confinement(store, allow)
        self.table = JobTable(os.path.join(self.directory, "jobs.sqlite3"))
        self.runner = Runner(store, self.table, self.directory, default_into)

    async def start(self) -> None:
        await self.table.open()
        self.runner.start()

    async def close(self) -> None:
        await self.runner.close()
        await self.table.close()

    async def create(self, request: Any) -> dict[str, Any]:
        """Record a new job (it starts as soon as the runner sees it); its JSON. BadRequest for
        a spec that cannot run, Forbidden for a location outside ``jobs.allow``."""
        request = self.confinement.check_request(request)
        job_id = uuid.uuid4().hex[:16]
        try:
            spec = TransferSpec.from_json(
                {**request, "checkpoint": os.path.join(self.directory, f"{job_id}.checkpoint")}
            )
            if spec.kind == "export" and not spec.hashes:
                raise UsageError("hashes: a job's hashes come in the request (hashes: [...])")
            locations = [parse_location(text) for text in spec.locations]
            if spec.kind == "import":
                self.confinement.check_into(spec.into or self.default_into)
        except UsageError as error:
            raise BadRequest(str(error)) from None
        for location in locations:
            await self.confinement.check_place(location)
        await self.table.insert(job_id, spec, time.time())
        self.runner.wake()
        return await self.get(job_id)

    async def get(self, job_id: str) -> dict[str, Any]:
        rows = await self.table.rows(job_id)
        if not rows:
            raise NotFound(f"no job {job_id!r}")
        return as_json(rows[0])

    async def all(self) -> list[dict[str, Any]]:
        return [as_json(row) for row in await self.table.rows()]

    async def want(self, job_id: str, wanted: Wanted, targets: Sequence[str] | None = None) -> dict[str, Any]:
        """pause, resume (run) or cancel a job; Conflict if it has finished already. Resuming
        with ``targets`` runs only those of an export's targets (retrying one that failed)."""
        await self.table.set_wanted(job_id, wanted, targets)
        self.runner.wake()
        return await self.get(job_id)
