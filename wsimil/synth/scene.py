"""The scene of a synthetic slide: coarse fields and textures, computed once per slide.

A *scene* lives on a coarse grid (one value per 32 x 32 level-0 px): signed tissue and lesion
fields in level-0 pixel units (positive inside), eosin and fibre orientation fields and a
cellularity field, plus small periodic textures (x period = width of a render block) and the
slide's stain optical densities. Everything is a deterministic function of the seed, the
slide size and the mpp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_COARSE = 32  # level-0 px per scene-field pixel
_PAD = 2  # edge padding of the B-spline-sampled fields
_MAX_LESION_FRACTION = 0.05  # lesion radius <= this fraction of the short side

BACKGROUND_RGB = (240.0, 238.0, 242.0)
# Colours of full-strength stains on the background, converted to optical densities.
_STROMA_RGB = (232.0, 158.0, 202.0)
_LESION_BG_RGB = (172.0, 112.0, 178.0)
_NUCLEUS_RGB = (92.0, 66.0, 148.0)
_LESION_NUCLEUS_RGB = (62.0, 34.0, 108.0)


def _od(rgb) -> np.ndarray:
    return np.log(np.asarray(BACKGROUND_RGB) / np.asarray(rgb)).astype(np.float32)


_OD_STROMA, _OD_LESION_BG = _od(_STROMA_RGB), _od(_LESION_BG_RGB)
_OD_NUC, _OD_LESION_NUC = _od(_NUCLEUS_RGB), _od(_LESION_NUCLEUS_RGB)


def _to_uint8(od: np.ndarray, noise: np.ndarray, c: int) -> np.ndarray:
    """Optical density of channel ``c`` -> grey levels (uint8); shared by every code path."""
    val = BACKGROUND_RGB[c] * np.exp(-od) + noise + 0.5
    np.clip(val, 0, 255, out=val)
    return val.astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Noise and textures
# ------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with blobs of about ``scale`` pixels.

    Generated on a grid of spacing ``scale / 4`` and upsampled (cubic), so large scales stay
    cheap. Returns float32 of ``shape``.
    """
    scale = max(float(scale), 1.0)
    step = max(scale / 4.0, 1.0)
    gshape = (int(math.ceil(shape[0] / step)) + 8, int(math.ceil(shape[1] / step)) + 8)
    grid = ndimage.gaussian_filter(
        rng.standard_normal(gshape), sigma=scale / step / 1.5, mode="wrap"
    )
    yy = np.arange(shape[0]) / step + 4.0
    xx = np.arange(shape[1]) / step + 4.0
    out = np.empty(shape, np.float32)
    rows = max(1, (1 << 21) // max(shape[1], 1))  # bounded temporaries for big grids
    for r in range(0, shape[0], rows):
        yyr = yy[r : r + rows]
        out[r : r + rows] = ndimage.map_coordinates(
            grid, np.meshgrid(yyr, xx, indexing="ij"), order=3, mode="nearest"
        )
    out -= np.float32(out.mean(dtype=np.float64))
    out /= np.float32(max(float(out.std(dtype=np.float64)), 1e-12))
    return out


def _to_px_units(field: np.ndarray) -> np.ndarray:
    """Scale a coarse field (threshold 0) so it changes by about one unit per level-0 px at 0."""
    inside = field > 0
    edge = inside ^ ndimage.binary_erosion(inside, border_value=1)
    gy, gx = np.gradient(field)
    grad = np.hypot(gy, gx)
    g = float(np.median(grad[edge])) if edge.any() else float(np.median(grad)) + 1e-6
    return (field / max(g / _COARSE, 1e-9)).astype(np.float32)


def _periodic_texture(
    rng: np.random.Generator, shape: tuple[int, int], sigma: tuple[float, float], warp_px: float
) -> np.ndarray:
    """Periodic streaky texture in [0, 1] of ``shape`` (rows, cols), float32."""
    streak = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma, mode="wrap")
    if warp_px > 0:
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
        disp = ndimage.gaussian_filter(
            rng.standard_normal(shape), sigma=min(shape) / 10, mode="wrap"
        )
        disp *= warp_px / max(float(disp.std()), 1e-12)
        if sigma[0] < sigma[1]:  # horizontal streaks: shift rows
            streak = ndimage.map_coordinates(streak, [yy + disp, xx], order=1, mode="grid-wrap")
        else:
            streak = ndimage.map_coordinates(streak, [yy, xx + disp], order=1, mode="grid-wrap")
    lo, hi = np.percentile(streak, [2, 98])
    return np.clip((streak - lo) / (hi - lo), 0, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------
# The scene
# ------------------------------------------------------------------------------------------
@dataclass
class _Lesion:
    cy: float
    cx: float
    r_px: float


@dataclass
class _Scene:
    width: int
    height: int
    mpp: float
    seed: int
    tissue: np.ndarray  # (Hc+4, Wc+4) padded; signed, ~level-0 px units, > 0 inside tissue
    lesion: np.ndarray | None  # (Hc+4, Wc+4) padded; signed, px units, > 0 inside lesions
    eosin: np.ndarray  # (Hc, Wc) stain-strength variation, ~N(0, 1)
    orient: np.ndarray  # (Hc, Wc) in [0, 1]: blend of the two fibre textures
    cellularity: np.ndarray  # (Hc, Wc) probability that a stroma nucleus slot is used
    lesions: list[_Lesion]
    period: int  # x period of all textures = width of a render block
    fibre_a: np.ndarray  # (rows, period) periodic textures in [0, 1]
    fibre_b: np.ndarray
    grain: np.ndarray
    noise: np.ndarray  # (rows, period, 3) pixel noise in grey levels
    background: np.ndarray  # (rows, period, 3) uint8: background colour + noise
    od_stroma: tuple[float, float, float]  # per-slide stain optical densities (R, G, B)
    od_lesion_bg: tuple[float, float, float]
    od_nucleus: tuple[float, float, float]
    od_lesion_nucleus: tuple[float, float, float]


def _tissue_field(
    rng: np.random.Generator, width: int, height: int, um_per_cell: float
) -> np.ndarray:
    """Signed tissue field on the coarse grid, ~level-0 px units, > 0 inside tissue."""
    hc, wc = height // _COARSE + 2, width // _COARSE + 2
    shape = (hc, wc)
    short = min(hc, wc)
    # A few large irregular blobs, kept away from the slide border.
    f = (
        _smooth_noise(rng, shape, 0.20 * short)
        + 0.45 * _smooth_noise(rng, shape, 0.07 * short)
        + 0.10 * _smooth_noise(rng, shape, max(150.0 / um_per_cell, 3.0))
    )
    yy = ((np.arange(hc) + 0.5) * _COARSE / height).astype(np.float32)
    xx = ((np.arange(wc) + 0.5) * _COARSE / width).astype(np.float32)
    border = np.minimum.outer(np.minimum(yy, 1 - yy), np.minimum(xx, 1 - xx))  # 0 at the edge
    f -= 4.5 * np.clip(1 - border / 0.2, 0, 1) ** 2
    valid = (yy[:, None] < 1) & (xx[None, :] < 1)
    coverage = rng.uniform(0.36, 0.46)
    f = f - np.quantile(f[valid], 1 - coverage)
    # Drop specks: components much smaller than the largest piece.
    lab, n = ndimage.label(f > 0)
    if n > 1:
        sizes = ndimage.sum_labels(np.ones_like(f), lab, index=np.arange(1, n + 1))
        small = np.isin(lab, 1 + np.flatnonzero(sizes < 0.08 * sizes.max()))
        f[ndimage.binary_dilation(small, iterations=3)] = -1.0
    tissue = _to_px_units(f)
    # Holes (vessels, fat) inside tissue: a few percent of its area.
    h = _smooth_noise(rng, shape, max(80.0 / um_per_cell, 3.0))
    h = h - np.quantile(h, rng.uniform(0.97, 0.99))
    return np.minimum(tissue, -_to_px_units(h))


def _stain_fields(
    rng: np.random.Generator, shape: tuple[int, int], um_per_cell: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eosin strength, fibre orientation and cellularity fields on the coarse grid."""
    eosin = 0.8 * _smooth_noise(rng, shape, max(250.0 / um_per_cell, 1.5)) + 0.6 * _smooth_noise(
        rng, shape, max(50.0 / um_per_cell, 1.0)
    )
    orient = np.clip(0.5 + 1.5 * _smooth_noise(rng, shape, max(300.0 / um_per_cell, 1.5)), 0, 1)
    cellularity = np.clip(
        0.34 + 0.16 * _smooth_noise(rng, shape, max(200.0 / um_per_cell, 1.5)), 0.08, 0.7
    )
    return eosin, orient, cellularity


def _lesion_site(
    rng: np.random.Generator,
    lesions: list[_Lesion],
    grid: tuple[np.ndarray, np.ndarray],
    dist_px: np.ndarray,
    mpp: float,
    short_px: int,
) -> tuple[float, np.ndarray]:
    """Radius (level-0 px) of the next lesion and the coarse cells where its centre may go:
    at least 0.9 radius inside the tissue and clear of the lesions placed so far."""
    cy_grid, cx_grid = grid
    r_px = min(rng.uniform(250.0, 600.0) / mpp, _MAX_LESION_FRACTION * short_px)
    free = np.ones(dist_px.shape, bool)
    for les in lesions:
        d = np.hypot(cy_grid[:, None] - les.cy, cx_grid[None, :] - les.cx)
        free &= d > 1.3 * (les.r_px + r_px)
    ok = free & (dist_px >= 0.9 * r_px)
    if not ok.any():  # small slide: take the roomiest place and shrink the lesion
        room = np.where(free, dist_px, 0)
        if room.max() <= 0:
            room = dist_px
        r_px = max(min(r_px, 0.9 * float(room.max())), 2.0 * _COARSE)
        ok = room >= 0.9 * float(room.max())
    return r_px, ok


def _add_lesion_blob(
    rng: np.random.Generator, lesion: np.ndarray, les: _Lesion, grid: tuple[np.ndarray, np.ndarray]
) -> None:
    """Max-composite one irregular lesion into the coarse ``lesion`` field, in place.

    The radius is modulated by smooth noise and never exceeds 1.3 r.
    """
    cy_grid, cx_grid = grid
    hc, wc = lesion.shape
    r = 1.5 * les.r_px / _COARSE + 3
    cy, cx = les.cy / _COARSE, les.cx / _COARSE
    y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, hc)
    x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, wc)
    d = np.hypot(cy_grid[y0:y1, None] - les.cy, cx_grid[None, x0:x1] - les.cx)
    wobble = _smooth_noise(rng, (y1 - y0, x1 - x0), max(les.r_px / 2.5 / _COARSE, 1.5))
    blob = np.minimum(les.r_px - d + 0.28 * les.r_px * wobble, 1.3 * les.r_px - d)
    lesion[y0:y1, x0:x1] = np.maximum(lesion[y0:y1, x0:x1], blob)


def _lesion_field(
    rng: np.random.Generator, tissue: np.ndarray, width: int, height: int, mpp: float, n: int
) -> tuple[list[_Lesion], np.ndarray]:
    """Place ``n`` lesions inside the tissue -> (lesions, signed field in px units, unpadded)."""
    hc, wc = tissue.shape
    lesion = np.full(tissue.shape, -1e4, np.float32)
    dist_px = ndimage.distance_transform_edt(tissue > 0) * _COARSE
    grid = ((np.arange(hc) + 0.5) * _COARSE, (np.arange(wc) + 0.5) * _COARSE)
    lesions: list[_Lesion] = []
    for _ in range(n):
        r_px, ok = _lesion_site(rng, lesions, grid, dist_px, mpp, min(width, height))
        cand = np.flatnonzero(ok)
        k = int(cand[rng.integers(len(cand))])
        les = _Lesion(float(grid[0][k // wc]), float(grid[1][k % wc]), r_px)
        lesions.append(les)
        _add_lesion_blob(rng, lesion, les, grid)
    return lesions, lesion


def _textures(rng: np.random.Generator, mpp: float) -> dict:
    """Periodic textures (sizes in µm, so they look alike at any mpp); x period = block width."""
    s = 0.5 / mpp
    period = max(64, int(round(512 * s)))
    fibre_a = _periodic_texture(rng, (period - 3, period), (0.9 * s, 7 * s), 14 * s)
    fibre_b = _periodic_texture(rng, (period + 5, period), (7 * s, 0.9 * s), 14 * s)
    grain = _periodic_texture(rng, (251, period), (0.8 * s, 0.8 * s), 0)
    noise = rng.normal(0, 1.6, (257, period, 3)).astype(np.float32)
    background = np.empty(noise.shape, np.uint8)
    for c in range(3):
        background[..., c] = _to_uint8(np.zeros(noise.shape[:2], np.float32), noise[..., c], c)
    return dict(
        period=period,
        fibre_a=fibre_a,
        fibre_b=fibre_b,
        grain=grain,
        noise=noise,
        background=background,
    )


def _stains(rng: np.random.Generator) -> dict:
    """Slide-to-slide stain variation: eosin and haematoxylin strength +-12% / +-10%."""
    e_s, h_s = rng.uniform(0.88, 1.12), rng.uniform(0.9, 1.1)
    stains = {
        "od_stroma": _OD_STROMA * e_s,
        "od_lesion_bg": _OD_LESION_BG * (0.5 * e_s + 0.5 * h_s),
        "od_nucleus": _OD_NUC * h_s,
        "od_lesion_nucleus": _OD_LESION_NUC * h_s,
    }
    return {k: tuple(float(x) for x in v) for k, v in stains.items()}


def _make_scene(
    width: int, height: int, mpp: float, seed: int, positive: bool, n_lesions: int
) -> _Scene:
    """The scene of one slide; the random draws are made in a fixed order from the seed."""
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 0x5C3E])
    um_per_cell = _COARSE * mpp
    tissue = _tissue_field(rng, width, height, um_per_cell)
    eosin, orient, cellularity = _stain_fields(rng, tissue.shape, um_per_cell)
    lesions: list[_Lesion] = []
    lesion_pad = None
    if positive and n_lesions > 0:
        lesions, lesion = _lesion_field(rng, tissue, width, height, mpp, n_lesions)
        lesion_pad = np.pad(lesion, _PAD, mode="edge")
    textures = _textures(rng, mpp)
    stains = _stains(rng)
    return _Scene(
        width=width,
        height=height,
        mpp=mpp,
        seed=seed,
        tissue=np.pad(tissue, _PAD, mode="edge").astype(np.float32),
        lesion=lesion_pad,
        eosin=eosin.astype(np.float32),
        orient=orient.astype(np.float32),
        cellularity=cellularity.astype(np.float32),
        lesions=lesions,
        **textures,
        **stains,
    )
