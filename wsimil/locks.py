"""Per-slide locks so several workers can share one cohort without clobbering each other.

A lock is ``fcntl.flock`` on ``<stage folder>/.locks/<slide_id>.lock``, taken non-blocking: a
worker that cannot take it skips the slide. The kernel drops the lock when its process dies
(even by SIGKILL), so a killed run never leaves a slide locked. On shared file systems flock
works across hosts on NFS (v4, or v3 with lockd) and on Lustre mounted with ``-o flock``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .layout import StageFolder


class SlideLock:
    """A non-blocking exclusive lock on one lock file; :meth:`acquire` then :meth:`release`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False) -> bool:
        """True when this process now holds the lock; False when another process does.

        With ``wait``, block until the lock is free (for short cohort-wide steps).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


@contextmanager
def slide_lock(folder: str | Path, slide_id: str) -> Iterator[bool]:
    """Try to lock ``slide_id`` in the stage folder ``folder``; yields True when held here."""
    lock = SlideLock(StageFolder(Path(folder)).lock_file(slide_id))
    mine = lock.acquire()
    try:
        yield mine
    finally:
        lock.release()
