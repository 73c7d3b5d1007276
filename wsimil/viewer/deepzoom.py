"""Deep Zoom tiles made on demand: of a slide, and of its attention overlay.

Deep Zoom (the format OpenSeadragon reads) numbers levels from 0 (1 x 1 px) to ``max_level``
(the full image), each half the size of the next; a level is cut into ``tile`` x ``tile``
tiles, each with ``overlap`` extra pixels on its inner sides.

- :class:`OpenSlideTiles`: a slide OpenSlide opens, through OpenSlide's own
  ``DeepZoomGenerator`` (tiles from the nearest pyramid level, resampled by OpenSlide);
- :class:`ReaderTiles`: a slide only wsimil's other readers open (tifffile pyramids OpenSlide
  refuses, non-8-bit TIFFs, PNG/JPEG), from :meth:`wsimil.slide.Slide.read_region` at the
  coarsest level at least as fine as the tile needs;
- :class:`OverlayTiles`: the overlay, from a small grid image of one cell per tile-grid step
  (as the pyramidal heatmap TIFF is made), expanded cell by cell with no smoothing, so tile
  edges stay sharp at every zoom and memory is bounded by the grid.

All three have ``dzi()`` (the XML descriptor), ``tile(level, col, row) -> bytes`` and
``media_type``; a tile address outside the image raises :class:`TileNotFound`.
"""

from __future__ import annotations

import io
import math
import threading

import numpy as np

DZI_NS = "http://schemas.microsoft.com/deepzoom/2008"
SLIDE_TILE = 254  # OpenSlide's default: with the 1 px overlap on both sides, 256 px tiles
OVERLAY_TILE = 256


class TileNotFound(LookupError):
    """A Deep Zoom level or tile address outside the image."""


class DeepZoomGrid:
    """Deep Zoom geometry of a ``width`` x ``height`` image."""

    def __init__(self, width: int, height: int, *, tile: int = 256, overlap: int = 0):
        self.width, self.height = int(width), int(height)
        self.tile_px, self.overlap = int(tile), int(overlap)
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def level_size(self, level: int) -> tuple[int, int]:
        d = 2 ** (self.max_level - level)
        return max(1, -(-self.width // d)), max(1, -(-self.height // d))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of a tile in pixels of ``level``, overlap included."""
        if not 0 <= level <= self.max_level:
            raise TileNotFound(f"level {level}")
        w, h = self.level_size(level)
        t, o = self.tile_px, self.overlap
        if not (0 <= col < -(-w // t) and 0 <= row < -(-h // t)):
            raise TileNotFound(f"tile {col}_{row} of level {level}")
        x0, y0 = max(0, col * t - o), max(0, row * t - o)
        return x0, y0, min(w, (col + 1) * t + o), min(h, (row + 1) * t + o)

    def dzi(self, fmt: str) -> str:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_NS}" Format="{fmt}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_px}"><Size Width="{self.width}" '
            f'Height="{self.height}"/></Image>\n'
        )


def _encode(img: np.ndarray, fmt: str, quality: int = 80) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _SlideTiles:
    """What both slide tile sources share: the Deep Zoom levels at or below the resolution of
    the slide's coarsest pyramid level are cut from that level, read once and kept (at most
    ``small_px`` on its long side). Those levels would otherwise each read the whole coarsest
    level again: about ten requests of 100 ms on the first view of a large slide."""

    media_type = "image/jpeg"

    def __init__(self, slide, *, quality: int = 80, small_px: int = 4096):
        w, h = slide.dimensions
        self.slide, self.quality = slide, quality
        self.grid = DeepZoomGrid(w, h, tile=SLIDE_TILE, overlap=1)
        self._small_level = slide.level_count - 1
        sw, sh = slide.level_dimensions[self._small_level]
        self._small_ds = float(slide.level_downsamples[self._small_level])
        self._small_ok = max(sw, sh) <= small_px
        self._small = None
        self._lock = threading.Lock()

    def dzi(self) -> str:
        return self.grid.dzi("jpeg")

    def tile(self, level: int, col: int, row: int) -> bytes:
        x0, y0, x1, y1 = self.grid.tile_box(level, col, row)
        d = 2 ** (self.grid.max_level - level)  # level-0 px per px of this Deep Zoom level
        if self._small_ok and d >= self._small_ds:
            return _encode(self._from_small(d, (x0, y0, x1, y1)), "jpeg", self.quality)
        return self._tile(level, col, row, d, (x0, y0, x1, y1))

    def _from_small(self, d: float, box) -> np.ndarray:
        from PIL import Image

        with self._lock:
            if self._small is None:
                size = self.slide.level_dimensions[self._small_level]
                self._small = Image.fromarray(
                    self.slide.read_region((0, 0), self._small_level, size)
                )
        x0, y0, x1, y1 = box
        f = d / self._small_ds  # px of the kept level per Deep Zoom px
        sw, sh = self._small.size
        src = (x0 * f, y0 * f, min(sw, x1 * f), min(sh, y1 * f))
        return np.asarray(self._small.resize((x1 - x0, y1 - y0), Image.Resampling.BOX, box=src))

    def _tile(self, level, col, row, d, box) -> bytes:
        raise NotImplementedError


class OpenSlideTiles(_SlideTiles):
    """Slide tiles from OpenSlide's ``DeepZoomGenerator`` (:data:`SLIDE_TILE` px, 1 px overlap)."""

    def __init__(self, slide, **kwargs):
        from openslide.deepzoom import DeepZoomGenerator

        super().__init__(slide, **kwargs)
        self.gen = DeepZoomGenerator(
            slide._osr, tile_size=SLIDE_TILE, overlap=1, limit_bounds=False
        )
        assert self.gen.level_count == self.grid.max_level + 1

    def _tile(self, level, col, row, d, box) -> bytes:
        buf = io.BytesIO()
        self.gen.get_tile(level, (col, row)).convert("RGB").save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()


class ReaderTiles(_SlideTiles):
    """Slide tiles from any wsimil reader (one read at a time: not every reader is thread-safe)."""

    def _tile(self, level, col, row, d, box) -> bytes:
        from PIL import Image

        x0, y0, x1, y1 = box
        sl = self.slide.best_level_at_or_finer(d)
        sd = float(self.slide.level_downsamples[sl])
        size = (max(1, round((x1 - x0) * d / sd)), max(1, round((y1 - y0) * d / sd)))
        with self._lock:
            img = self.slide.read_region((x0 * d, y0 * d), sl, size)
        if size != (x1 - x0, y1 - y0):
            img = np.asarray(Image.fromarray(img).resize((x1 - x0, y1 - y0), Image.Resampling.BOX))
        return _encode(img, "jpeg", self.quality)


class OverlayTiles:
    """Overlay tiles (PNG with transparency) from an RGBA grid of ``step`` level-0 px per cell."""

    media_type = "image/png"

    def __init__(self, grid_rgba: np.ndarray, *, step: int, width: int, height: int):
        self.cells, self.step = grid_rgba, int(step)
        self.grid = DeepZoomGrid(width, height, tile=OVERLAY_TILE, overlap=0)
        self._empty = None

    def dzi(self) -> str:
        return self.grid.dzi("png")

    def tile(self, level: int, col: int, row: int) -> bytes:
        x0, y0, x1, y1 = self.grid.tile_box(level, col, row)
        d = 2 ** (self.grid.max_level - level)
        gh, gw = self.cells.shape[:2]
        # the grid cell under each output pixel's centre (nearest: no smoothing)
        cy = np.minimum(((np.arange(y0, y1) + 0.5) * d // self.step).astype(np.int64), gh - 1)
        cx = np.minimum(((np.arange(x0, x1) + 0.5) * d // self.step).astype(np.int64), gw - 1)
        block = self.cells[cy[0] : cy[-1] + 1, cx[0] : cx[-1] + 1]
        if not block[..., 3].any():  # nothing drawn here: one cached transparent tile
            if self._empty is None:
                self._empty = _encode(np.zeros((1, 1, 4), np.uint8), "png")
            return self._empty
        return _encode(self.cells[cy][:, cx], "png")
