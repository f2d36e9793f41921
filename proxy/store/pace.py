"""A tier's bytes under its deadline and minimum rate (SPEC 3: ``timeout``, ``min_rate``).

The first byte must come within the tier's ``timeout``, and so must each next one (a tier that
stops sending has hung); and over each window of ``RATE_WINDOW`` seconds the tier must deliver
at least ``min_rate`` bytes a second. A tier that does not has failed: a trickle (a byte a
second, forever) costs a request one window, never more. The next chunk is fetched while the
caller handles this one, so a slow consumer (hashing, the spool's disk) is not counted against
the tier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from proxy.errors import TierError

RATE_WINDOW = 10.0  # seconds; read at each call, so a test can shorten it


class TooSlow(TierError):
    """The tier went quiet for longer than its timeout, or sent too few bytes over a window."""


async def paced(chunks: AsyncIterator[bytes], name: str, idle: float, min_rate: float) -> AsyncGenerator[bytes, None]:
    """``chunks`` as they come; raises TooSlow when the tier falls behind. Closing this
    generator cancels the read in flight (the tier's ``close`` then releases its connection)."""
    loop = asyncio.get_running_loop()
    window = RATE_WINDOW
    due = int(min_rate * window)
    source = aiter(chunks)
    pending: asyncio.Future[bytes | None] = asyncio.ensure_future(anext(source, None))
    quiet_until = loop.time() + idle
    window_end, got = loop.time() + window, 0
    try:
        while True:
            try:
                async with asyncio.timeout_at(min(quiet_until, window_end)):
                    chunk = await asyncio.shield(pending)
            except TimeoutError:
                chunk = b""  # a deadline passed with the read still waiting: judged below
            else:
                if chunk is None:
                    return
                got += len(chunk)
                quiet_until = loop.time() + idle
                pending = asyncio.ensure_future(anext(source, None))
            now = loop.time()
            if now >= quiet_until:
                raise TooSlow(f"{name}: no byte for {idle:g}s")
            if now >= window_end:
                if got < due:
                    raise TooSlow(
                        f"{name}: sent {got} bytes in {window:g}s, below its min_rate of {min_rate:.0f} bytes/s"
                    )
                window_end, got = now + window, 0
            if chunk:
                yield chunk
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
