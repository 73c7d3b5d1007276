"""Per-slide outputs on disk: atomic Zarr stores, status lines, config hashes.

A store is written under a temporary name next to its final path and renamed into place
when complete, so a store that exists is complete; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def config_hash(settings: dict) -> str:
    """Short stable hash of the settings that shaped an output."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def zstd_compressors():
    import zarr

    return (zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)


class PendingStore:
    """A Zarr v3 group written under a temporary name and renamed into place by :meth:`commit`.

    Use it for streamed writes; :func:`atomic_store` wraps it for one-shot writes.
    """

    def __init__(self, final_path: str | Path):
        import zarr

        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.final_path.with_name(
            f".{self.final_path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        )
        if self.tmp_path.exists():
            shutil.rmtree(self.tmp_path)
        self.group = zarr.open_group(str(self.tmp_path), mode="w", zarr_format=3)

    def commit(self) -> None:
        """Rename the finished store into place (replacing an older one only now)."""
        if self.final_path.exists():
            old = self.final_path.with_name(f".{self.final_path.name}.old-{os.getpid()}")
            os.replace(self.final_path, old)
            os.replace(self.tmp_path, self.final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp_path, self.final_path)

    def abort(self) -> None:
        """Remove the temporary store; nothing appears at the final path."""
        shutil.rmtree(self.tmp_path, ignore_errors=True)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporary stores left by killed runs on this host.

    A temporary store is named ``.<name>.tmp-<host>-<pid>``; it is stale when ``<host>`` is this
    machine and process ``<pid>`` no longer runs. Temporary stores of other hosts (shared file
    systems) are left alone.

    Returns
    -------
    list of Path
        The removed folders.
    """
    folder = Path(folder)
    host = socket.gethostname()
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        head, sep, tail = p.name.rpartition(".tmp-")
        if not (sep and head.startswith(".")):
            continue
        t_host, _, pid = tail.rpartition("-")
        if t_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_store(final_path: str | Path) -> Iterator:
    """Yield a new Zarr group that appears at ``final_path`` only if the block completes."""
    pending = PendingStore(final_path)
    try:
        yield pending.group
    except BaseException:
        pending.abort()
        raise
    pending.commit()


def write_array(group, name: str, data: np.ndarray, *, chunk_rows: int = 4096) -> None:
    """Write a 1-D or 2-D array into ``group`` compressed, chunked along the first axis."""
    data = np.asarray(data)
    chunks = (max(1, min(chunk_rows, data.shape[0])),) + tuple(data.shape[1:])
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=chunks, compressors=zstd_compressors()
    )
    if data.size:
        arr[...] = data


def open_store(path: str | Path):
    """Open a complete store read-only."""
    import zarr

    return zarr.open_group(str(path), mode="r")


def store_status(path: str | Path, expected_hash: str) -> str:
    """``"missing"``, ``"complete"`` (same settings) or ``"changed"`` (other settings)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        attrs = dict(open_store(path).attrs)
    except Exception:
        return "missing"
    return "complete" if attrs.get("config_hash") == expected_hash else "changed"


class StatusLog:
    """Append-only ``status.jsonl``: one JSON line per slide attempt."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(
        self, slide_id: str, status: str, message: str = "", seconds: float = 0.0, **extra
    ) -> None:
        line = {
            "slide_id": slide_id,
            "status": status,
            "message": message,
            "seconds": round(float(seconds), 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra,
        }
        # One write() of a short line with O_APPEND: lines from several workers do not interleave.
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
