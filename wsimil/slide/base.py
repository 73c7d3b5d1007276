"""The slide interface every reader implements, and what they share.

Coordinates are level-0 pixels ``(x, y)``; sizes are ``(width, height)``; pixel arrays are
``(H, W, 3)`` uint8 RGB. Transparent or blank areas read as white background.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class SlideError(RuntimeError):
    """A slide that cannot be opened or read; the message names the file and the reason."""


@dataclass(frozen=True)
class SlideInfo:
    """Geometry of a slide, as stored next to every per-slide output."""

    width_px: int
    height_px: int
    mpp: float | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    reader: str


class Slide:
    """Base class of the readers. Use :func:`open_slide` to get one."""

    reader_name = "base"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.mpp: float | None = None
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()

    # -- geometry ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size ``(width, height)`` in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def info(self) -> SlideInfo:
        return SlideInfo(
            width_px=int(self.dimensions[0]),
            height_px=int(self.dimensions[1]),
            mpp=self.mpp,
            level_dimensions=tuple((int(w), int(h)) for w, h in self.level_dimensions),
            level_downsamples=tuple(float(d) for d in self.level_downsamples),
            reader=self.reader_versions(),
        )

    def reader_versions(self) -> str:
        return self.reader_name

    def best_level_at_or_finer(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is <= ``downsample`` (+0.5% slack)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.005 and d >= self.level_downsamples[best]:
                best = i
        return best

    # -- pixels -----------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read pixels.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in level-0 pixels. May lie partly outside the slide.
        level : int
            Pyramid level to read from.
        size : (w, h)
            Size in pixels of ``level``.

        Returns
        -------
        ndarray, shape (h, w, 3), uint8
            RGB; areas outside the slide or transparent are white.
        """
        raise NotImplementedError

    def read_downsampled(
        self, size: tuple[int, int], *, band_bytes: int = 64 * 2**20
    ) -> np.ndarray:
        """The whole slide reduced to ``size`` = (w, h), in bounded memory.

        Reads the coarsest level at or finer than the needed downsample in horizontal bands of
        about ``band_bytes``; each band is box-averaged by an integer factor (bands hold whole
        blocks, so there are no seams) and only the reduced image is resized (area average) to
        the exact size. Memory stays near ``band_bytes`` plus the output, whatever the size of
        the level read: the one way wsimil reads a low-resolution image of a slide (tissue
        masks, QC images, thumbnails).

        Returns
        -------
        ndarray, shape (h, w, 3), uint8
        """
        from PIL import Image

        w, h = max(1, int(size[0])), max(1, int(size[1]))
        w0, h0 = self.dimensions
        level = self.best_level_at_or_finer(w0 / w)
        lw, lh = self.level_dimensions[level]
        lds = float(self.level_downsamples[level])
        f = max(1, int(min(lw / w, lh / h)))  # level px per block, whole blocks only
        rows = max(f, (band_bytes // (3 * max(lw, 1))) // f * f)
        parts = []
        for y in range(0, lh, rows):
            n = min(rows, lh - y)
            band = self.read_region((0, int(round(y * lds))), level, (lw, n))
            parts.append(np.asarray(Image.fromarray(band).reduce(f)) if f > 1 else band)
            del band
        img = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if (img.shape[1], img.shape[0]) != (w, h):
            img = np.asarray(
                Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.Resampling.BOX)
            )
        return img

    def thumbnail(self, max_px: int, **kwargs) -> tuple[np.ndarray, float]:
        """A thumbnail whose long side is at most ``max_px`` (see :meth:`read_downsampled`).

        Returns
        -------
        image : ndarray, shape (h, w, 3), uint8
        downsample : float
            Level-0 pixels per thumbnail pixel (same in x and y up to rounding).
        """
        w0, h0 = self.dimensions
        scale = min(1.0, max_px / max(w0, h0))
        img = self.read_downsampled(
            (max(1, round(w0 * scale)), max(1, round(h0 * scale))), **kwargs
        )
        return img, w0 / img.shape[1]

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
