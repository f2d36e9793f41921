"""Export and import jobs run inside the server (SPEC 5.4 and 7).

Jobs live in SQLite next to the disk cache, so they survive restarts and every worker sees them
(``table``). A request only records what it wants (run, pause, cancel) (``api``); one process at
a time — whichever holds ``runner.lock`` — runs the jobs, reconciles what is wanted with what
runs, and writes each job's progress back every second (``runner``). If that process dies,
another worker takes the lock over and resumes the jobs from their checkpoints. A paused job
keeps its checkpoints; resuming runs the same spec again, which does only what is left at each
target; resuming with a list of targets retries only those (a target that failed, while the
others are done).

A job is confined (SPEC 7, ``confinement``): it reads and writes only under ``jobs.allow``, its
hashes come in the request, a bucket is reached with the endpoint and credentials of the
configured s3 tier on it, and the server chooses where checkpoints go. A job that cannot even
start fails alone.
"""

from __future__ import annotations

from proxy.jobs.api import Jobs
from proxy.jobs.table import State, Wanted

__all__ = ["Jobs", "State", "Wanted"]
