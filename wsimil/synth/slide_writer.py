"""Writing a synthetic slide: render level 0 in bands, reduce on the fly, write the pyramid.

The bands are streamed as tiles to :func:`wsimil.pyramid.write_tiff_pyramid` (tifffile) and
reduced on the fly (4 x 4 block mean, level by level) into arrays for the reduced levels;
arrays larger than 256 MB are appended to a raw file in a temporary folder next to the output
(plain reads and writes rather than a memory map, whose resident pages would count towards
RSS) and read back in bands. The reduced levels are then written as separate pages with
``subfiletype=1``, which OpenSlide's generic-tiff reader needs to see them as levels.

Peak memory is about 200 MB for 10,000 and for 40,000 px square slides.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from ..pyramid import PyramidLevel, level_sizes, tiles_of_rows, write_tiff_pyramid
from .render import _render_band
from .sampling import _scene_mask
from .scene import _make_scene, _Scene

_MAX_LEVEL_BYTES = 256 * 1024 * 1024  # larger reduced levels go to a temporary file
_BAND_BYTES = 32 * 1024 * 1024  # default size of one level-0 band (uint8 RGB)
_ENCODE_BUFFER = 16 * 1024 * 1024  # tiles tifffile collects for its encoder threads
_MIN_LEVEL_LONG_SIDE = 1_000


# ------------------------------------------------------------------------------------------
# Pyramid plumbing
# ------------------------------------------------------------------------------------------
class _RowStore:
    """Rows of one reduced level, appended in order; in memory, or in a raw temporary file
    (read back with plain reads, so its pages never count towards the process's RSS)."""

    def __init__(self, height: int, width: int, tmpdir: Path, name: str):
        self.height, self.width = height, width
        self.rows = 0
        self._arr: np.ndarray | None = None
        self._fh = None
        if height * width * 3 <= _MAX_LEVEL_BYTES:
            self._arr = np.empty((height, width, 3), np.uint8)
        else:
            self._fh = open(tmpdir / f"{name}.raw", "w+b")  # noqa: SIM115 - closed in close()

    def append(self, rows: np.ndarray) -> None:
        n = len(rows)
        if self.rows + n > self.height:
            raise AssertionError("too many rows for this level")
        if self._arr is not None:
            self._arr[self.rows : self.rows + n] = rows
        else:
            self._fh.write(np.ascontiguousarray(rows).tobytes())
        self.rows += n

    def read(self, r0: int, r1: int) -> np.ndarray:
        if self._arr is not None:
            return self._arr[r0:r1]
        row_bytes = self.width * 3
        self._fh.flush()
        self._fh.seek(r0 * row_bytes)
        buf = self._fh.read((r1 - r0) * row_bytes)
        return np.frombuffer(buf, np.uint8).reshape(r1 - r0, self.width, 3)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._arr = None


def _reduce4(rows: np.ndarray, out_width: int) -> np.ndarray:
    """4 x 4 block mean (area average) of uint8 RGB rows -> (ceil(r/4), out_width, 3).

    Partial blocks at the right and bottom edges are padded by replicating the edge.
    """
    r, w = rows.shape[:2]
    pr, pc = (-r) % 4, out_width * 4 - w
    if pr or pc:
        rows = np.pad(rows, ((0, pr), (0, pc), (0, 0)), mode="edge")
    a = rows.reshape(rows.shape[0] // 4, 4, out_width * 12)
    s = a[:, 0].astype(np.uint16)
    s += a[:, 1]
    s += a[:, 2]
    s += a[:, 3]
    s = s.reshape(-1, out_width, 4, 3)
    t = s[:, :, 0] + s[:, :, 1]
    t += s[:, :, 2]
    t += s[:, :, 3]
    t += 8
    t >>= 4
    return t.astype(np.uint8)


class _Pyramid:
    """Cascade of 4x reductions fed with level-0 bands; rows of every reduced level are stored."""

    def __init__(self, dims: list[tuple[int, int]], tmpdir: Path):
        self.dims = dims  # (width, height) per level
        self.stores = [
            _RowStore(h, w, tmpdir, f"level{k}") for k, (w, h) in enumerate(dims) if k > 0
        ]
        self.carry: list[np.ndarray | None] = [None] * len(dims)

    def push(self, level: int, rows: np.ndarray, final: bool = False) -> None:
        if level + 1 >= len(self.dims):
            return
        buf = rows if self.carry[level] is None else np.concatenate([self.carry[level], rows])
        n = len(buf) if final else (len(buf) // 4) * 4
        self.carry[level] = buf[n:] if n < len(buf) else None
        if n == 0 and not final:
            return
        red = (
            _reduce4(buf[:n], self.dims[level + 1][0])
            if n
            else np.empty((0, self.dims[level + 1][0], 3), np.uint8)
        )
        self.stores[level].append(red)
        self.push(level + 1, red, final)

    def close(self) -> None:
        for s in self.stores:
            s.close()


def _level_dims(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) per level: downsample 4**k, until the long side is <= 1,000 px (>= 2)."""
    sizes = level_sizes(width, height, factor=4, max_long_side=_MIN_LEVEL_LONG_SIDE, min_levels=2)
    return [(w, h) for w, h, _ in sizes]


def _level0_tiles(
    scene: _Scene, pyramid: _Pyramid, band: int, tile_px: int
) -> Iterator[np.ndarray]:
    """Level-0 tiles, rendered band by band; each band is also fed to the pyramid."""
    for y0 in range(0, scene.height, band):
        y1 = min(y0 + band, scene.height)
        rows = _render_band(scene, y0, y1)
        pyramid.push(0, rows, final=y1 == scene.height)
        for r in range(0, y1 - y0, tile_px):
            # copies, so tiles queued for the encoder threads do not pin whole bands
            for t in tiles_of_rows(rows[r : r + tile_px], scene.width, tile_px):
                yield t.copy()
        del rows


def _stored_level_tiles(store: _RowStore, level: int, tile_px: int) -> Iterator[np.ndarray]:
    """Tiles of a reduced level, once level 0 (and so this level) is complete."""
    if store.rows != store.height:
        raise AssertionError(f"level {level}: {store.rows} of {store.height} rows")
    for r in range(0, store.height, tile_px):
        yield from tiles_of_rows(
            store.read(r, min(r + tile_px, store.height)), store.width, tile_px
        )


def _pyramid_levels(
    scene: _Scene, pyramid: _Pyramid, band: int, tile_px: int
) -> list[PyramidLevel]:
    """The levels to write: level 0 rendered lazily, then the reduced levels from the stores."""
    levels = [PyramidLevel(scene.width, scene.height, _level0_tiles(scene, pyramid, band, tile_px))]
    for k, store in enumerate(pyramid.stores, start=1):
        levels.append(
            PyramidLevel(store.width, store.height, partial(_stored_level_tiles, store, k, tile_px))
        )
    return levels


def _band_height(width_px: int, tile_px: int, band_rows: int | None) -> int:
    """Level-0 rows rendered at once: about _BAND_BYTES, at most 2,048, whole rows of tiles."""
    band = band_rows or max(tile_px, min(2048, _BAND_BYTES // (3 * width_px)) // tile_px * tile_px)
    if band % tile_px:
        raise ValueError(f"band rows ({band}) must be a multiple of tile_px ({tile_px})")
    return band


def _check_args(
    width_px: int, height_px: int, mpp: float, tile_px: int, mask_downsample: int
) -> None:
    if width_px < 1 or height_px < 1:
        raise ValueError(f"slide size must be positive, got {width_px} x {height_px}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if mask_downsample < 1:
        raise ValueError(f"mask_downsample must be >= 1, got {mask_downsample}")


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------
def write_synthetic_slide(
    path: str | Path,
    *,
    width_px: int = 10_000,
    height_px: int = 10_000,
    mpp: float = 0.5,
    positive: bool = False,
    seed: int = 0,
    n_lesions: int = 3,
    tile_px: int = 256,
    jpeg_quality: int = 80,
    mask_downsample: int = 16,
    _band_rows: int | None = None,
) -> np.ndarray:
    """Write one synthetic slide as a pyramidal, tiled, JPEG-compressed BigTIFF.

    Parameters
    ----------
    path : str or Path
        Output ``.tiff``; written in place (callers wanting atomicity write to a temporary
        name and rename).
    width_px, height_px : int
        Level-0 size in pixels.
    mpp : float
        Microns per level-0 pixel (stored as TIFF resolution; OpenSlide reports it as
        ``openslide.mpp-x``/``mpp-y``). Physical sizes (nuclei, lesions, textures) follow it.
    positive : bool
        Add ``n_lesions`` lesions inside the tissue.
    seed : int
        Everything is a deterministic function of the seed and the size.
    n_lesions : int
        Lesions on a positive slide (radius 250-600 µm, capped at 5% of the short side).
    tile_px : int
        TIFF tile size (a multiple of 16).
    jpeg_quality : int
        JPEG quality (1-100).
    mask_downsample : int
        Level-0 pixels per pixel of the returned mask.

    Returns
    -------
    ndarray, shape (ceil(height_px / mask_downsample), ceil(width_px / mask_downsample)), bool
        Ground-truth lesion mask (all False for a negative slide).

    Notes
    -----
    Level ``k`` has downsample ``4**k`` (size rounded up); levels are added until the long
    side is at most 1,000 px, with at least two levels. Level 0 is generated in bands and
    streamed to the file, so memory stays bounded for very large slides.
    """
    path = Path(path)
    width_px, height_px = int(width_px), int(height_px)
    _check_args(width_px, height_px, mpp, tile_px, mask_downsample)
    band = _band_height(width_px, tile_px, _band_rows)
    scene = _make_scene(width_px, height_px, float(mpp), int(seed), bool(positive), int(n_lesions))
    mask = _scene_mask(scene, int(mask_downsample))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    pyramid = _Pyramid(_level_dims(width_px, height_px), tmpdir)
    try:
        write_tiff_pyramid(
            path,
            _pyramid_levels(scene, pyramid, band, tile_px),
            tile_px=tile_px,
            mpp=mpp,
            jpeg_quality=jpeg_quality,
            software="wsimil.synth",
            maxworkers=2,
            buffersize=_ENCODE_BUFFER,
        )
    finally:
        pyramid.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return mask


def write_rgb_slide(
    path: str | Path, rgb: np.ndarray, *, mpp: float, tile_px: int = 256, jpeg_quality: int = 90
) -> Path:
    """Write an image held in memory as a pyramidal, tiled, JPEG-compressed BigTIFF.

    The same layout as :func:`write_synthetic_slide` (4 x 4 block-mean levels until the long
    side is at most 1,000 px, at least two levels; resolution tags), for small slides whose
    pixels are made elsewhere (:mod:`wsimil.synth.digits`).

    Parameters
    ----------
    path : str or Path
        Output ``.tiff``, written in place.
    rgb : ndarray, shape (H, W, 3), uint8
        Level 0.
    mpp : float
        Microns per level-0 pixel.
    tile_px : int
        TIFF tile size (a multiple of 16).
    jpeg_quality : int
        JPEG quality (1-100).

    Returns
    -------
    Path
        ``path``.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3), got {rgb.shape}")
    height, width = rgb.shape[:2]
    _check_args(width, height, mpp, tile_px, 1)
    dims = _level_dims(width, height)
    arrays = [rgb]
    for w, _ in dims[1:]:
        arrays.append(_reduce4(arrays[-1], w))

    def tiles(a: np.ndarray) -> Iterator[np.ndarray]:
        for r in range(0, a.shape[0], tile_px):
            yield from tiles_of_rows(a[r : r + tile_px], a.shape[1], tile_px)

    levels = [PyramidLevel(a.shape[1], a.shape[0], tiles(a)) for a in arrays]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tiff_pyramid(
        path, levels, tile_px=tile_px, mpp=mpp, jpeg_quality=jpeg_quality, software="wsimil.synth"
    )
