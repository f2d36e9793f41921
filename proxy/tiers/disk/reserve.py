"""Free space held back in the cache folder, given up when the disk is full.

SQLite needs room to do anything, even to free space: opening the index writes its settings and
its shared-memory file, and a delete is committed through the write-ahead log before the entry's
file is removed. On a disk filled to the last byte (by anything: another program, a log) nothing
could then evict, DELETE or run ``cache check``. So the folder keeps a file of ``RESERVE_SIZE``
bytes for that moment: whoever is about to write the index and finds the disk (nearly) full gives
it up first, and it is taken again once the disk has room (SPEC: DELETE and ``cache check`` work on
a full disk). A reserve file, rather than a floor on our own writes, because what fills a disk
is often not us.

Every function blocks (statvfs, files): call them in the tier's executor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

FILE = "reserve"
# Opening the index (its 32 KiB shared-memory file, a few pages of settings) and deleting until
# the write-ahead log's automatic checkpoint (1000 pages of 4 KiB) lets it reuse its own pages.
RESERVE_SIZE = 4 << 20
# Less free than this, and SQLite may fail to open or commit: a few pages are all it needs then.
FULL_BELOW = 1 << 20
log = logging.getLogger(__name__)


def release_if_short(folder: str) -> bool:
    """Give the reserve up if the filesystem is (nearly) full; True if it did."""
    if shutil.disk_usage(folder).free >= FULL_BELOW:
        return False
    try:
        os.unlink(os.path.join(folder, FILE))
    except FileNotFoundError:
        return False
    log.warning("%s: the disk is full; released the %d-byte reserve so the index can free space", folder, RESERVE_SIZE)
    return True


def restore(folder: str) -> bool:
    """Take the reserve (again) if it is not whole and the filesystem has room for it twice over
    (so the next write does not give it up at once); True if it did. Processes sharing the
    folder may race here: allocating the same file's blocks twice is harmless."""
    path = os.path.join(folder, FILE)
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_blocks * 512 >= RESERVE_SIZE:
            return False
    if shutil.disk_usage(folder).free < 2 * RESERVE_SIZE:
        return False
    try:  # the reserve is a help, never a reason to fail: no inode, no permission, no reserve
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        log.warning("%s: cannot keep the %d-byte reserve: %s", folder, RESERVE_SIZE, error.strerror or error)
        return False
    try:
        os.posix_fallocate(fd, 0, RESERVE_SIZE)  # blocks, not a sparse size: they must be real
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # whatever part was allocated goes back
        return False
    finally:
        os.close(fd)
    return True
