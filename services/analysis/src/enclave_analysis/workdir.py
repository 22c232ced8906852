"""A temporary directory per analysis worker process, removed by the next worker if the process dies.

ANTs writes a registration's transforms to files (``segmentation.segment_brain`` puts them in a
temporary directory of the call, removed when the call ends). A worker process killed mid-analysis
(the kernel's OOM killer, a node drain) never ends the call: its files stayed in the pod's /tmp, an
emptyDir that outlives the container, until the volume's size limit evicted the pod.

Each worker now claims a directory of its own at start (``claim``): it holds an exclusive ``flock``
on a lock file in it for as long as it lives, and makes it the process's temporary directory, so
everything ANTs and the call write goes there. The kernel releases the lock when the process dies,
however it dies, so a directory whose lock can be taken belongs to nobody: the next worker to start
removes it (``sweep``). Process ids play no part (a restarted container reuses them). Written by
hand: no library cleans up after a killed process's temporary files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO

PREFIX = "enclave-analysis-work-"
LOCK = ".lock"
#: A directory without a lock file younger than this is left alone: its process may be between
#: creating it and locking it.
MIN_AGE_S = 60.0

_held: IO[str] | None = None


def claim(parent: Path | None = None) -> Path:
    """Remove what dead workers left under ``parent`` (the system's temporary directory when None),
    then create this process's directory, lock it for the process's life and make it the default
    of :mod:`tempfile`. The initializer of the analysis worker process."""
    global _held
    parent = Path(parent or tempfile.gettempdir())
    sweep(parent)
    path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
    # Locked before it gets its name: a sweep never sees an unlocked lock file of a living worker.
    lock = (path / f"{LOCK}.new").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (path / f"{LOCK}.new").rename(path / LOCK)
    _held = lock  # kept open (and locked) until the process exits
    tempfile.tempdir = str(path)
    return path


def sweep(parent: Path, *, min_age_s: float = MIN_AGE_S) -> list[Path]:
    """Remove the worker directories under ``parent`` whose process is gone; returns them. Best
    effort: what cannot be examined or removed (another user's, say) is left, and the worker
    starts anyway."""
    removed: list[Path] = []
    for path in parent.glob(f"{PREFIX}*"):
        try:
            if _abandoned(path, min_age_s):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:
            continue
    return removed


def _abandoned(path: Path, min_age_s: float) -> bool:
    """Whether no living worker holds ``path``: its lock can be taken, or it never got one and is
    older than ``min_age_s`` (a worker between creating it and locking it is younger)."""
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return time.time() - path.stat().st_mtime >= min_age_s
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its process lives
    finally:
        os.close(fd)  # the lock goes with it; the directory is removed next, unlocked
    return True
