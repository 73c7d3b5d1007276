"""OpenSlide: SVS, NDPI, MRXS, SCN, BIF, VMS, generic tiled TIFF, DICOM folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Slide, SlideError
from .samples import OPENSLIDE_RGBA, to_rgb8


class OpenSlideReader(Slide):
    reader_name = "openslide"

    def __init__(self, path: Path):
        import openslide

        super().__init__(path)
        self._osr = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple(self._osr.level_dimensions)
        self.level_downsamples = tuple(self._osr.level_downsamples)
        props = self._osr.properties
        self.mpp = _openslide_mpp(props)
        self.vendor = props.get("openslide.vendor", "unknown")

    def reader_versions(self) -> str:
        import openslide

        return f"openslide-python {openslide.__version__}, OpenSlide {openslide.__library_version__} ({self.vendor})"

    def read_region(self, location, level, size):
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        try:
            img = self._osr.read_region((int(location[0]), int(location[1])), int(level), (w, h))
        except Exception as exc:  # openslide raises OpenSlideError on corrupt tiles
            raise SlideError(
                f"{self.path}: cannot read region {tuple(location)} level {level}: {exc}"
            ) from exc
        return to_rgb8(np.asarray(img), OPENSLIDE_RGBA)

    def close(self):
        self._osr.close()


def _openslide_mpp(props) -> float | None:
    """mpp from OpenSlide properties: ``openslide.mpp-x``, else the TIFF resolution tags."""
    try:
        mpp = float(props.get("openslide.mpp-x") or 0)
    except ValueError:
        mpp = 0.0
    if mpp > 0:
        return mpp
    try:
        res = float(props.get("tiff.XResolution") or 0)
    except ValueError:
        res = 0.0
    um_per_unit = {"inch": 25_400.0, "centimeter": 10_000.0}.get(
        props.get("tiff.ResolutionUnit", "")
    )
    if res > 1 and um_per_unit:
        return um_per_unit / res
    return None
