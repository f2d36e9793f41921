"""Coalescing across processes: at most one fill per digest among all the processes (workers,
``casproxy export`` runs, other instances) that share a disk cache directory.

A fill holds a POSIX record lock on one byte of a shared lock file, at an offset taken from
the digest. The kernel drops the locks of a process that dies, even by ``kill -9``, so a crashed
filler never blocks the others; and no per-digest lock files are created or left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from collections.abc import AsyncIterator

_POLL_FIRST, _POLL_MAX = 0.002, 0.05  # seconds: waiting is polling, so it can be cancelled


class FillLocks:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        # POSIX locks belong to the process, not to a holder: two digests of this process
        # on the same offset share the lock, and only the last one to finish releases it.
        self._held: dict[int, int] = {}

    def open(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases every lock this process holds on the file
            self._fd = None
            self._held.clear()

    @contextlib.asynccontextmanager
    async def hold(self, digest: str) -> AsyncIterator[bool]:
        """Hold the digest's lock for the body; yields True if another process held it first
        (its fill has finished by now: look in the cache again before fetching)."""
        self.open()
        # The digest is uniformly random already; 60 of its bits are the offset (record locks
        # may lie far beyond the end of the empty file).
        offset = int(digest[:15], 16)
        waited = False
        if offset not in self._held:
            delay = _POLL_FIRST
            while not self._try_lock(offset):
                waited = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _POLL_MAX)
        self._held[offset] = self._held.get(offset, 0) + 1
        try:
            yield waited
        finally:
            self._held[offset] -= 1
            if not self._held[offset]:
                del self._held[offset]
                if self._fd is not None:
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)

    def _try_lock(self, offset: int) -> bool:
        assert self._fd is not None
        try:
            # A non-blocking lock of a local file: a syscall, never a wait on the event loop.
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True
