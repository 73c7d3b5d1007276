"""Small raster operations shared by the tile QC image, the heatmap overlays and the exports.

Plain functions on arrays: painting per-tile values onto a grid, smoothing, resizing masks
and drawing their outlines, and the colour table of a colormap (how a map is drawn over the
slide is :mod:`wsimil.overlay`). Nothing here reads slides or
writes files.
"""

from __future__ import annotations

import numpy as np


def colour_lut(cmap: str) -> np.ndarray:
    """The colormap as a (256, 3) uint8 table (rounded to the nearest value)."""
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def paint_tiles(
    values: np.ndarray,
    coords: np.ndarray,
    *,
    tile_px_level0: int,
    downsample: float,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Average tile values per pixel of an image at ``downsample`` level-0 px per pixel.

    Parameters
    ----------
    values : ndarray, shape (N,)
    coords : ndarray, shape (N, 2)
        Level-0 (x, y) of each tile's top-left corner.
    shape : (h, w)
        Output image shape.

    Returns
    -------
    mean : ndarray, shape (h, w), float32
        Mean of the values of the tiles covering each pixel (0 where none).
    covered : ndarray, shape (h, w), bool
    """
    h, w = shape
    acc = np.zeros((h + 1, w + 1), np.float64)
    cnt = np.zeros((h + 1, w + 1), np.float64)
    coords = np.asarray(coords)
    x0 = np.clip(np.floor(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + tile_px_level0) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + tile_px_level0) / downsample).astype(np.int64), 0, h)
    # 2-D difference arrays: +v at (y0, x0), -v at (y0, x1) and (y1, x0), +v at (y1, x1).
    for arr, v in ((acc, np.asarray(values, np.float64)), (cnt, np.ones(len(values)))):
        np.add.at(arr, (y0, x0), v)
        np.add.at(arr, (y0, x1), -v)
        np.add.at(arr, (y1, x0), -v)
        np.add.at(arr, (y1, x1), v)
    acc = acc.cumsum(0).cumsum(1)[:h, :w]
    cnt = np.rint(cnt.cumsum(0).cumsum(1)[:h, :w])
    covered = cnt > 0
    mean = np.zeros((h, w), np.float32)
    mean[covered] = acc[covered] / cnt[covered]
    return mean, covered


def smooth_heat(heat: np.ndarray, covered: np.ndarray, *, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing of ``heat`` normalised by the smoothed coverage (no bleed into background).

    Parameters
    ----------
    heat, covered : ndarray, shape (h, w)
    sigma_px : float
        Gaussian sigma in pixels of ``heat``; 0 returns ``heat`` unchanged.

    Returns
    -------
    ndarray, shape (h, w), float32; values only meaningful where ``covered``.
    """
    if sigma_px <= 0:
        return heat
    from scipy.ndimage import gaussian_filter

    c = covered.astype(np.float32)
    num = gaussian_filter(heat.astype(np.float32) * c, sigma_px, mode="constant")
    den = gaussian_filter(c, sigma_px, mode="constant")
    out = np.zeros_like(heat, dtype=np.float32)
    ok = den > 1e-6
    out[ok] = num[ok] / den[ok]
    return out


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask to ``shape`` = (h, w), sampling pixel centres.

    Returns
    -------
    ndarray, shape (h, w), same dtype as ``mask``
    """
    h, w = shape
    rows = np.minimum((np.arange(h) + 0.5) * mask.shape[0] / h, mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * mask.shape[1] / w, mask.shape[1] - 1).astype(int)
    return mask[rows][:, cols]


def mask_outline(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boundary pixels of a mask resized (nearest) to ``shape`` = (h, w), bool.

    A pixel is on the boundary when it is in the mask and a 4-neighbour is not (the image edge
    counts as outside).
    """
    from .tissue import erode_cross

    m = resize_mask(mask, shape) > 0
    return m & ~erode_cross(m)  # = binary_erosion(m, border_value=0), from shifted slices


def minmax(values: np.ndarray) -> np.ndarray:
    """``(v - min v) / (max v - min v)``; all zeros when the values are constant."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values.astype(np.float32)
    lo, hi = values.min(), values.max()
    if hi - lo <= 0:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def tile_outlines(
    coords: np.ndarray, shape: tuple[int, int], *, tile_px_level0: int, downsample: float
) -> np.ndarray:
    """Pixels on the outline of each tile on an image of ``shape`` at ``downsample`` level-0
    px per pixel (a 1-px box per tile, as ``ImageDraw.rectangle`` draws it; one fancy-index
    assignment per side, no loop over tiles). Returns (h, w) bool."""
    h, w = shape
    out = np.zeros((h, w), bool)
    if len(coords) == 0:
        return out
    c = np.asarray(coords, np.float64) / downsample
    x0, y0 = np.floor(c[:, :1]).astype(np.int64), np.floor(c[:, 1:]).astype(np.int64)
    t = max(1, int(round(tile_px_level0 / downsample)))
    r = np.arange(t)[None, :]
    for ys, xs in ((y0, x0 + r), (y0 + t - 1, x0 + r), (y0 + r, x0), (y0 + r, x0 + t - 1)):
        ys, xs = np.broadcast_arrays(ys, xs)
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        out[ys[ok], xs[ok]] = True
    return out
