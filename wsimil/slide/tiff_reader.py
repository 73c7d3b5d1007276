"""tifffile: TIFF layouts OpenSlide refuses (OME pyramids in SubIFDs, plain tiled/stripped TIFF)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .base import Slide, SlideError, _rgba_to_rgb_white


class TiffReader(Slide):
    """tifffile reader for pyramids OpenSlide refuses (OME SubIFDs, plain tiled/stripped TIFF)."""

    reader_name = "tifffile"

    def __init__(self, path: Path):
        import tifffile
        import zarr

        super().__init__(path)
        self._tif = tifffile.TiffFile(str(path))
        series = self._tif.series[0]
        self._levels = []
        dims = []
        for lvl in series.levels:
            shape = lvl.shape
            axes = lvl.axes
            if "Y" not in axes or "X" not in axes:
                raise SlideError(f"{path}: TIFF series has no Y/X axes ({axes})")
            h, w = shape[axes.index("Y")], shape[axes.index("X")]
            dims.append((int(w), int(h)))
            self._levels.append(lvl)
        self._axes = series.levels[0].axes
        self._arrays = [
            zarr.open(self._tif.aszarr(series=0, level=i), mode="r") for i in range(len(dims))
        ]
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(dims[0][0] / d[0] for d in dims)
        self.mpp = _tiff_mpp(self._tif)

    def reader_versions(self) -> str:
        import tifffile

        return f"tifffile {tifffile.__version__}"

    def read_region(self, location, level, size):
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        x0 = int(math.floor(location[0] / ds))
        y0 = int(math.floor(location[1] / ds))
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, np.uint8)
        xs, ys = max(x0, 0), max(y0, 0)
        xe, ye = min(x0 + w, lw), min(y0 + h, lh)
        if xe <= xs or ye <= ys:
            return out
        arr = self._arrays[level]
        sl = []
        for ax in self._axes:
            sl.append({"Y": slice(ys, ye), "X": slice(xs, xe)}.get(ax, slice(None)))
        try:
            data = np.asarray(arr[tuple(sl)])
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read region {tuple(location)} level {level}: {exc}"
            ) from exc
        data = _to_hwc(data, [a for a in self._axes if a in "YXCS"])
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = data
        return out

    def close(self):
        self._tif.close()


def _to_hwc(data: np.ndarray, axes: list[str]) -> np.ndarray:
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=2)
    elif data.ndim == 3 and data.shape[0] in (3, 4) and data.shape[2] not in (3, 4):
        data = np.moveaxis(data, 0, 2)
    if data.dtype != np.uint8:
        lo, hi = float(np.min(data)), float(np.max(data))
        data = ((data.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    if data.shape[2] == 4:
        data = _rgba_to_rgb_white(data)
    return data[..., :3]


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
