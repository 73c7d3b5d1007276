"""Per-slide locks so several workers can share one cohort without clobbering each other.

A lock is ``fcntl.flock`` on ``<folder>/.locks/<slide_id>.lock``, taken non-blocking: a worker
that cannot take it skips the slide. The kernel drops the lock when its process dies (even by
SIGKILL), so a killed run never leaves a slide locked.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def slide_lock(folder: str | Path, slide_id: str) -> Iterator[bool]:
    """Try to lock ``slide_id`` in ``folder``; yields True when this process holds the lock.

    Parameters
    ----------
    folder : path
        Stage output folder; locks live in ``folder/.locks``.
    slide_id : str
        The slide to lock.
    """
    lock_dir = Path(folder) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{slide_id}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_slide_temps(folder: str | Path, name: str) -> list[Path]:
    """Remove temporary leftovers of ``folder/name`` from killed runs.

    Call only while holding the slide's lock: then no live worker writes these paths, whatever
    host or process id their names carry. Removes ``.<name>.tmp-*`` and ``.<name>.old-*``
    folders and ``<name>.tmp*`` files.

    Returns
    -------
    list of Path
        What was removed.
    """
    folder = Path(folder)
    removed = []
    patterns = (f".{name}.tmp-*", f".{name}.old-*", f"{name}.tmp*")
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
