"""Crash recovery: what processes killed at any moment leave in the cache folder.

- Spool folders (``spool/<pid>``): every process spools into its own, so one starting cannot
  clear another's writes in progress; a folder whose process is gone holds partial or
  unverified writes and is removed at start.
- Torn entries: a value file linked in by a process killed before its index row was committed.
  The index does not know it, so no size limit or ``cache check`` ever sees it. Value files
  carry their writer's pid (index.RawDisk.filename); the sweep removes unknown ones whose
  writer is gone. It walks the whole folder, so it runs in the background after start.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from proxy.liveness import writer_gone, writer_of
from proxy.tiers.disk.index import VALUE_SUFFIX, Index

SPOOL_DIR = "spool"  # temp files live inside the cache so a commit is a hard link, not a copy
# A value file without a pid in its name (written by an older version) and unknown to the index
# is torn once it is this old: a commit in flight takes far less (link, then one SQLite row).
LEGACY_GRACE = 600.0
log = logging.getLogger(__name__)


def claim_spool(cache_folder: str) -> str:
    """Remove the spool folders of processes that are gone; make and return this process's."""
    root = os.path.join(cache_folder, SPOOL_DIR)
    os.makedirs(root, mode=0o700, exist_ok=True)
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)  # the single-process layout of earlier versions
            continue
        pid = writer_of(entry.name, "")
        # A folder not named by a pid is of no process of ours (or an older layout): gone too.
        if pid is None or writer_gone(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
    folder = os.path.join(root, str(os.getpid()))
    os.makedirs(folder, mode=0o700)
    return folder


def sweep_torn(index: Index, started: float) -> list[str]:
    """Remove value files the index does not know whose writer is gone; the removed paths.
    ``started``: when this process started writing (its own older files are a dead namesake's)."""
    listed = _value_files(index.path)  # listed before the known set is read: a file committed
    known = index.files()  # in between is known, one linked later is not listed
    own = os.getpid()
    removed = []
    now = time.time()
    for relative in listed - known:
        full = os.path.join(index.path, relative)
        try:
            changed = os.stat(full).st_ctime  # a hard link sets ctime: when it was linked in
        except FileNotFoundError:
            continue  # evicted meanwhile
        pid = writer_of(os.path.basename(relative), "")
        if pid is None:
            torn = now - changed > LEGACY_GRACE
        elif pid == own:
            torn = changed < started
        else:
            torn = writer_gone(pid)
        if torn:
            try:
                os.unlink(full)
            except FileNotFoundError:
                continue
            removed.append(full)
    if removed:
        log.warning("%s: removed %d torn entries left by killed processes", index.path, len(removed))
    return removed


def _value_files(folder: str) -> set[str]:
    """diskcache's value files: two levels of folders, then ``*.val``."""
    found = set()
    for top in _folders(folder):
        if top.name == SPOOL_DIR:
            continue
        for sub in _folders(top.path):
            for entry in os.scandir(sub.path):
                if entry.name.endswith(VALUE_SUFFIX) and entry.is_file(follow_symlinks=False):
                    found.add(os.path.join(top.name, sub.name, entry.name))
    return found


def _folders(path: str) -> list[os.DirEntry[str]]:
    try:
        return [entry for entry in os.scandir(path) if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
