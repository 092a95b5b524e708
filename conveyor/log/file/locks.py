"""Exclusive locks on files of the log (``writer.lock``, ``groups/<group>.lock``): one writer per
log, one reader per group."""
from __future__ import annotations

import fcntl
import gc
import os
import socket
from pathlib import Path

from conveyor.errors import LogError


def lock(path: Path, refusal: str):
    """An exclusive flock on ``path`` (released when the process ends), holding our pid."""
    f = open(path, "a+")
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    if not _try_lock(f):
        f.seek(0)
        holder = f.read().strip()
        # A reader or writer of this process dropped without close() (a crash inside a library
        # caller) holds the lock until it is collected: collect it, then try once more.
        if holder == me:
            gc.collect()
        if holder != me or not _try_lock(f):
            f.close()
            raise LogError(refusal.format(holder=holder or "another process"))
    f.truncate(0)
    f.write(me)
    f.flush()
    return f


def _try_lock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def unlock(f) -> None:
    if f is not None and not f.closed:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
