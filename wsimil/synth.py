"""Synthetic H&E-like whole-slide images: a deterministic sample cohort for demos and tests.

Each slide is a pyramidal, tiled, JPEG-compressed BigTIFF that OpenSlide opens as a
``generic-tiff`` slide with several levels and ``openslide.mpp-x``/``mpp-y``. It shows a bright
background with a few irregular pieces of pink, fibrous stroma sprinkled with small purple
nuclei. Positive slides also carry ``n_lesions`` small lesions: densely packed, large, dark,
irregular nuclei on a dark purple background. The ground truth is a lesion mask at a fixed
downsample, saved as an 8-bit PNG (0/255) next to the cohort.

How a slide is made (memory stays bounded for any slide size):

1. A *scene* is computed once per slide on a coarse grid (one value per 32 x 32 level-0 px):
   signed tissue and lesion fields in level-0 pixel units (positive inside), eosin and fibre
   orientation fields and a cellularity field, plus small periodic textures.
2. Level 0 is rendered in horizontal bands, each in blocks of 512 x 512 px (at 0.5 µm/px),
   whose pixels are a function of the absolute position only: tissue and lesion fields are
   sampled with a cubic B-spline (smooth outlines), the others bilinearly; textures are
   indexed modulo their period; nuclei come from per-cell counter-based random numbers keyed
   by ``(slide seed, cell row, cell col)`` and every nucleus whose stamp reaches a block is
   drawn, so nuclei are never cut. The pixels therefore do not depend on the band size.
   Blocks that are all background are copied from a pre-rendered background texture.
3. The bands are streamed as tiles to :class:`tifffile.TiffWriter` and reduced on the fly
   (4 x 4 block mean, level by level) into arrays for the reduced levels; arrays larger than
   256 MB are appended to a raw file in a temporary folder next to the output (plain reads
   and writes rather than a memory map, whose resident pages would count towards RSS) and
   read back in bands. The reduced levels are then written as separate pages with
   ``subfiletype=1``, which OpenSlide's generic-tiff reader needs to see them as levels.

Peak memory is about 200 MB for 10,000 and for 40,000 px square slides.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["SynthSlide", "write_synthetic_slide", "make_cohort", "load_lesion_mask"]

_COARSE = 32  # level-0 px per scene-field pixel
_MAX_LEVEL_BYTES = 256 * 1024 * 1024  # larger reduced levels go to a temporary file
_BAND_BYTES = 32 * 1024 * 1024  # default size of one level-0 band (uint8 RGB)
_ENCODE_BUFFER = 16 * 1024 * 1024  # tiles tifffile collects for its encoder threads
_BLOCK_ROWS = 512  # render unit inside a band: _BLOCK_ROWS x texture period (512 px at 0.5 µm/px)
_MAX_LESION_FRACTION = 0.05  # lesion radius <= this fraction of the short side
_MIN_LEVEL_LONG_SIDE = 1_000

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


@dataclass(frozen=True)
class SynthSlide:
    """One slide of a synthetic cohort.

    Attributes
    ----------
    slide_id : str
        ``synth_000``, ``synth_001``, ...
    path : Path
        The pyramidal ``.tiff``.
    label : int
        1 if the slide has lesions, else 0.
    lesion_mask_path : Path
        8-bit PNG (0/255) of the lesion mask; always written (all zero for negative slides).
    """

    slide_id: str
    path: Path
    label: int
    lesion_mask_path: Path


# ------------------------------------------------------------------------------------------
# Counter-based random numbers (splitmix64), so any cell's nuclei can be drawn on their own.
# ------------------------------------------------------------------------------------------
_U64 = np.uint64
_GOLDEN, _MIX1, _MIX2 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of a uint64 array (wrap-around arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def _cell_uniforms(
    seed: int, stream: int, rows: np.ndarray, cols: np.ndarray, n_slots: int, n_vars: int
) -> np.ndarray:
    """Uniform [0, 1) numbers for grid cells, a pure function of (seed, stream, row, col, slot, var).

    Returns
    -------
    ndarray, shape (len(rows), len(cols), n_slots, n_vars), float32
    """
    base = _splitmix(np.array([(seed & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64))
    base = _splitmix(base ^ _U64(stream))
    key = _splitmix(base ^ np.asarray(rows, dtype=np.uint64)[:, None])  # (nr, 1)
    key = _splitmix(key ^ (np.asarray(cols, dtype=np.uint64)[None, :] * _GOLDEN))  # (nr, nc)
    counter = np.arange(n_slots * n_vars, dtype=np.uint64).reshape(n_slots, n_vars)
    bits = _splitmix(key[:, :, None, None] + counter * _MIX1)
    return ((bits >> _U64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


# ------------------------------------------------------------------------------------------
# Scene: coarse fields and textures, computed once per slide
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


@dataclass
class _Lesion:
    cy: float
    cx: float
    r_px: float


_PAD = 2  # edge padding of the B-spline-sampled fields


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


def _make_scene(
    width: int, height: int, mpp: float, seed: int, positive: bool, n_lesions: int
) -> _Scene:
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, 0x5C3E])
    hc, wc = height // _COARSE + 2, width // _COARSE + 2
    shape = (hc, wc)
    um_per_cell = _COARSE * mpp
    short = min(hc, wc)

    # Tissue: a few large irregular blobs, kept away from the slide border.
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
    tissue = np.minimum(tissue, -_to_px_units(h))

    eosin = 0.8 * _smooth_noise(rng, shape, max(250.0 / um_per_cell, 1.5)) + 0.6 * _smooth_noise(
        rng, shape, max(50.0 / um_per_cell, 1.0)
    )
    orient = np.clip(0.5 + 1.5 * _smooth_noise(rng, shape, max(300.0 / um_per_cell, 1.5)), 0, 1)
    cellularity = np.clip(
        0.34 + 0.16 * _smooth_noise(rng, shape, max(200.0 / um_per_cell, 1.5)), 0.08, 0.7
    )

    tissue_pad = np.pad(tissue, _PAD, mode="edge")
    lesions: list[_Lesion] = []
    lesion_pad = None
    if positive and n_lesions > 0:
        lesion = np.full(shape, -1e4, np.float32)
        inside = tissue > 0
        dist_px = ndimage.distance_transform_edt(inside) * _COARSE
        cy_grid = (np.arange(hc) + 0.5) * _COARSE
        cx_grid = (np.arange(wc) + 0.5) * _COARSE
        for _ in range(n_lesions):
            r_px = min(rng.uniform(250.0, 600.0) / mpp, _MAX_LESION_FRACTION * min(width, height))
            free = np.ones(shape, bool)
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
            cand = np.flatnonzero(ok)
            k = int(cand[rng.integers(len(cand))])
            les = _Lesion(float(cy_grid[k // wc]), float(cx_grid[k % wc]), r_px)
            lesions.append(les)
            # Irregular blob: radius modulated by smooth noise, never beyond 1.3 r.
            r = 1.5 * r_px / _COARSE + 3
            cy, cx = les.cy / _COARSE, les.cx / _COARSE
            y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, hc)
            x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, wc)
            d = np.hypot(cy_grid[y0:y1, None] - les.cy, cx_grid[None, x0:x1] - les.cx)
            wobble = _smooth_noise(rng, (y1 - y0, x1 - x0), max(r_px / 2.5 / _COARSE, 1.5))
            blob = np.minimum(r_px - d + 0.28 * r_px * wobble, 1.3 * r_px - d)
            lesion[y0:y1, x0:x1] = np.maximum(lesion[y0:y1, x0:x1], blob)
        lesion_pad = np.pad(lesion, _PAD, mode="edge")

    # Periodic textures (sizes in µm, so they look alike at any mpp); x period = block width.
    s = 0.5 / mpp
    period = max(64, int(round(512 * s)))
    fibre_a = _periodic_texture(rng, (period - 3, period), (0.9 * s, 7 * s), 14 * s)
    fibre_b = _periodic_texture(rng, (period + 5, period), (7 * s, 0.9 * s), 14 * s)
    grain = _periodic_texture(rng, (251, period), (0.8 * s, 0.8 * s), 0)
    noise = rng.normal(0, 1.6, (257, period, 3)).astype(np.float32)
    # Slide-to-slide stain variation: eosin and haematoxylin strength +-12% / +-10%.
    e_s, h_s = rng.uniform(0.88, 1.12), rng.uniform(0.9, 1.1)
    stains = {
        "od_stroma": _OD_STROMA * e_s,
        "od_lesion_bg": _OD_LESION_BG * (0.5 * e_s + 0.5 * h_s),
        "od_nucleus": _OD_NUC * h_s,
        "od_lesion_nucleus": _OD_LESION_NUC * h_s,
    }
    background = np.empty(noise.shape, np.uint8)
    for c in range(3):
        background[..., c] = _to_uint8(np.zeros(noise.shape[:2], np.float32), noise[..., c], c)
    return _Scene(
        width=width,
        height=height,
        mpp=mpp,
        seed=seed,
        tissue=tissue_pad.astype(np.float32),
        lesion=lesion_pad,
        eosin=eosin.astype(np.float32),
        orient=orient.astype(np.float32),
        cellularity=cellularity.astype(np.float32),
        lesions=lesions,
        period=period,
        fibre_a=fibre_a,
        fibre_b=fibre_b,
        grain=grain,
        noise=noise,
        background=background,
        **{k: tuple(float(x) for x in v) for k, v in stains.items()},
    )


def _to_uint8(od: np.ndarray, noise: np.ndarray, c: int) -> np.ndarray:
    """Optical density of channel ``c`` -> grey levels (uint8); shared by every code path."""
    val = BACKGROUND_RGB[c] * np.exp(-od) + noise + 0.5
    np.clip(val, 0, 255, out=val)
    return val.astype(np.uint8)


# ------------------------------------------------------------------------------------------
# Sampling the coarse fields
# ------------------------------------------------------------------------------------------
def _linear_axis(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear indices and weights along one axis for continuous level-0 coordinates."""
    u = np.clip(np.asarray(coords, np.float64) / _COARSE - 0.5, 0, n - 1)
    i0 = np.minimum(np.floor(u).astype(np.intp), n - 2)
    return i0, (u - i0).astype(np.float32)


def _bspline_axis(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline taps along one axis: index of the first of 4 taps in the padded field,
    and weights of shape (len(coords), 4). The weights are >= 0 and sum to 1, so the sampled
    value lies between the smallest and largest tap (used to skip blank blocks)."""
    u = np.clip(np.asarray(coords, np.float64) / _COARSE - 0.5, 0, n - 1)
    i = np.floor(u).astype(np.intp)
    t = (u - i).astype(np.float32)
    t2 = t * t
    t3 = t2 * t
    w = np.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], axis=-1) / 6
    return i + _PAD - 1, w.astype(np.float32)


def _tap_range(coords_lo: float, coords_hi: float, n: int) -> tuple[int, int]:
    """Rows (or cols) of a padded field touched by B-spline sampling in [lo, hi]."""
    i, _ = _bspline_axis(np.array([coords_lo, coords_hi]), n)
    return int(i[0]), int(i[1]) + 4


def _sample_spline(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample a padded field with the cubic B-spline on the grid ``ys x xs`` -> (len(ys), len(xs))."""
    hc, wc = field.shape[0] - 2 * _PAD, field.shape[1] - 2 * _PAD
    iy, wy = _bspline_axis(ys, hc)
    ix, wx = _bspline_axis(xs, wc)
    r0, r1 = int(iy.min()), int(iy.max()) + 4
    c0, c1 = int(ix.min()), int(ix.max()) + 4
    sub = field[r0:r1, c0:c1]
    iy, ix = iy - r0, ix - c0
    rows = sub[iy] * wy[:, 0:1]
    for k in range(1, 4):
        rows += sub[iy + k] * wy[:, k : k + 1]
    out = rows[:, ix] * wx[:, 0]
    for k in range(1, 4):
        out += rows[:, ix + k] * wx[:, k]
    return out


def _sample_spline_points(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    hc, wc = field.shape[0] - 2 * _PAD, field.shape[1] - 2 * _PAD
    iy, wy = _bspline_axis(ys, hc)
    ix, wx = _bspline_axis(xs, wc)
    out = np.zeros(len(iy), np.float32)
    for ky in range(4):
        for kx in range(4):
            out += field[iy + ky, ix + kx] * (wy[:, ky] * wx[:, kx])
    return out


def _sample_linear(fields: list[np.ndarray], ys: np.ndarray, xs: np.ndarray) -> list[np.ndarray]:
    """Sample unpadded coarse fields bilinearly on the grid ``ys x xs`` -> (len(ys), len(xs)) each."""
    hc, wc = fields[0].shape
    iy, wy = _linear_axis(ys, hc)
    ix, wx = _linear_axis(xs, wc)
    r0, r1 = int(iy.min()), int(iy.max()) + 2
    c0, c1 = int(ix.min()), int(ix.max()) + 2
    iy, ix = iy - r0, ix - c0
    wy = wy[:, None]
    out = []
    for f in fields:
        sub = f[r0:r1, c0:c1]
        rows = sub[iy] * (1 - wy) + sub[iy + 1] * wy
        out.append(rows[:, ix] * (1 - wx) + rows[:, ix + 1] * wx)
    return out


def _sample_linear_points(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    hc, wc = field.shape
    iy, wy = _linear_axis(ys, hc)
    ix, wx = _linear_axis(xs, wc)
    top = field[iy, ix] * (1 - wx) + field[iy, ix + 1] * wx
    bot = field[iy + 1, ix] * (1 - wx) + field[iy + 1, ix + 1] * wx
    return top * (1 - wy) + bot * wy


def _tissue_alpha(t):
    """Tissue opacity from the signed tissue field: a ~2 px soft edge."""
    return np.clip(t * 0.5 + 0.5, 0, 1)


def _lesion_alpha(lz, alpha):
    """Lesion weight from the signed lesion field and the tissue opacity: a ~3 px soft edge."""
    return np.clip(lz * (1 / 3) + 0.5, 0, 1) * alpha


def _scene_mask(scene: _Scene, downsample: int) -> np.ndarray:
    """Ground-truth lesion mask, bool (ceil(H/ds), ceil(W/ds)), sampled at the cell centres."""
    h, w = -(-scene.height // downsample), -(-scene.width // downsample)
    if scene.lesion is None:
        return np.zeros((h, w), bool)
    ys = np.minimum((np.arange(h) + 0.5) * downsample, scene.height - 0.5)
    xs = np.minimum((np.arange(w) + 0.5) * downsample, scene.width - 0.5)
    mask = np.zeros((h, w), bool)
    step = max(1, (1 << 21) // max(w, 1))
    for r in range(0, h, step):
        t = _sample_spline(scene.tissue, ys[r : r + step], xs)
        lz = _sample_spline(scene.lesion, ys[r : r + step], xs)
        mask[r : r + step] = _lesion_alpha(lz, _tissue_alpha(t)) > 0.5
    return mask


# ------------------------------------------------------------------------------------------
# Nuclei
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _NucleusKind:
    stream: int
    slots_per_side: int  # jittered sub-grid of slots per cell (0: uniform positions)
    n_slots: int
    semi_um: tuple[float, float]  # semi-axis range of round nuclei
    max_um: float  # largest semi-axis of any nucleus of this kind (before irregularity)
    hollow: float  # lighter centre / darker rim
    nucleolus: float
    irregular: float


_STROMA_NUCLEI = _NucleusKind(
    stream=1,
    slots_per_side=0,
    n_slots=12,
    semi_um=(1.5, 2.0),
    max_um=3.6,
    hollow=0.1,
    nucleolus=0.0,
    irregular=0.06,
)
_LESION_NUCLEI = _NucleusKind(
    stream=2,
    slots_per_side=8,
    n_slots=64,
    semi_um=(3.0, 4.1),
    max_um=4.1,
    hollow=0.35,
    nucleolus=0.55,
    irregular=0.16,
)
_N_VARS = 14


def _cell_px(mpp: float) -> int:
    return max(32, int(round(64.0 / mpp)))  # 64 µm cells: 128 px at 0.5 µm/px


def _stamp_radius(kind: _NucleusKind, mpp: float) -> int:
    return int(math.ceil(kind.max_um * (1 + 2 * kind.irregular) / mpp)) + 2


def _draw_nuclei(scene: _Scene, kind: _NucleusKind, img: np.ndarray, y0: int, x0: int) -> None:
    """Draw one kind of nuclei into the block ``img`` (top-left at (y0, x0)) in place.

    Writes the nuclear stain amount (0 .. ~1.5), max-composited. Each cell's nuclei come from
    counter-based random numbers keyed by (seed, cell row, cell col), and every nucleus whose
    stamp touches the block is drawn, so blocks and bands join without seams.
    """
    bh, bw = img.shape
    mpp = scene.mpp
    cell = _cell_px(mpp)
    rad = _stamp_radius(kind, mpp)
    n_rows, n_cols = -(-scene.height // cell), -(-scene.width // cell)
    rows = np.arange(max((y0 - rad) // cell, 0), min((y0 + bh + rad) // cell + 1, n_rows))
    cols = np.arange(max((x0 - rad) // cell, 0), min((x0 + bw + rad) // cell + 1, n_cols))
    if len(rows) == 0 or len(cols) == 0:
        return
    u = _cell_uniforms(scene.seed, kind.stream, rows, cols, kind.n_slots, _N_VARS)
    if kind.slots_per_side:
        g = kind.slots_per_side
        k = np.arange(kind.n_slots)
        cy = rows[:, None, None] * cell + ((k // g)[None, None, :] + u[..., 1]) * (cell / g)
        cx = cols[None, :, None] * cell + ((k % g)[None, None, :] + u[..., 2]) * (cell / g)
    else:
        cy = rows[:, None, None] * cell + u[..., 1] * cell
        cx = cols[None, :, None] * cell + u[..., 2] * cell
    u = u.reshape(-1, _N_VARS)
    cy, cx = cy.reshape(-1).astype(np.float32), cx.reshape(-1).astype(np.float32)
    keep = (
        (cy < scene.height)
        & (cx < scene.width)
        & (cy >= y0 - rad)
        & (cy < y0 + bh + rad)
        & (cx >= x0 - rad)
        & (cx < x0 + bw + rad)
    )
    u, cy, cx = u[keep], cy[keep], cx[keep]
    if len(u) == 0:
        return
    alpha = _tissue_alpha(_sample_spline_points(scene.tissue, cy, cx))
    if scene.lesion is not None:
        lz = _lesion_alpha(_sample_spline_points(scene.lesion, cy, cx), alpha)
    else:
        lz = np.zeros_like(alpha)
    if kind is _LESION_NUCLEI:
        p = 0.92 * lz
    else:
        p = alpha * (1 - lz) * _sample_linear_points(scene.cellularity, cy, cx)
    on = u[:, 0] < p
    u, cy, cx = u[on], cy[on], cx[on]
    if len(u) == 0:
        return

    # Shape of each nucleus (semi-axes a >= b in px), darkness and boundary irregularity.
    lo, hi = kind.semi_um
    a_round = lo + (hi - lo) * u[:, 4]
    if kind is _STROMA_NUCLEI:
        spindle = u[:, 3] < 0.4  # fibroblast-like elongated nuclei; the rest round and dark
        a = np.where(spindle, 2.6 + 1.0 * u[:, 4], a_round) / mpp
        b = np.where(spindle, 0.9 + 0.4 * u[:, 5], a_round * (0.8 + 0.2 * u[:, 5])) / mpp
        dark = np.where(spindle, 0.75 + 0.25 * u[:, 7], 0.95 + 0.3 * u[:, 7])
    else:
        a = a_round / mpp
        b = a * (0.68 + 0.3 * u[:, 5])
        dark = 1.0 + 0.4 * u[:, 7]
    theta = np.pi * u[:, 6]
    e2 = kind.irregular * u[:, 8]
    e3 = kind.irregular * u[:, 10]
    ph2, ph3 = 2 * np.pi * u[:, 9], 2 * np.pi * u[:, 11]

    off = np.arange(-rad, rad + 1, dtype=np.float32)
    iy, ix = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)

    def col(v):
        return v[:, None, None]

    dy = off[None, :, None] + 0.5 - col(cy - iy)
    dx = off[None, None, :] + 0.5 - col(cx - ix)
    cos_t, sin_t = col(np.cos(theta)), col(np.sin(theta))
    xr = dx * cos_t + dy * sin_t
    yr = dy * cos_t - dx * sin_t
    rn = np.sqrt((xr / col(a)) ** 2 + (yr / col(b)) ** 2)
    ang = np.arctan2(yr, xr)
    rm = rn * (1 + col(e2) * np.cos(2 * ang + col(ph2)) + col(e3) * np.cos(3 * ang + col(ph3)))
    cover = np.clip((1 - rm) * col(np.sqrt(a * b)) + 0.5, 0, 1)
    val = cover * col(dark) * (1 - kind.hollow * np.clip(1 - rm * rm, 0, 1))
    if kind.nucleolus > 0:
        ny = (u[:, 12] - 0.5) * 0.6 * b
        nx = (u[:, 13] - 0.5) * 0.6 * a
        sig = 0.55 / mpp
        val = val + cover * kind.nucleolus * np.exp(
            -((xr - col(nx)) ** 2 + (yr - col(ny)) ** 2) / (2 * sig * sig)
        )

    yy = col(iy - y0) + off.astype(np.int64)[None, :, None]
    xx = col(ix - x0) + off.astype(np.int64)[None, None, :]
    m = (val > 0.01) & (yy >= 0) & (yy < bh) & (xx >= 0) & (xx < bw)
    flat = (yy * bw + xx)[m]
    np.maximum.at(img.reshape(-1), flat, val[m].astype(np.float32))


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------
def _render_block(scene: _Scene, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Render level-0 pixels [y0:y1, x0:x1] -> uint8 (y1-y0, x1-x0, 3).

    ``x0`` must be a multiple of ``scene.period`` and ``x1 - x0 <= scene.period`` (textures are
    then plain row slices). Blocks that are all background, or all tissue without edges, take
    shortcuts that give exactly the same pixels as the general path.
    """
    bh, bw = y1 - y0, x1 - x0
    ys = np.arange(y0, y1)
    tex_rows = lambda tex: tex[ys % tex.shape[0], :bw]  # noqa: E731
    rad = _stamp_radius(_LESION_NUCLEI, scene.mpp)
    hc, wc = scene.tissue.shape[0] - 2 * _PAD, scene.tissue.shape[1] - 2 * _PAD
    r0, r1 = _tap_range(y0 - rad, y1 + rad, hc)
    c0, c1 = _tap_range(x0 - rad, x1 + rad, wc)
    foot = scene.tissue[r0:r1, c0:c1]
    if float(foot.max()) < -2.0:  # no tissue and no nucleus reaches this block
        return tex_rows(scene.background).copy()
    interior = float(foot.min()) > 2.0  # tissue everywhere: opacity exactly 1
    has_lesion = scene.lesion is not None and float(scene.lesion[r0:r1, c0:c1].max()) > -1.5

    yc, xc = ys + 0.5, np.arange(x0, x1) + 0.5
    alpha = np.float32(1.0) if interior else _tissue_alpha(_sample_spline(scene.tissue, yc, xc))
    lz = _lesion_alpha(_sample_spline(scene.lesion, yc, xc), alpha) if has_lesion else None
    eos, orient = _sample_linear([scene.eosin, scene.orient], yc, xc)

    fib_b = tex_rows(scene.fibre_b)
    fib = fib_b + orient * (tex_rows(scene.fibre_a) - fib_b)
    grain = tex_rows(scene.grain)
    # Stroma: eosin strength varies slowly; fibres leave paler gaps between them.
    e = alpha * (1 + 0.14 * eos) * (0.55 + 0.6 * fib)

    nuc = np.zeros((bh, bw), np.float32)
    _draw_nuclei(scene, _STROMA_NUCLEI, nuc, y0, x0)
    if has_lesion:
        _draw_nuclei(scene, _LESION_NUCLEI, nuc, y0, x0)
    nuc *= 0.8 + 0.4 * grain  # chromatin granularity
    free = 1 - np.minimum(nuc, 1.0)  # cytoplasm / stroma left visible around nuclei

    noise = tex_rows(scene.noise)
    out = np.empty((bh, bw, 3), np.uint8)
    if has_lesion:
        e_free = e * (1 - lz) * free
        lesion_free = lz * (0.85 + 0.3 * grain) * (1 + 0.08 * eos) * free
    else:
        e_free = e * free
    for c in range(3):
        if has_lesion:
            od = e_free * scene.od_stroma[c] + lesion_free * scene.od_lesion_bg[c]
            od += nuc * (
                scene.od_nucleus[c] + lz * (scene.od_lesion_nucleus[c] - scene.od_nucleus[c])
            )
        else:
            od = e_free * scene.od_stroma[c] + nuc * scene.od_nucleus[c]
        out[..., c] = _to_uint8(od, noise[..., c], c)
    return out


def _render_band(scene: _Scene, y0: int, y1: int) -> np.ndarray:
    band = np.empty((y1 - y0, scene.width, 3), np.uint8)
    for by in range(y0, y1, _BLOCK_ROWS):
        by1 = min(by + _BLOCK_ROWS, y1)
        for bx in range(0, scene.width, scene.period):
            bx1 = min(bx + scene.period, scene.width)
            band[by - y0 : by1 - y0, bx:bx1] = _render_block(scene, by, by1, bx, bx1)
    return band


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
    dims = [(width, height)]
    while len(dims) < 2 or max(dims[-1]) > _MIN_LEVEL_LONG_SIDE:
        w, h = dims[-1]
        if w == 1 and h == 1:
            break
        dims.append((-(-w // 4), -(-h // 4)))
    return dims


def _tiles_of_rows(rows: np.ndarray, width: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles (tile, tile, 3) of one row of tiles; partial edge tiles padded by replication."""
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
        Lesions on a positive slide (radius 250-600 µm, capped at 6% of the short side).
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
    import tifffile

    path = Path(path)
    width_px, height_px = int(width_px), int(height_px)
    if width_px < 1 or height_px < 1:
        raise ValueError(f"slide size must be positive, got {width_px} x {height_px}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if mask_downsample < 1:
        raise ValueError(f"mask_downsample must be >= 1, got {mask_downsample}")
    band = _band_rows or max(tile_px, min(2048, _BAND_BYTES // (3 * width_px)) // tile_px * tile_px)
    if band % tile_px:
        raise ValueError(f"band rows ({band}) must be a multiple of tile_px ({tile_px})")

    scene = _make_scene(width_px, height_px, float(mpp), int(seed), bool(positive), int(n_lesions))
    mask = _scene_mask(scene, int(mask_downsample))
    dims = _level_dims(width_px, height_px)
    common = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(jpeg_quality)},
        tile=(tile_px, tile_px),
        resolutionunit="CENTIMETER",
        metadata=None,
        software="wsimil.synth",
        maxworkers=2,
        buffersize=_ENCODE_BUFFER,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    pyramid = _Pyramid(dims, tmpdir)
    try:

        def level0_tiles() -> Iterator[np.ndarray]:
            for y0 in range(0, height_px, band):
                y1 = min(y0 + band, height_px)
                rows = _render_band(scene, y0, y1)
                pyramid.push(0, rows, final=y1 == height_px)
                for r in range(0, y1 - y0, tile_px):
                    # copies, so tiles queued for the encoder threads do not pin whole bands
                    for t in _tiles_of_rows(rows[r : r + tile_px], width_px, tile_px):
                        yield t.copy()
                del rows

        def level_tiles(store: _RowStore) -> Iterator[np.ndarray]:
            for r in range(0, store.height, tile_px):
                yield from _tiles_of_rows(
                    store.read(r, min(r + tile_px, store.height)), store.width, tile_px
                )

        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            tw.write(
                data=level0_tiles(),
                shape=(height_px, width_px, 3),
                dtype=np.uint8,
                resolution=(1e4 / mpp, 1e4 / mpp),
                **common,
            )
            for k, store in enumerate(pyramid.stores, start=1):
                if store.rows != store.height:
                    raise AssertionError(f"level {k}: {store.rows} of {store.height} rows")
                ds_x, ds_y = width_px / store.width, height_px / store.height
                tw.write(
                    data=level_tiles(store),
                    shape=(store.height, store.width, 3),
                    dtype=np.uint8,
                    resolution=(1e4 / (mpp * ds_x), 1e4 / (mpp * ds_y)),
                    subfiletype=1,
                    **common,
                )
    finally:
        pyramid.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return mask


def _write_mask_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, format="PNG")


def load_lesion_mask(path: str | Path, *, slide_width_px: int) -> tuple[np.ndarray, float]:
    """Read a lesion-mask PNG.

    Parameters
    ----------
    path : str or Path
        8-bit PNG, lesion where the value is > 127.
    slide_width_px : int
        Level-0 width of the slide the mask belongs to.

    Returns
    -------
    mask : ndarray, shape (h, w), bool
    downsample : float
        Level-0 pixels per mask pixel, ``slide_width_px / w``.
    """
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return arr > 127, float(slide_width_px) / arr.shape[1]


def _slide_seed(seed: int, index: int) -> int:
    return int(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 0x51DE, int(index)]).generate_state(
            1
        )[0]
    )


def make_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 24,
    positive_fraction: float = 0.5,
    width_px: int = 10_000,
    height_px: int = 10_000,
    mpp: float = 0.5,
    seed: int = 0,
    n_lesions: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write a synthetic cohort and its manifest.

    Writes ``slides/<slide_id>.tiff``, ``truth/<slide_id>_lesion.png`` and ``manifest.csv``
    (columns ``slide_id,path,label,lesion_mask``; paths relative to ``out_dir``).

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created).
    n_slides : int
        Number of slides (ids ``synth_000``, ``synth_001``, ...).
    positive_fraction : float
        Exactly ``round(n_slides * positive_fraction)`` slides are positive, in an order
        shuffled deterministically from ``seed``.
    width_px, height_px, mpp, n_lesions
        Passed to :func:`write_synthetic_slide`.
    seed : int
        Cohort seed; slide ``i`` uses a seed derived from ``(seed, i)``, so any slide can be
        regenerated alone.
    progress : callable, optional
        ``progress(i, n_slides, slide_id)`` after each slide, ``i`` = slides done (1-based).

    Returns
    -------
    Path
        The manifest. Slides are written to ``<name>.tmp`` and renamed, and slides whose
        ``.tiff`` and mask already exist are skipped, so a killed run resumes where it stopped.
    """
    out_dir = Path(out_dir)
    n_slides = int(n_slides)
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if not 0 <= positive_fraction <= 1:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    slides_dir, truth_dir = out_dir / "slides", out_dir / "truth"
    slides_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)

    n_pos = int(math.floor(n_slides * positive_fraction + 0.5))
    labels = np.zeros(n_slides, np.int64)
    labels[:n_pos] = 1
    labels = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xC0]).permutation(labels)
    digits = max(3, len(str(n_slides - 1)))

    slides: list[SynthSlide] = []
    for i in range(n_slides):
        sid = f"synth_{i:0{digits}d}"
        tiff = slides_dir / f"{sid}.tiff"
        png = truth_dir / f"{sid}_lesion.png"
        if not (tiff.is_file() and png.is_file()):
            tmp_tiff = tiff.with_name(tiff.name + ".tmp")
            tmp_png = png.with_name(png.name + ".tmp")
            mask = write_synthetic_slide(
                tmp_tiff,
                width_px=width_px,
                height_px=height_px,
                mpp=mpp,
                positive=bool(labels[i]),
                seed=_slide_seed(seed, i),
                n_lesions=n_lesions,
            )
            _write_mask_png(mask, tmp_png)
            os.replace(tmp_png, png)
            os.replace(tmp_tiff, tiff)
        slides.append(SynthSlide(sid, tiff, int(labels[i]), png))
        if progress is not None:
            progress(i + 1, n_slides, sid)

    manifest = out_dir / "manifest.csv"
    tmp = manifest.with_name(manifest.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "lesion_mask"])
        for s in slides:
            w.writerow(
                [
                    s.slide_id,
                    s.path.relative_to(out_dir).as_posix(),
                    s.label,
                    s.lesion_mask_path.relative_to(out_dir).as_posix(),
                ]
            )
    os.replace(tmp, manifest)
    return manifest
