"""A tier's bytes under its deadline and minimum rate (SPEC 3: ``timeout``, ``min_rate``).

The first byte must come within the tier's ``timeout``; after that the tier must deliver at
least ``min_rate`` bytes a second over each window of ``RATE_WINDOW`` seconds. A tier that does
not has failed: a trickle (one byte a second, forever) costs a request one window, never more.
The next chunk is fetched while the caller handles this one, so a slow consumer (hashing, the
spool's disk) is not counted against the tier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from proxy.errors import TierError

RATE_WINDOW = 10.0  # seconds; read at each call, so a test can shorten it


class TooSlow(TierError):
    """The tier sent its first byte too late, or too few bytes over a window."""


async def paced(chunks: AsyncIterator[bytes], name: str, timeout: float, min_rate: float) -> AsyncIterator[bytes]:
    """``chunks`` as they come; raises TooSlow when the tier falls behind. Closing this
    generator cancels the read in flight (the tier's ``close`` then releases its connection)."""
    loop = asyncio.get_running_loop()
    window = RATE_WINDOW
    source = aiter(chunks)
    pending: asyncio.Future[bytes | None] = asyncio.ensure_future(anext(source, None))
    deadline, due, got = loop.time() + timeout, 1, 0  # first: one byte within the timeout
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await asyncio.shield(pending)
            except TimeoutError:
                chunk = b""  # the window ended with the read still waiting: judged below
            else:
                if chunk is None:
                    return
                got += len(chunk)
                pending = asyncio.ensure_future(anext(source, None))
            if got < due and loop.time() >= deadline:
                raise TooSlow(_too_slow(name, got, due, timeout if due == 1 else window))
            if got >= due == 1 or loop.time() >= deadline:  # the first byte came, or a window passed
                deadline, due, got = loop.time() + window, int(min_rate * window), 0
            if chunk:
                yield chunk
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending


def _too_slow(name: str, got: int, due: int, seconds: float) -> str:
    if due == 1:
        return f"{name}: no byte within {seconds:g}s"
    return f"{name}: sent {got} bytes in {seconds:g}s, below its min_rate of {due / seconds:.0f} bytes/s"
