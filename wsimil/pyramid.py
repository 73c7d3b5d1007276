"""One writer for pyramidal, tiled, JPEG-compressed RGB BigTIFFs (synthetic slides, heatmaps).

The file layout is the one OpenSlide's ``generic-tiff`` reader (and QuPath) open as a single
multi-level image:

* BigTIFF, one page per level, level 0 first; reduced levels are separate pages with
  ``subfiletype=1`` (not SubIFDs), which generic-tiff needs to see them as levels;
* every page tiled (square tiles, a multiple of 16 px), JPEG-compressed with 2 x 2 chroma
  subsampling (stored as YCbCr), no ImageJ/tifffile metadata;
* optionally the resolution tags in ``CENTIMETER`` giving each level's mpp (level-0 mpp times
  the level's downsample); OpenSlide reports level 0's as ``openslide.mpp-x``/``mpp-y``.

Tiles are pulled lazily from one iterator per level, in row-major order, so nothing larger
than the tiles tifffile buffers for its encoder threads is held. An iterator yields either
uint8 ``(tile, tile, 3)`` arrays (encoded by tifffile with ``jpeg_quality``) or bytes that are
already complete JPEG streams for such a tile (written as they are: encode them with
``colorspace="RGB"``, ``outcolorspace="YCBCR"`` and ``subsampling=(2, 2)`` to match the tags).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "IndexedGridTiles",
    "PyramidLevel",
    "encode_jpeg_tile",
    "level_sizes",
    "tiles_of_rows",
    "write_tiff_pyramid",
]

JPEG_SUBSAMPLING = (2, 2)

Tiles = Iterable[np.ndarray] | Iterable[bytes]


@dataclass(frozen=True)
class PyramidLevel:
    """One level of a pyramid.

    Attributes
    ----------
    width, height : int
        Level size in pixels.
    tiles : iterable, or callable returning one
        Tiles in row-major order (``ceil(height / tile) * ceil(width / tile)`` of them), uint8
        ``(tile, tile, 3)`` arrays or encoded JPEG bytes. A callable is called only when the
        level is written, i.e. after every finer level has been written.
    downsample : float or (float, float), optional
        Level-0 pixels per pixel of this level (x, y), for the resolution tags. By default
        ``(width0 / width, height0 / height)``.
    """

    width: int
    height: int
    tiles: Tiles | Callable[[], Tiles]
    downsample: float | tuple[float, float] | None = None


def level_sizes(
    width: int, height: int, *, factor: int, max_long_side: int, min_levels: int = 1
) -> list[tuple[int, int, int]]:
    """(width, height, downsample) per level, level 0 first.

    Level ``k`` has downsample ``factor**k`` and size ``ceil(size0 / factor**k)``. Levels are
    added while there are fewer than ``min_levels`` or the coarsest level's long side exceeds
    ``max_long_side``, and never beyond a 1 x 1 level.
    """
    out, d = [(int(width), int(height), 1)], 1
    while len(out) < min_levels or max(out[-1][:2]) > max_long_side:
        if out[-1][:2] == (1, 1):
            break
        d *= factor
        out.append((-(-int(width) // d), -(-int(height) // d), d))
    return out


def tiles_of_rows(rows: np.ndarray, width: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles (tile, tile, 3) of one row of tiles; partial edge tiles are padded by replication.

    ``rows`` holds at most ``tile`` rows of a ``width``-pixel-wide level. Full tiles are views
    of ``rows`` (copy them if they must outlive it).
    """
    full_w = width - width % tile
    if len(rows) == tile:
        for x in range(0, full_w, tile):
            yield rows[:, x : x + tile]
    else:
        rows_p = np.pad(rows, ((0, tile - len(rows)), (0, 0), (0, 0)), mode="edge")
        for x in range(0, full_w, tile):
            yield rows_p[:, x : x + tile]
        rows = rows_p
    if full_w < width:
        yield np.pad(rows[:, full_w:], ((0, 0), (0, tile - (width - full_w)), (0, 0)), mode="edge")


def encode_jpeg_tile(tile: np.ndarray, quality: int) -> bytes:
    """One uint8 RGB tile as the JPEG bytes :func:`write_tiff_pyramid` expects (YCbCr, 2 x 2)."""
    import imagecodecs

    return imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=JPEG_SUBSAMPLING
    )


class IndexedGridTiles:
    """Encoded JPEG tiles of an image given as a coarse grid of palette indices.

    Level-0 pixel (x, y) has the colour ``palette[grid[y // step, x // step]]``, so any level's
    tiles are built from a few grid cells (nearest neighbour), never from a level-0 image.
    Tiles of a single colour are encoded once per colour and reused at every level.

    Parameters
    ----------
    grid : ndarray, shape (gh, gw), int
        Palette index per grid cell.
    palette : ndarray, shape (n, 3), uint8
    step : int
        Level-0 pixels per grid cell.
    tile_px : int
    jpeg_quality : int

    Attributes
    ----------
    tiles_encoded, tiles_written : int
        Tiles JPEG-encoded and tiles yielded so far.
    """

    def __init__(
        self, grid: np.ndarray, palette: np.ndarray, *, step: int, tile_px: int, jpeg_quality: int
    ):
        self.grid, self.palette = grid, palette
        self.step, self.tile_px, self.quality = int(step), int(tile_px), jpeg_quality
        self._cache: dict[int, bytes] = {}
        self.tiles_encoded = self.tiles_written = 0

    def _encode(self, block: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> bytes:
        self.tiles_encoded += 1
        # repeat the small block of cells (runs of cy x cx pixels) instead of gathering
        tile = np.repeat(np.repeat(self.palette[block], cy, axis=0), cx, axis=1)
        return encode_jpeg_tile(tile, self.quality)

    def level(self, width: int, height: int, downsample: int) -> Iterator[bytes]:
        """Tiles of the level of size ``width`` x ``height`` at ``downsample``, row-major."""
        gh, gw = self.grid.shape
        t, step = self.tile_px, self.step
        for ty in range(0, height, t):
            gy = np.minimum((np.arange(ty, ty + t, dtype=np.int64) * downsample) // step, gh - 1)
            for tx in range(0, width, t):
                gx = np.minimum(
                    (np.arange(tx, tx + t, dtype=np.int64) * downsample) // step, gw - 1
                )
                block = self.grid[gy[0] : gy[-1] + 1, gx[0] : gx[-1] + 1]
                first = int(block.flat[0])
                uniform = bool((block == first).all())
                if uniform and first in self._cache:
                    data = self._cache[first]
                else:
                    _, cy = np.unique(gy, return_counts=True)
                    _, cx = np.unique(gx, return_counts=True)
                    data = self._encode(block, cy, cx)
                    if uniform:
                        self._cache[first] = data
                self.tiles_written += 1
                yield data


def _resolution(mpp: float | None, level: PyramidLevel, size0: tuple[int, int]) -> dict:
    """TiffWriter resolution arguments of one level (none when ``mpp`` is None)."""
    if mpp is None:
        return {}
    ds = level.downsample
    if ds is None:
        ds = (size0[0] / level.width, size0[1] / level.height)
    elif not isinstance(ds, tuple):
        ds = (ds, ds)
    return {
        "resolution": (1e4 / (mpp * ds[0]), 1e4 / (mpp * ds[1])),
        "resolutionunit": "CENTIMETER",
    }


def write_tiff_pyramid(
    path: str | Path,
    levels: Sequence[PyramidLevel | tuple],
    *,
    tile_px: int,
    mpp: float | None,
    jpeg_quality: int = 90,
    software: str | bool | None = None,
    atomic: bool = False,
    maxworkers: int | None = None,
    buffersize: int | None = None,
) -> Path:
    """Write a pyramidal, tiled, JPEG RGB BigTIFF (see the module notes for the layout).

    Parameters
    ----------
    path : str or Path
        Output ``.tiff``.
    levels : sequence of PyramidLevel or (width, height, tiles[, downsample]) tuples
        Level 0 first.
    tile_px : int
        Tile side, a multiple of 16 (JPEG 2 x 2 chroma subsampling).
    mpp : float or None
        Microns per level-0 pixel; None writes no resolution tags.
    jpeg_quality : int
        JPEG quality (1-100) of tiles given as arrays.
    software : str, optional
        The Software tag (None: tifffile's default, False: none).
    atomic : bool
        Write ``.<name>.tmp.tiff`` next to ``path`` and rename it into place when complete
        (removed if writing fails). Otherwise ``path`` is written in place.
    maxworkers, buffersize : int, optional
        tifffile's encoder threads and the bytes of tiles it collects for them (array tiles).

    Returns
    -------
    Path
        ``path``.
    """
    import tifffile

    path = Path(path)
    tile_px = int(tile_px)
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    levels = [lv if isinstance(lv, PyramidLevel) else PyramidLevel(*lv) for lv in levels]
    if not levels:
        raise ValueError("a pyramid needs at least one level")
    size0 = (levels[0].width, levels[0].height)
    common = dict(
        dtype=np.uint8,
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(jpeg_quality)},
        subsampling=JPEG_SUBSAMPLING,
        tile=(tile_px, tile_px),
        metadata=None,
        software=software,
        maxworkers=maxworkers,
        buffersize=buffersize,
    )
    out = path.with_name(f".{path.name}.tmp.tiff") if atomic else path
    try:
        with tifffile.TiffWriter(out, bigtiff=True) as tw:
            for k, lv in enumerate(levels):
                tiles = lv.tiles() if callable(lv.tiles) else lv.tiles
                tw.write(
                    data=iter(tiles),
                    shape=(lv.height, lv.width, 3),
                    subfiletype=1 if k else None,  # level 0: no tag (default 0)
                    **_resolution(mpp, lv, size0),
                    **common,
                )
    except BaseException:
        if atomic:
            out.unlink(missing_ok=True)
        raise
    if atomic:
        os.replace(out, path)
    return path
