"""A small SQLite database used from asyncio, safe to share between processes (workers).

One connection, driven by one thread of its own: SQLite work never blocks the event loop and a
connection never changes threads. WAL mode lets readers go on while a writer commits; writes
take the write lock up front (BEGIN IMMEDIATE), so a transaction that reads and then writes
cannot be overtaken by another process in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Database:
    def __init__(self, path: str, schema: str, name: str) -> None:
        self.path = path
        self.schema = schema
        self.name = name
        self._connection: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    def connect(self) -> None:
        """Open (creating the folder and tables); call it through ``run``."""
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        # Autocommit mode: every transaction is an explicit one (see transaction()).
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.executescript(self.schema)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the database's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

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
