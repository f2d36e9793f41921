"""The one way to tell whether the writer of a temp file or folder is gone.

Whatever a process writes before it is committed (spool folders, queue temp files, temp files in
an fs tier or an export folder) carries the writer's pid in its name. At start, a process removes
the ones whose writer no longer runs, so a ``kill -9`` at any moment leaves nothing that outlives
the next start. A pid may be reused: a live stranger keeps an orphan until it exits (safe, only
late); a restarted container whose new process got the dead one's pid sees its own pid and
removes it, since a process that is only starting has nothing in flight.
"""

from __future__ import annotations

import os
import re


def temp_prefix(prefix: str) -> str:
    """``prefix`` followed by this process's pid: the name start of a temp file it writes."""
    return f"{prefix}{os.getpid()}-"


def writer_of(name: str, prefix: str) -> int | None:
    """The pid in a name made with ``temp_prefix(prefix)``; None for any other name."""
    match = re.match(re.escape(prefix) + r"(\d+)(?:-|$)", name)
    return int(match.group(1)) if match else None


def writer_gone(pid: int) -> bool:
    """True if no process ``pid`` runs, or it is this one (which is only starting)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, as another user
    return False


def orphans(folder: str, prefix: str) -> list[str]:
    """Paths in ``folder`` named by ``temp_prefix(prefix)`` whose writer is gone."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        pid = writer_of(entry.name, prefix)
        if pid is not None and writer_gone(pid):
            found.append(entry.path)
    return found
