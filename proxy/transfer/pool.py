"""A bounded set of tasks: how a transfer keeps ``jobs`` items in flight and no more."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Pool:
    """At most ``size`` tasks at once; ``submit`` waits for a free place."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        # The coroutine is made only once there is a place: a cancelled wait leaves none unawaited.
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("transfer task failed", exc_info=task.exception())

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
