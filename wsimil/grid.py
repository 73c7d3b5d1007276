"""Tile grids on a slide and the tissue fraction of each tile (coordinate geometry only)."""

from __future__ import annotations

import numpy as np

GAP_MIN_NEW = 0.1  # a gap tile adds at least this share of a tile's area of uncovered tissue


def grid_coords(
    width_px: int, height_px: int, *, tile_px: int, stride_px: int, edges: bool = False
) -> np.ndarray:
    """Top-left corners of the grid's tiles on a ``width_px`` x ``height_px`` image.

    Parameters
    ----------
    edges : bool
        Also the tiles that run over the right and bottom edges (read padded with white), so
        the grid covers the whole image; otherwise only tiles wholly inside it.

    Returns
    -------
    ndarray, shape (N, 2), int32
        (x, y) in row-major order (y, then x). Empty when the image is smaller than one tile
        (and ``edges`` is off).
    """
    last_x = width_px - 1 if edges else width_px - tile_px
    last_y = height_px - 1 if edges else height_px - tile_px
    xs = np.arange(0, last_x + 1, stride_px, dtype=np.int64)
    ys = np.arange(0, last_y + 1, stride_px, dtype=np.int64)
    if len(xs) == 0 or len(ys) == 0:
        return np.zeros((0, 2), np.int32)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int32)


def mask_integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a bool mask, shape (h + 1, w + 1), exact integer counts."""
    h, w = mask.shape
    dtype = np.int32 if h * w < 2**31 else np.int64  # exact counts, half the memory of float64
    integral = np.zeros((h + 1, w + 1), dtype)
    rows = max(1, 2**20 // max(w, 1))  # column sums in row bands: small temporaries
    for r in range(0, h, rows):
        band = np.cumsum(mask[r : r + rows], axis=0, dtype=dtype)
        band += integral[r, 1:]
        integral[r + 1 : r + 1 + len(band), 1:] = band
    inner = integral[1:, 1:]
    np.cumsum(inner, axis=1, out=inner)  # in place: no second full-size array
    return integral


def box_fractions(
    integral: np.ndarray, coords: np.ndarray, *, tile_px: int, downsample: float
) -> np.ndarray:
    """:func:`tile_fractions` from a :func:`mask_integral`; (N,) float32."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    c = coords.astype(np.float64)
    x0 = np.clip(np.round(c[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.round(c[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.round((c[:, 0] + tile_px) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.round((c[:, 1] + tile_px) / downsample).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    # The whole tile's area, also where it runs over the image's edge (white padding there).
    full = max(1, round(tile_px / downsample)) ** 2
    area = np.maximum((x1 - x0) * (y1 - y0), full)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (s / area).astype(np.float32)


def tile_fractions(
    mask: np.ndarray, coords: np.ndarray, *, tile_px: int, downsample: float
) -> np.ndarray:
    """Fraction of each tile covered by ``mask``.

    Parameters
    ----------
    mask : ndarray, shape (h, w), bool
        Mask at ``downsample`` level-0 px per mask px.
    coords : ndarray, shape (N, 2)
        Level-0 (x, y) of the tiles.
    tile_px : int
        Tile side in level-0 px.

    Returns
    -------
    ndarray, shape (N,), float32
    """
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    return box_fractions(mask_integral(mask), coords, tile_px=tile_px, downsample=downsample)


def tissue_grid(
    mask: np.ndarray, downsample: float, size: tuple[int, int], *, tile_px: int,
    stride_px: int, threshold: float, edges: bool = True, gaps: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """The tiles of a slide that hold at least ``threshold`` tissue: the grid's, then (with
    ``gaps``) :func:`gap_tiles` over tissue that no kept grid tile covers.

    Parameters
    ----------
    mask : ndarray, shape (h, w), bool
        Tissue mask at ``downsample`` level-0 px per mask px.
    size : (int, int)
        Slide size in level-0 px.

    Returns
    -------
    coords : ndarray, shape (N, 2), int32
        Level-0 (x, y): the kept grid tiles in row-major order, then the gap tiles.
    fractions : ndarray, shape (N,), float32
    n_candidates : int
        Grid tiles before the threshold.
    """
    thr = max(threshold, 1e-6)
    coords = grid_coords(*size, tile_px=tile_px, stride_px=stride_px, edges=edges)
    integral = mask_integral(mask)
    frac = box_fractions(integral, coords, tile_px=tile_px, downsample=downsample)
    keep = frac >= thr
    kept, kept_frac = coords[keep], frac[keep]
    if not (gaps and len(coords)):
        return kept, kept_frac, len(coords)
    lattice = gap_lattice(mask.shape, downsample, tile_px=tile_px, inside=None if edges else size)
    full = np.concatenate([np.zeros(0, np.float32)] + [
        box_fractions(integral, lattice[i : i + 2**15], tile_px=tile_px, downsample=downsample)
        for i in range(0, len(lattice), 2**15)
    ])  # fmt: skip
    del integral  # one full-size integral image at a time
    lattice, full = lattice[full >= thr], full[full >= thr]
    if stride_px == tile_px:  # tiles are the grid's cells: no raster of each tile needed
        ny = len(np.unique(coords[:, 1]))
        covered = cells_raster(keep.reshape(ny, -1), mask.shape, cell_px=tile_px,
                               downsample=downsample)  # fmt: skip
    else:
        covered = tiles_raster(kept, mask.shape, tile_px=tile_px, downsample=downsample)
    np.logical_not(covered, out=covered)
    np.logical_and(covered, mask, out=covered)  # now: tissue that no kept tile covers
    sel = gap_tiles(covered, lattice, downsample=downsample, tile_px=tile_px, min_new=GAP_MIN_NEW)
    return (np.concatenate([kept, lattice[sel].astype(np.int32)]),
            np.concatenate([kept_frac, full[sel]]), len(coords))  # fmt: skip


def gap_lattice(
    shape: tuple[int, int], downsample: float, *, tile_px: int, steps: int = 4,
    inside: tuple[int, int] | None = None,
) -> np.ndarray:  # fmt: skip
    """Candidate gap tiles: level-0 (x, y), shape (M, 2) float64, on a lattice of a
    ``1/steps`` tile in mask pixels, over the whole mask (tiles may run over its edges,
    unless ``inside`` = slide size in level-0 px asks for tiles wholly inside)."""
    h, w = shape
    t = max(1, round(tile_px / downsample))  # tile side in mask px
    step = max(1, t // steps)
    ys, xs = np.arange(-(t - step), h, step), np.arange(-(t - step), w, step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    cand = np.floor(np.stack([xx.ravel(), yy.ravel()], axis=1) * downsample)
    if inside is not None:
        ok = (cand >= 0).all(axis=1) & (cand[:, 0] + tile_px <= inside[0])
        cand = cand[ok & (cand[:, 1] + tile_px <= inside[1])]
    return cand


def gap_tiles(
    left: np.ndarray, candidates: np.ndarray, *, downsample: float, tile_px: int,
    min_new: float = 0.1,
) -> np.ndarray:  # fmt: skip
    """Gap tiles, greedily: the candidate that adds the most tissue no tile covers yet, while
    it adds at least ``min_new`` of a tile's area. A strand or fragment that the grid cuts
    into pieces below the threshold gets a tile of its own instead of being lost.

    Parameters
    ----------
    left : ndarray, shape (h, w), bool
        Mask tissue no kept tile covers (at ``downsample`` level-0 px per px); updated in place.
    candidates : ndarray, shape (M, 2)
        Level-0 (x, y) of the candidates (:func:`gap_lattice`, those with enough tissue).

    Returns
    -------
    ndarray, shape (K,), int64: indices of the chosen candidates, in the order chosen.
    """
    if len(candidates) == 0 or not left.any():
        return np.zeros(0, np.int64)
    t = max(1, round(tile_px / downsample))
    new = box_fractions(mask_integral(left), candidates, tile_px=tile_px, downsample=downsample)
    some = np.flatnonzero(new >= min_new)
    new = new[some]
    x = np.round(candidates[some, 0] / downsample).astype(np.int64)  # mask px, as box_fractions
    y = np.round(candidates[some, 1] / downsample).astype(np.int64)
    out = []
    while len(new) and new[i := int(np.argmax(new))] >= min_new:
        out.append(some[i])
        x0, y0 = int(x[i]), int(y[i])
        left[max(0, y0) : max(0, y0 + t), max(0, x0) : max(0, x0 + t)] = False
        for j in np.flatnonzero((np.abs(x - x0) < t) & (np.abs(y - y0) < t) & (new > 0)):
            a, b = int(x[j]), int(y[j])
            new[j] = left[max(0, b) : max(0, b + t), max(0, a) : max(0, a + t)].sum() / t**2
    return np.asarray(out, np.int64)


def tiles_raster(
    coords: np.ndarray, shape: tuple[int, int], *, tile_px: int, downsample: float
) -> np.ndarray:
    """Mask pixels inside any of the tiles, (h, w) bool (corner sums, no loop over tiles)."""
    h, w = shape
    diff = np.zeros((h + 1, w + 1), np.int32)
    if len(coords):
        c = np.asarray(coords, np.float64)
        x0 = np.clip(np.round(c[:, 0] / downsample).astype(np.int64), 0, w)
        y0 = np.clip(np.round(c[:, 1] / downsample).astype(np.int64), 0, h)
        x1 = np.clip(np.round((c[:, 0] + tile_px) / downsample).astype(np.int64), 0, w)
        y1 = np.clip(np.round((c[:, 1] + tile_px) / downsample).astype(np.int64), 0, h)
        for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
            np.add.at(diff, (ys, xs), sign)
    np.cumsum(diff, axis=0, out=diff)
    np.cumsum(diff, axis=1, out=diff)
    return diff[:h, :w] > 0


def cells_raster(
    cells: np.ndarray, shape: tuple[int, int], *, cell_px: int, downsample: float
) -> np.ndarray:
    """Mask pixels whose centre lies in a True cell of a grid from (0, 0) with cells of
    ``cell_px`` level-0 px; ``cells`` (ny, nx) bool. Returns (h, w) bool."""
    h, w = shape
    ny, nx = cells.shape
    iy = ((np.arange(h) + 0.5) * downsample // cell_px).astype(np.int64)
    ix = ((np.arange(w) + 0.5) * downsample // cell_px).astype(np.int64)
    padded = np.zeros((ny + 1, nx + 1), bool)  # pixels past the last cell: not covered
    padded[:ny, :nx] = cells
    return padded[np.minimum(iy, ny)[:, None], np.minimum(ix, nx)[None, :]]
