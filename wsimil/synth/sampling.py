"""Sampling the coarse scene fields at level-0 positions, and the ground-truth lesion mask.

Tissue and lesion fields are sampled with a cubic B-spline (smooth outlines, padded fields),
the others bilinearly; both on grids (blocks) or at scattered points (nucleus centres).
"""

from __future__ import annotations

import numpy as np

from .scene import _COARSE, _PAD, _Scene


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
