"""A small SQLite database used from asyncio, safe to share between processes (workers).

The one SQLite-on-a-thread helper: the replication queue, the jobs table and transfer
checkpoints all use it. One connection, driven by one thread of its own: SQLite work never
blocks the event loop and a connection never changes threads. WAL mode lets readers go on while
a writer commits; writes take the write lock up front (BEGIN IMMEDIATE), so a transaction that
reads and then writes cannot be overtaken by another process in between.

From the loop: ``await db.open()``, ``await db.query(sql, params)`` for reads, and
``await db.run(fn, ...)`` for anything more, where ``fn`` runs on the database's thread and uses
``db.transaction()`` to write (from another thread: ``db.run_from_thread(fn, ...)``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, ParamSpec, TypeVar

from proxy.blocking import run_on

P = ParamSpec("P")
T = TypeVar("T")


class Database:
    def __init__(self, path: str, schema: str, name: str, *, synchronous: Literal["FULL", "NORMAL"] = "FULL") -> None:
        """``synchronous="NORMAL"`` trades the last commits before a power loss (never those
        before a process crash) for faster commits: for a checkpoint that can be redone."""
        self.path = path
        self.schema = schema
        self.name = name
        self.synchronous = synchronous
        self._connection: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def open(self) -> None:
        """Open, creating the folder and the tables."""
        await self.run(self.connect)

    def connect(self) -> None:
        """What ``open`` does, on the database's thread (for a caller already there)."""
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        # Autocommit mode: every transaction is an explicit one (see transaction()).
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={self.synchronous}")
            connection.executescript(self.schema)
        except BaseException:
            connection.close()
            raise
        self._connection = connection

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the database's thread."""
        return await run_on(self._executor, fn, *args, **kwargs)

    def run_from_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the database's thread, waited for: for another worker
        thread (a tier's), never the event loop's."""
        return self._executor.submit(fn, *args, **kwargs).result()

    async def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """The rows of one read."""
        return await self.run(lambda: self.connection.execute(sql, params).fetchall())

    @property
    def connection(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError(f"{self.name}: database not open")
        return self._connection

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Holds the write lock from the start; on the database's thread."""
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    async def close(self) -> None:
        if self._connection is not None:
            await self.run(self._connection.close)
            self._connection = None
        self._executor.shutdown(wait=False)
