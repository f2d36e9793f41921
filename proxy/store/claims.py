"""Coalescing across a fleet: one fetch from the sources per digest among every instance that
shares a Redis (``coalesce.url``).

Before a fill asks a source, its instance claims the digest: ``SET key token NX PX lease``, renewed
while the fill runs and released by compare-and-delete (the Redis docs' single-instance lock
pattern), so a holder that dies simply stops renewing and its claim runs out. Instances that find
the digest claimed wait until the claim ends, then look in the first shared cache tier (a bucket,
a regional casproxy), which the holder filled before it let go.

Waiters are notified: the release publishes the digest on one channel every instance subscribes
to. A waiter also looks again when the holder's lease would run out, which is how it learns of a
holder that died (and the safety net should a notice be lost); it never polls on a fixed beat.

Claims are an optimisation: while Redis fails or is slow, and once ``coalesce.wait`` is spent, an
instance fetches by itself, coalescing only within the machine (the fill locks); never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from proxy import metrics
from proxy.errors import ConfigError
from proxy.store.breaker import Breaker
from proxy.store.negative import without_password

log = logging.getLogger(__name__)
T = TypeVar("T")
KEY_PREFIX = "casproxy:claim:"  # Redis keys: casproxy:claim:<digest>, the holder's token as value
CHANNEL = "casproxy:claims:ended"  # the digest of each claim released, for the waiters
LEASE = 5.0  # seconds a claim lasts unless renewed: how long a dead holder keeps the others waiting
_COMMAND_TIMEOUT = 0.5  # seconds: far below an origin fetch, so a sick Redis costs little
_BACKEND_RETRY = 2.0  # seconds to leave a failed Redis alone before one call tries it again
_RESUBSCRIBE_AFTER = 1.0  # seconds between attempts to listen again after the channel broke
# Read once, at import: redis-py otherwise looks its version up in the package metadata (file
# system calls) for every connection it opens, on the event loop.
_DRIVER = DriverInfo()

# Compare-and-delete, and tell the waiters, in one step: only the holder's own token releases.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('publish', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
# Compare-and-extend: a holder whose claim ran out (and was taken over) must not renew the new one.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


class Unavailable(Exception):
    """Redis failed, or is being left alone after a failure."""


class Claims:
    """This instance's side of the fleet's claims; one per process, shared by its fills."""

    def __init__(self, url: str, wait: float = 30.0, lease: float = LEASE) -> None:
        self.url = without_password(url)  # shown in /stats and logs
        self.wait = float(wait)
        self.lease = float(lease)
        self.held = 0  # claims this process holds now, for /stats
        try:
            self.redis: Any = redis.Redis.from_url(
                url, socket_timeout=_COMMAND_TIMEOUT, socket_connect_timeout=_COMMAND_TIMEOUT, driver_info=_DRIVER
            )
            # The listener blocks on reads for as long as nothing is released: no read timeout.
            self._listener_redis: Any = redis.Redis.from_url(
                url, socket_connect_timeout=_COMMAND_TIMEOUT, driver_info=_DRIVER
            )
        except ValueError as error:
            raise ConfigError(f"coalesce.url: cannot use {self.url!r}: {error}") from None
        self.release_script = self.redis.register_script(_RELEASE)
        self.renew_script = self.redis.register_script(_RENEW)
        self.token_prefix = f"{socket.gethostname()}:{os.getpid()}:"  # says who holds a claim
        self._backend = Breaker(threshold=1, cooldown=_BACKEND_RETRY)
        self._ended: dict[str, asyncio.Event] = {}  # digest -> set when its claim is released
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for released claims. Redis may be down now: the listener keeps trying."""
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="coalesce-listener")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for client in (self.redis, self._listener_redis):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), _COMMAND_TIMEOUT)

    def claim(self, digest: str) -> Claim:
        """One fill's turn at the digest; nothing is sent to Redis until ``Claim.take``."""
        return Claim(self, digest)

    def describe(self) -> dict[str, object]:
        state = {"url": self.url, "wait": self.wait, "held": self.held, "waiting": len(self._ended)}
        return {**state, "available": self._backend.state == "closed"}

    async def call(self, command: Callable[[], Awaitable[T]]) -> T:
        """``command()``'s answer, under a short timeout; raises Unavailable if Redis failed or
        is being left alone after a failure (then one call in a while probes it)."""
        if not self._backend.allow():
            raise Unavailable
        try:
            answer = await asyncio.wait_for(command(), _COMMAND_TIMEOUT)
        except (RedisError, OSError, TimeoutError) as error:
            if self._backend.opened_at is None:  # log the start of an outage, not every probe
                log.warning("coalesce: %s unavailable, coalescing per machine only: %r", self.url, error)
            self._backend.failed()
            raise Unavailable from error
        if self._backend.opened_at is not None:
            log.warning("coalesce: %s is back", self.url)
        self._backend.succeeded()
        return answer

    @contextlib.contextmanager
    def waiting_for(self, digest: str) -> Iterator[asyncio.Event]:
        """An event set when the digest's claim is released, for as long as the body runs
        however it ends (one fill per digest per process)."""
        ended = self._ended[digest] = asyncio.Event()
        try:
            yield ended
        finally:
            if self._ended.get(digest) is ended:
                del self._ended[digest]

    async def _listen(self) -> None:
        """Wake the waiters of each released digest; subscribe again whenever the channel breaks."""
        while True:
            pubsub = self._listener_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message["type"] == "message":
                        ended = self._ended.get(message["data"].decode())
                        if ended is not None:
                            ended.set()
            except (RedisError, OSError) as error:
                # Waiters still look again when a lease would run out: slower, never stuck.
                log.debug("coalesce: listening on %s failed: %r", self.url, error)
            except Exception:  # a surprise must not end the listening for good
                log.exception("coalesce: listening on %s failed", self.url)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(_RESUBSCRIBE_AFTER)


class Claim:
    """A fill's claim on one digest: taken (or waited for) before the sources are asked,
    released once the shared cache tier holds the blob, or the fill failed."""

    def __init__(self, claims: Claims, digest: str) -> None:
        self._claims = claims
        self.digest = digest
        self.key = KEY_PREFIX + digest
        self.token = claims.token_prefix + secrets.token_hex(8)
        self.held = False
        self.waited = False  # another instance held the claim first
        self._deadline: float | None = None  # when coalesce.wait runs out
        self._renewer: asyncio.Task[None] | None = None

    async def take(self) -> bool:
        """Wait for this fill's turn. True: fetch from the sources (holding the claim, or alone
        because Redis is unavailable or ``coalesce.wait`` ran out). False: another instance's
        claim has just ended; look in the shared cache tier, and take() again if it is not there
        (that fill failed, or its holder died)."""
        if self.held:
            return True
        # Listening from before the SET: a release in between still wakes us.
        with self._claims.waiting_for(self.digest) as ended:
            return await self._take(ended)

    async def _take(self, ended: asyncio.Event) -> bool:
        claims, client = self._claims, self._claims.redis
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + claims.wait
        lease_ms = int(claims.lease * 1000)
        try:
            if await claims.call(lambda: client.set(self.key, self.token, nx=True, px=lease_ms)):
                self._hold()
                return True
            lease_left = int(await claims.call(lambda: client.pttl(self.key)))
        except Unavailable:
            metrics.COALESCE_ALONE.labels("unavailable").inc()
            return True
        if not self.waited:
            self.waited = True
            metrics.COALESCE_WAITS.inc()
        began = loop.time()
        try:
            # Wake when the holder releases, or when its lease would run out: if it was not
            # renewed the holder died. PTTL -2: gone; -1 (no expiry) is not a claim of ours.
            while lease_left != -2 and not ended.is_set() and loop.time() < self._deadline:
                wake_in = lease_left / 1000 + 0.01 if lease_left >= 0 else claims.lease
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wake_in, self._deadline - loop.time())):
                        await ended.wait()
                if not ended.is_set():
                    lease_left = int(await claims.call(lambda: client.pttl(self.key)))
        except Unavailable:
            return False  # Redis went away: look in the shared tier, then take() fetches alone
        finally:
            metrics.COALESCE_WAIT_SECONDS.observe(loop.time() - began)
        if ended.is_set() or lease_left == -2:
            return False
        log.warning("coalesce: %s is still claimed after %gs; fetching it here too", self.digest, claims.wait)
        metrics.COALESCE_ALONE.labels("wait").inc()
        return True

    def _hold(self) -> None:
        self.held = True
        self._claims.held += 1
        metrics.COALESCE_CLAIMS.inc()
        if self.waited:
            metrics.COALESCE_TAKEOVERS.inc()  # the claim before ours ended without the blob
        self._renewer = asyncio.get_running_loop().create_task(self._renew(), name=f"claim-{self.digest}")

    async def _renew(self) -> None:
        claims = self._claims
        args: list[str | int] = [self.token, int(claims.lease * 1000)]
        while True:
            await asyncio.sleep(claims.lease / 3)  # two renewals may fail before the lease runs out
            try:
                if not await claims.call(lambda: claims.renew_script(keys=[self.key], args=args)):
                    # We stalled past the lease and another instance took over: fetch on anyway
                    # (the bytes are verified; the cost is a second fetch).
                    log.warning("coalesce: the claim on %s ran out before its fill ended", self.digest)
                    return
            except Unavailable:
                pass  # Redis may answer again before the lease runs out

    async def release(self) -> None:
        """Let the waiters look in the shared tier. Idempotent; never raises."""
        if not self.held:
            return
        self.held = False
        claims = self._claims
        claims.held -= 1
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        args = [self.token, CHANNEL, self.digest]
        with contextlib.suppress(Unavailable):
            # If Redis cannot hear it, the lease runs out by itself and the waiters look then.
            await claims.call(lambda: claims.release_script(keys=[self.key], args=args))
