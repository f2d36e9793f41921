"""A purge generation shared by every process using one cache folder.

``cache purge``, ``cache check`` and admin DELETE remove entries from the shared index, but each
worker also holds small blobs in its own memory. Every removal bumps an 8-byte counter in a file
of the cache folder; each process maps that file, so reading the counter is a memory read (no
syscall on the hit path), and a process that sees it changed drops its memory copies.
Purges are rare, so dropping everything is cheaper than telling workers which keys went.
"""

from __future__ import annotations

import mmap
import os

FILE = "generation"
_SIZE = 8  # one native unsigned 64-bit counter


class Generation:
    def __init__(self, folder: str) -> None:
        fd = os.open(os.path.join(folder, FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                # Written, not truncated to size: a sparse page would need a block on the first
                # bump, and a full disk then kills the process with SIGBUS.
                os.pwrite(fd, bytes(_SIZE), 0)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)  # the mapping keeps the file
        self._counter = memoryview(self._map).cast("Q")  # one aligned 8-byte load per read

    def current(self) -> int:
        return self._counter[0]

    def bump(self) -> None:
        """Tell every process the folder lost entries. Two bumps racing may write the same
        value: still a change from what both had seen, which is all a reader compares."""
        self._counter[0] = (self._counter[0] + 1) % (1 << 64)

    def close(self) -> None:
        self._counter.release()
        self._map.close()
