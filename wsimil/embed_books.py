"""The embed stage's books: each slide's open feature store while its batches arrive.

Batches span slides (:class:`wsimil.tile_reader.TileBatches`), so the features of one batch
are routed back to several slides, each in tile order; a slide's store is renamed into place
when its last tile is written, and a slide that fails has its partial store removed while the
other slides of its batches go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import __version__
from .runner import SlideOutcome
from .store import PendingStore, RowWriter, zstd_compressors


class SlideBooks:
    """Open stores, failures and start times of the slides of one loader window.

    Parameters
    ----------
    jobs : list
        The window's :class:`wsimil.tile_reader.SlideJob`.
    begin : callable
        ``begin(job)`` -> a new :class:`wsimil.store.PendingStore` for the slide's features.
    """

    def __init__(self, jobs: list, begin: Callable[[object], PendingStore]):
        self.jobs, self.begin = jobs, begin
        self.open: dict[int, tuple[PendingStore, RowWriter]] = {}
        self.failed: set[int] = set()
        self.started: dict[int, float] = {}

    def start(self, j: int) -> bool:
        """Note that slide ``j`` has tiles in flight; False when it already failed."""
        self.started.setdefault(j, time.perf_counter())
        return j not in self.failed

    def fail(self, j: int, outcome: SlideOutcome) -> SlideOutcome:
        """Slide ``j`` failed: its partial store is removed; later parts of it are skipped."""
        self.failed.add(j)
        current = self.open.pop(j, None)
        if current is not None:
            current[0].abort()
        return outcome

    def write(self, j: int, feats: np.ndarray) -> SlideOutcome | None:
        """Append the next features of slide ``j``; its outcome when the slide ends, else None."""
        job = self.jobs[j]
        if j in self.failed:  # failed while this batch was in flight
            return None
        if j not in self.open:
            pending = self.begin(job)
            self.open[j] = (pending, RowWriter(pending.group["features"]))
        pending, writer = self.open[j]
        if not np.all(np.isfinite(feats)):
            return self.fail(
                j,
                SlideOutcome(
                    "error", f"{job.path}: non-finite features; check the encoder and its weights"
                ),
            )
        try:
            writer.append(feats.astype(np.float16))
            if writer.rows < len(job.coords):
                return None
            writer.flush()
            pending.commit()
        except BaseException:
            self.open.pop(j, None)
            self.failed.add(j)
            pending.abort()  # no partial store is left behind, whatever failed
            raise
        del self.open[j]
        seconds = time.perf_counter() - self.started[j]
        return SlideOutcome("ok", "", {"n_tiles": len(job.coords), "seconds": seconds})

    def abort_all(self) -> None:
        """Remove the partial stores of slides still open (the loop ended early)."""
        for pending, _ in self.open.values():
            pending.abort()
        self.open.clear()


def begin_feature_store(path: Path, job, dim: int, enc_attrs: dict, device: str) -> PendingStore:
    """A new partial feature store for ``job`` (a SlideJob): features, coords and attrs."""
    n = len(job.coords)
    pending = PendingStore(path)
    try:
        g = pending.group
        chunk = max(1, min(n, 4096))
        g.create_array(
            "features",
            shape=(n, dim),
            dtype="float16",
            chunks=(chunk, dim),
            compressors=zstd_compressors(),
        )
        coords = g.create_array(
            "coords", shape=(n, 2), dtype="int32", chunks=(chunk, 2), compressors=zstd_compressors()
        )
        if n:
            coords[...] = job.coords
        tattrs = dict(job.tile_attrs)
        chash = tattrs.pop("config_hash_embed")
        g.update_attributes(
            {
                "slide_id": job.slide_id,
                "n_tiles": n,
                "feature_dim": dim,
                "encoder": enc_attrs,
                "tiles": {k: tattrs[k] for k in sorted(tattrs)},
                "config_hash": chash,
                "device": device,
                "wsimil_version": __version__,
            }
        )
    except BaseException:
        pending.abort()  # no partial store is left behind
        raise
    return pending
