"""Running blocking work (files, SQLite, SDK calls, hashing of large buffers) off the event loop.

The one helper every module uses instead of its own ``run_in_executor`` wrapper, so the result
keeps its type and a new blocking call has one obvious way in.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def run(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on the loop's default executor."""
    return await run_on(None, fn, *args, **kwargs)


async def run_on(executor: Executor | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on ``executor`` (a pool sized for one resource: a tier, a database)."""
    call = functools.partial(fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(executor, call)
