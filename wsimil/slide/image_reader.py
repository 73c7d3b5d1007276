"""Pillow: small PNG/JPEG images, held in memory as one level."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Slide, SlideError
from .samples import pillow_layout, to_rgb8


class ImageReader(Slide):
    """Small PNG/JPEG images, held in memory (one level), converted once to RGB at open
    (:func:`.samples.pillow_layout`: gray, 16-bit, palette, alpha...)."""

    reader_name = "pillow"
    max_pixels = 200_000_000

    def __init__(self, path: Path):
        from PIL import Image

        super().__init__(path)
        with Image.open(path) as im:
            if im.width * im.height > self.max_pixels:
                raise SlideError(
                    f"{path}: {im.width} x {im.height} px is too large for a plain image; convert it to a tiled pyramidal TIFF"
                )
            arr, self.layout = pillow_layout(im, path)
            self._img = to_rgb8(arr, self.layout)
        self.level_dimensions = ((self._img.shape[1], self._img.shape[0]),)
        self.level_downsamples = (1.0,)

    def read_region(self, location, level, size):
        w, h = int(size[0]), int(size[1])
        x0, y0 = int(location[0]), int(location[1])
        H, W = self._img.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        xs, ys, xe, ye = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        if xe > xs and ye > ys:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = self._img[ys:ye, xs:xe]
        return out
