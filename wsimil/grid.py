"""Tile grids on a slide, the tissue fraction of each tile, and gap tiles over tissue the grid's
kept tiles miss (coordinate geometry only)."""

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


def block_sums(a: np.ndarray, bounds: np.ndarray, axis: int) -> np.ndarray:
    """Sums of a 2-D ``a`` along ``axis`` between consecutive ``bounds`` (increasing; clipped
    to the axis, so blocks past its end sum to 0), int64, in one pass over ``a``.

    Returns ``a``'s shape with ``len(bounds) - 1`` along ``axis``.
    """
    n = a.shape[axis]
    b = np.clip(np.asarray(bounds, np.int64), 0, n)
    starts = b[:-1]
    if axis == 0:  # row blocks: one reduction per block (reduceat down the rows is slow)
        out = np.zeros((len(starts), a.shape[1]), np.int64)
        for i in np.flatnonzero(b[1:] > starts):
            out[i] = np.add.reduce(a[starts[i] : b[i + 1]], axis=0, dtype=np.int64)
        return out
    k = int(np.count_nonzero(starts < n))  # blocks from the axis' end on are empty
    out = np.zeros((a.shape[0], len(starts)), np.int64)
    if k:
        idx = np.append(starts[:k], b[k]) if b[k] < n else starts[:k]
        out[:, :k] = np.add.reduceat(a, idx, axis=1, dtype=np.int64)[:, :k]
    # Zero-width blocks: reduceat gives the start's value.
    return np.where((b[1:] <= starts)[None, :], 0, out)


def grid_fractions(
    mask: np.ndarray, coords: np.ndarray, *, tile_px: int, downsample: float
) -> np.ndarray:
    """:func:`tile_fractions` of the tiles of a grid with stride = tile (``grid_coords``
    order) of at least 2 mask px, from block sums: one pass over the mask, no integral
    image. (N,) float32."""
    if len(coords) == 0:
        return np.zeros(0, np.float32)
    h, w = mask.shape
    xs, ys = np.unique(coords[:, 0]), np.unique(coords[:, 1])
    bx = np.clip(np.round(np.append(xs, xs[-1] + tile_px) / downsample).astype(np.int64), 0, w)
    by = np.clip(np.round(np.append(ys, ys[-1] + tile_px) / downsample).astype(np.int64), 0, h)
    sums = block_sums(block_sums(mask, by, 0), bx, 1)
    full = max(1, round(tile_px / downsample)) ** 2
    wx = np.maximum(np.diff(bx), np.minimum(bx[:-1] + 1, w) - bx[:-1])
    wy = np.maximum(np.diff(by), np.minimum(by[:-1] + 1, h) - by[:-1])
    area = np.maximum(wy[:, None] * wx[None, :], full)
    return (sums / area).astype(np.float32).ravel()


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
    cells = stride_px == tile_px and tile_px >= 2 * downsample  # tiles are the grid's cells
    if cells:
        frac = grid_fractions(mask, coords, tile_px=tile_px, downsample=downsample)
    else:
        frac = tile_fractions(mask, coords, tile_px=tile_px, downsample=downsample)
    keep = frac >= thr
    kept, kept_frac = coords[keep], frac[keep]
    if not (gaps and len(coords)):
        return kept, kept_frac, len(coords)
    if cells:
        ny = len(np.unique(coords[:, 1]))
        left = cells_raster(keep.reshape(ny, -1), mask.shape, cell_px=tile_px,
                            downsample=downsample)  # fmt: skip
    else:
        left = tiles_raster(kept, mask.shape, tile_px=tile_px, downsample=downsample)
    np.logical_not(left, out=left)
    np.logical_and(left, mask, out=left)  # tissue that no kept tile covers
    extra, extra_frac = gap_tiles(mask, left, downsample, tile_px=tile_px, threshold=thr,
                                  inside=None if edges else size)  # fmt: skip
    return np.concatenate([kept, extra]), np.concatenate([kept_frac, extra_frac]), len(coords)


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


def gap_tiles(
    mask: np.ndarray, left: np.ndarray, downsample: float, *, tile_px: int, threshold: float,
    min_new: float = GAP_MIN_NEW, steps: int = 4, inside: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Extra tiles, off the grid, over mask tissue that no kept tile covers.

    Candidates lie on a lattice of a ``1/steps`` tile; greedily, the candidate that adds the
    most uncovered tissue is added while it adds at least ``min_new`` of a tile's area and
    holds at least ``threshold`` tissue in all. A strand or fragment that the grid cuts into
    pieces below the threshold gets a tile of its own instead of being lost. Candidates are
    scored from block sums at the lattice's step (one pass over the mask, no integral image);
    the chosen tiles' sums are exact.

    Parameters
    ----------
    mask : ndarray, shape (h, w), bool
        Tissue mask at ``downsample`` level-0 px per mask px.
    left : ndarray, shape (h, w), bool
        The mask's tissue that no kept tile covers; updated in place.
    inside : (int, int), optional
        Slide size in level-0 px: only tiles wholly inside it (else tiles may run over the
        slide's edges, read padded with white).

    Returns
    -------
    coords : ndarray, shape (M, 2), int32
        Level-0 (x, y) of the gap tiles, in the order chosen.
    fractions : ndarray, shape (M,), float32
    """
    none = np.zeros((0, 2), np.int32), np.zeros(0, np.float32)
    if not left.any():
        return none
    t = max(1, round(tile_px / downsample))  # tile side in mask px
    step = max(1, t // steps)
    n = max(1, t // step)  # blocks per window side
    new = _window_sums(left, step, n)
    iy, ix = np.nonzero(new >= min_new * t * t)
    full = _window_sums(mask, step, n)[iy, ix]
    ok = full >= threshold * t * t
    # Window (i, j) ends at block (i, j): it starts (n - 1) blocks before, in mask px.
    py, px = (iy[ok] - (n - 1)) * step, (ix[ok] - (n - 1)) * step
    score = new[iy[ok], ix[ok]].astype(np.float64)
    if inside is not None:
        x0, y0 = np.floor(px * downsample), np.floor(py * downsample)
        fits = (x0 >= 0) & (y0 >= 0) & (x0 + tile_px <= inside[0]) & (y0 + tile_px <= inside[1])
        py, px, score = py[fits], px[fits], score[fits]
    chosen, fractions = [], []
    while len(score) and score[i := int(np.argmax(score))] >= min_new * t * t:
        ya, xa = max(0, int(py[i])), max(0, int(px[i]))
        yb, xb = max(0, int(py[i]) + t), max(0, int(px[i]) + t)
        tissue = int(np.count_nonzero(mask[ya:yb, xa:xb]))
        score[i] = 0
        if tissue < threshold * t * t:  # the block-sum score overstated it
            continue
        chosen.append(i)
        fractions.append(tissue / (t * t))
        left[ya:yb, xa:xb] = False
        near = np.flatnonzero((np.abs(px - px[i]) < t) & (np.abs(py - py[i]) < t) & (score > 0))
        for j in near:
            a, b = max(0, int(px[j])), max(0, int(py[j]))
            score[j] = np.count_nonzero(
                left[b : max(0, int(py[j]) + t), a : max(0, int(px[j]) + t)]
            )
    if not chosen:
        return none
    sel = np.asarray(chosen, np.int64)
    xy = np.floor(np.stack([px[sel], py[sel]], axis=1) * downsample).astype(np.int32)
    return xy, np.asarray(fractions, np.float32)


def _window_sums(a: np.ndarray, step: int, n: int) -> np.ndarray:
    """Sums of ``a`` over windows of ``n`` x ``n`` blocks of ``step`` px, for every window
    that overlaps ``a`` (windows run over its edges): shape (nby + n - 1, nbx + n - 1)."""
    h, w = a.shape
    blocks = block_sums(block_sums(a, np.arange(0, h + step, step), 0),
                        np.arange(0, w + step, step), 1)  # fmt: skip
    nby, nbx = blocks.shape
    integral = np.zeros((nby + 2 * n - 1, nbx + 2 * n - 1), np.int64)
    integral[n : n + nby, n : n + nbx] = blocks
    integral = integral.cumsum(axis=0).cumsum(axis=1)
    return integral[n:, n:] - integral[:-n, n:] - integral[n:, :-n] + integral[:-n, :-n]
