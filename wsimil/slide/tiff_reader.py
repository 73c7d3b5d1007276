"""tifffile: TIFF layouts OpenSlide refuses (OME pyramids in SubIFDs, plain tiled/stripped TIFF)
and sample layouts it misreads (16-bit, float, gray + alpha...; see :mod:`.samples`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .base import Slide, SlideError
from .samples import SampleLayout, tiff_layout, to_rgb8

_RANGE_PIXELS = 4_000_000  # a coarsest level up to this size is read whole for the value range
_RANGE_BLOCKS, _RANGE_BLOCK_PX = 8, 256  # else 8 x 8 blocks of 256 px spread over it


class TiffReader(Slide):
    """tifffile reader for pyramids OpenSlide refuses (OME SubIFDs, plain tiled/stripped TIFF)
    and for sample layouts other than 8-bit RGB (converted by :func:`.samples.to_rgb8`)."""

    reader_name = "tifffile"

    def __init__(self, path: Path):
        import tifffile
        import zarr

        super().__init__(path)
        self._tif = tifffile.TiffFile(str(path))
        try:
            series = self._tif.series[0]
            self.layout: SampleLayout = tiff_layout(series.keyframe, path)
            dims = [_level_size(lvl.axes, lvl.shape, path, self.layout) for lvl in series.levels]
            self._axes = [lvl.axes for lvl in series.levels]
            self._arrays = [
                zarr.open(self._tif.aszarr(series=0, level=i), mode="r") for i in range(len(dims))
            ]
            self.level_dimensions = tuple(dims)
            self.level_downsamples = tuple(dims[0][0] / d[0] for d in dims)
            self.mpp = _tiff_mpp(self._tif)
            if self.layout.needs_range:
                self.layout = self.layout.with_range(self._range_sample())
        except Exception:
            self._tif.close()
            raise

    def reader_versions(self) -> str:
        import tifffile

        return f"tifffile {tifffile.__version__}"

    def _read_native(self, level: int, ys: int, ye: int, xs: int, xe: int) -> np.ndarray:
        """Samples of a level-pixel box as stored, shape (h, w, S)."""
        axes = self._axes[level]
        box = {"Y": slice(ys, ye), "X": slice(xs, xe), "C": slice(None), "S": slice(None)}
        # Other axes (pages of a stack) -> their first image; samples (C, S) kept.
        data = np.asarray(self._arrays[level][tuple(box.get(a, 0) for a in axes)])
        keep = [a for a in axes if a in box]
        order = [keep.index("Y"), keep.index("X")] + [i for i, a in enumerate(keep) if a in "CS"]
        data = data.transpose(order)
        return data.reshape(data.shape[0], data.shape[1], -1)

    def _range_sample(self) -> np.ndarray:
        """Samples of the coarsest level (or blocks spread over it) for the value range."""
        level = self.level_count - 1
        lw, lh = self.level_dimensions[level]
        if lw * lh <= _RANGE_PIXELS:
            return self._read_native(level, 0, lh, 0, lw)
        b, n = _RANGE_BLOCK_PX, _RANGE_BLOCKS
        blocks = []
        for y in np.linspace(0, max(lh - b, 0), n).astype(int):
            for x in np.linspace(0, max(lw - b, 0), n).astype(int):
                blocks.append(self._read_native(level, y, min(y + b, lh), x, min(x + b, lw)))
        return np.concatenate([blk.reshape(-1, blk.shape[2]) for blk in blocks])[None]

    def read_region(self, location, level, size):
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        x0 = int(math.floor(location[0] / ds))
        y0 = int(math.floor(location[1] / ds))
        lw, lh = self.level_dimensions[level]
        out = np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        xs, ys = max(x0, 0), max(y0, 0)
        xe, ye = min(x0 + w, lw), min(y0 + h, lh)
        if xe <= xs or ye <= ys:
            return out
        try:
            data = self._read_native(level, ys, ye, xs, xe)
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read region {tuple(location)} level {level}: {exc}"
            ) from exc
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = to_rgb8(data, self.layout)
        return out

    def close(self):
        self._tif.close()


def _level_size(axes: str, shape, path, layout: SampleLayout) -> tuple[int, int]:
    """(width, height) of a level; refuses series that are not one image (channels, no Y/X)."""
    if "Y" not in axes or "X" not in axes:
        raise SlideError(f"{path}: TIFF series has no Y/X axes ({axes})")
    n_samples = math.prod(n for a, n in zip(axes, shape, strict=True) if a in "CS")
    allowed = layout.colour if layout.alpha is None else layout.alpha + 1
    rgb_extras = layout.colour == 3 and "C" not in axes  # extra samples of RGB are ignored
    if n_samples > allowed and not rgb_extras:
        raise SlideError(
            f"{path}: {n_samples}-channel {layout.name} image (axes {axes}) not supported; "
            "convert it to RGB"
        )
    return int(shape[axes.index("X")]), int(shape[axes.index("Y")])


def _tiff_mpp(tif) -> float | None:
    """mpp from TIFF resolution tags (or an OME/Aperio description), else None."""
    import re

    page = tif.pages[0]
    desc = page.description or ""
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if m:
        return float(m.group(1))
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', desc)
    if m:
        return float(m.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den:
            per_unit = num / den
            um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)
            if um_per_unit and per_unit > 1:
                return um_per_unit / per_unit
    return None
