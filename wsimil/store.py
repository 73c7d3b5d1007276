"""Per-slide outputs on disk: atomic folders, files and Zarr stores; status lines; config hashes.

One scheme for every stage: an output is written at :func:`wsimil.layout.partial_path`
(``.<name>.partial``) while its slide's lock is held and renamed into place when complete, so
an output that exists is complete. The next holder of the lock removes what a dead attempt
left (:func:`remove_partial`); nothing is found by globbing.
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

from .layout import partial_path, replaced_path


def config_hash(settings: dict) -> str:
    """Short stable hash of the settings that shaped an output."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def zstd_compressors():
    import zarr

    return (zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),)


def fast_compressors():
    """LZ4 (Blosc): for pixels read every epoch, where decoding speed matters more than size."""
    import zarr

    return (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def remove_partial(final: str | Path) -> bool:
    """Remove what a dead attempt left of ``final``; True when there was something.

    Call only while holding the slide's lock: then no live process writes these names.
    """
    final = Path(final)
    found = False
    for p in (partial_path(final), replaced_path(final)):
        if p.exists() or p.is_symlink():
            _remove(p)
            found = True
    return found


class Pending:
    """A file or folder written at its partial name and renamed into place by :meth:`commit`."""

    def __init__(self, final_path: str | Path, *, folder: bool = False):
        self.final_path = Path(final_path)
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        self.path = partial_path(self.final_path)
        _remove(self.path)
        if folder:
            self.path.mkdir()

    def commit(self) -> None:
        """Move the finished output into place (replacing an older one only now)."""
        if self.final_path.exists():
            old = replaced_path(self.final_path)
            _remove(old)
            os.replace(self.final_path, old)
            os.replace(self.path, self.final_path)
            _remove(old)
        else:
            os.replace(self.path, self.final_path)

    def abort(self) -> None:
        """Remove the partial output; nothing appears at the final path."""
        _remove(self.path)


class PendingStore(Pending):
    """A Zarr v3 group at its partial name (``.group``), renamed into place by :meth:`commit`."""

    def __init__(self, final_path: str | Path):
        import zarr

        super().__init__(final_path)
        try:
            self.group = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        except BaseException:
            self.abort()
            raise


@contextmanager
def atomic_output(final_path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """Yield a partial path (file or created folder) that appears at ``final_path`` on success."""
    pending = Pending(final_path, folder=folder)
    try:
        yield pending.path
    except BaseException:
        pending.abort()
        raise
    pending.commit()


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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole text file so that readers see the old or the new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def store_attrs(path: str | Path) -> dict | None:
    """A store's attributes, or None when it is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return dict(open_store(path).attrs)
    except Exception:
        return None


def store_status(path: str | Path, expected_hash: str) -> str:
    """``"missing"``, ``"complete"`` (same settings) or ``"changed"`` (other settings)."""
    attrs = store_attrs(path)
    if attrs is None:
        return "missing"
    return "complete" if attrs.get("config_hash") == expected_hash else "changed"


class StatusLog:
    """Append-only ``status.jsonl``: one JSON line per slide attempt, written as it ends."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def write(
        self, slide_id: str, status: str, message: str = "", seconds: float = 0.0, **extra
    ) -> None:
        line = {
            "slide_id": slide_id,
            "status": status,
            "message": message,
            "seconds": round(float(seconds), 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "worker": self.worker,
            **extra,
        }
        # One write() of a short line with O_APPEND: lines from several workers do not interleave.
        data = (json.dumps(line, default=_jsonable) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def read(self) -> list[dict]:
        """All lines (a partly written last line is skipped)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


class RowWriter:
    """Append rows to a Zarr array one whole chunk at a time (no read-modify-write of chunks)."""

    def __init__(self, array):
        self.array = array
        self.chunk_rows = (getattr(array, "shards", None) or array.chunks)[0]  # whole files
        self.rows = 0  # rows appended so far
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def append(self, block: np.ndarray) -> None:
        self._buf.append(block)
        self._buffered += len(block)
        self.rows += len(block)
        if self._buffered >= self.chunk_rows:
            self._write(whole_chunks_only=True)

    def flush(self) -> None:
        self._write(whole_chunks_only=False)

    def _write(self, *, whole_chunks_only: bool) -> None:
        if not self._buf:
            return
        data = np.concatenate(self._buf)
        start = self.rows - len(data)
        n = (len(data) // self.chunk_rows) * self.chunk_rows if whole_chunks_only else len(data)
        if n:
            self.array[start : start + n] = data[:n]
        rest = data[n:]
        self._buf = [rest] if len(rest) else []
        self._buffered = len(rest)


def tile_store_coords(layout, slide_id: str) -> tuple[dict, np.ndarray] | None:
    """A slide's tile store attrs and (N, 2) int32 coords, or None when it has no tile store."""
    tstore = layout.tile_store(slide_id)
    tattrs = store_attrs(tstore)
    if tattrs is None:
        return None
    return tattrs, np.asarray(open_store(tstore)["coords"][...], dtype=np.int32)
