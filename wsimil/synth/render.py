"""Rendering level-0 pixels of a synthetic slide: nuclei, blocks and bands.

Level 0 is rendered in horizontal bands, each in blocks of 512 x 512 px (at 0.5 µm/px), whose
pixels are a function of the absolute position only: tissue and lesion fields are sampled with
a cubic B-spline (smooth outlines), the others bilinearly; textures are indexed modulo their
period; nuclei come from per-cell counter-based random numbers keyed by
``(slide seed, cell row, cell col)`` and every nucleus whose stamp reaches a block is drawn, so
nuclei are never cut. The pixels therefore do not depend on the band size. Blocks that are all
background are copied from a pre-rendered background texture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .sampling import (
    _lesion_alpha,
    _sample_linear,
    _sample_linear_points,
    _sample_spline,
    _sample_spline_points,
    _tap_range,
    _tissue_alpha,
)
from .scene import _PAD, _Scene, _to_uint8

_BLOCK_ROWS = 512  # render unit inside a band: _BLOCK_ROWS x texture period (512 px at 0.5 µm/px)

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


def _nucleus_candidates(
    scene: _Scene, kind: _NucleusKind, y0: int, x0: int, bh: int, bw: int, rad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Random numbers (n, _N_VARS) and centres (cy, cx) of the present nuclei of one kind whose
    stamp may reach the block [y0:y0+bh, x0:x0+bw]; None if there are none."""
    cell = _cell_px(scene.mpp)
    n_rows, n_cols = -(-scene.height // cell), -(-scene.width // cell)
    rows = np.arange(max((y0 - rad) // cell, 0), min((y0 + bh + rad) // cell + 1, n_rows))
    cols = np.arange(max((x0 - rad) // cell, 0), min((x0 + bw + rad) // cell + 1, n_cols))
    if len(rows) == 0 or len(cols) == 0:
        return None
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
        return None
    on = u[:, 0] < _nucleus_presence(scene, kind, cy, cx)
    if not on.any():
        return None
    return u[on], cy[on], cx[on]


def _nucleus_presence(
    scene: _Scene, kind: _NucleusKind, cy: np.ndarray, cx: np.ndarray
) -> np.ndarray:
    """Probability that a nucleus slot centred at (cy, cx) is used."""
    alpha = _tissue_alpha(_sample_spline_points(scene.tissue, cy, cx))
    if scene.lesion is not None:
        lz = _lesion_alpha(_sample_spline_points(scene.lesion, cy, cx), alpha)
    else:
        lz = np.zeros_like(alpha)
    if kind is _LESION_NUCLEI:
        return 0.92 * lz
    return alpha * (1 - lz) * _sample_linear_points(scene.cellularity, cy, cx)


def _nucleus_shapes(
    kind: _NucleusKind, u: np.ndarray, mpp: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Semi-axes a >= b (px) and darkness of each nucleus."""
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
    return a, b, dark


def _nucleus_stamps(
    kind: _NucleusKind, u: np.ndarray, cy: np.ndarray, cx: np.ndarray, rad: int, mpp: float
) -> np.ndarray:
    """Stain amount of each nucleus on its (2 rad + 1)^2 px stamp centred on floor(cy, cx).

    Ellipses with boundary irregularity (2nd and 3rd harmonics), a lighter centre and, for
    lesion nuclei, a nucleolus. Returns (n, 2 rad + 1, 2 rad + 1).
    """
    a, b, dark = _nucleus_shapes(kind, u, mpp)
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
    return val


def _draw_nuclei(scene: _Scene, kind: _NucleusKind, img: np.ndarray, y0: int, x0: int) -> None:
    """Draw one kind of nuclei into the block ``img`` (top-left at (y0, x0)) in place.

    Writes the nuclear stain amount (0 .. ~1.5), max-composited. Each cell's nuclei come from
    counter-based random numbers keyed by (seed, cell row, cell col), and every nucleus whose
    stamp touches the block is drawn, so blocks and bands join without seams.
    """
    bh, bw = img.shape
    rad = _stamp_radius(kind, scene.mpp)
    found = _nucleus_candidates(scene, kind, y0, x0, bh, bw, rad)
    if found is None:
        return
    u, cy, cx = found
    val = _nucleus_stamps(kind, u, cy, cx, rad, scene.mpp)
    off = np.arange(-rad, rad + 1, dtype=np.int64)
    iy, ix = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)
    yy = (iy - y0)[:, None, None] + off[None, :, None]
    xx = (ix - x0)[:, None, None] + off[None, None, :]
    m = (val > 0.01) & (yy >= 0) & (yy < bh) & (xx >= 0) & (xx < bw)
    flat = (yy * bw + xx)[m]
    np.maximum.at(img.reshape(-1), flat, val[m].astype(np.float32))


# ------------------------------------------------------------------------------------------
# Blocks and bands
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
