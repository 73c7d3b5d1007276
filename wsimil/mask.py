"""The tissue mask of a slide: segmented on a coarse level, its edges redrawn on a finer one.

Reading and geometry only; the pixel rules are :mod:`wsimil.tissue`'s.

1. **Coarse.** The slide reduced to ``coarse`` µm per pixel (by default as coarse as the tile
   size and the minimum region and hole sizes allow, at most 32 µm: a 64x level at 0.5 µm/px)
   gives the tissue rule (signal and Otsu threshold) and a cleaned mask.
2. **Fine.** Coarse pixels at the mask's edge, and those with weak tissue signal that the
   coarse mask did not keep (thin strands and fringes diluted by averaging), are read again at
   ``mask_mpp`` in blocks and classified pixel by pixel with the same rule. Everywhere else
   the fine mask copies the coarse one.
3. The re-read blocks are cleaned at the fine pixel size (closing, opening, small regions,
   holes), seeing their surroundings; regions and holes that go on outside a block are left.

The edge blocks are read again from the fine level with the slide's reader, so a slide costs
about its coarse level plus the length of its tissue outline. Where reading the whole fine image
costs no more (both grids on one pyramid level, or a TIFF-based file that tifffile decodes
several times faster than OpenSlide, and a fine image of at most 64 MB), it is read whole, once,
and the coarse image is reduced from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import TileConfig
from .slide import Slide, tiff_twin
from .tissue import clean_mask, close_open, dilate_cross, drop_small, erode_cross, fit_tissue_rule

MAX_COARSE_UM = 32.0
BLUR_UM = 8.0  # sigma of the signal's blur, as tissue_mask's default
BLOCK = 16  # coarse pixels per side of a block read again at the fine resolution
MAX_READ_BYTES = 64 * 2**20


@dataclass(frozen=True)
class MaskGrid:
    """Pixel grids of the two masks: ``factor`` fine pixels per coarse pixel per side."""

    coarse_size: tuple[int, int]  # (w, h)
    factor: int
    downsample: float  # level-0 px per fine mask px

    @property
    def fine_size(self) -> tuple[int, int]:
        return self.coarse_size[0] * self.factor, self.coarse_size[1] * self.factor


def coarse_mask_um(cfg: TileConfig) -> float:
    """µm per pixel of the coarse segmentation: ``cfg.mask_coarse_mpp``, or the coarsest that
    still puts 4 pixels across a tile, across the smallest kept region and across the largest
    filled hole (at most 32 µm, at least ``cfg.mask_mpp``)."""
    if cfg.mask_coarse_mpp is not None:
        return max(cfg.mask_coarse_mpp, cfg.mask_mpp)
    sides = [cfg.tile_px * cfg.target_mpp]
    sides += [math.sqrt(a) for a in (cfg.min_tissue_um2, cfg.max_hole_um2) if a > 0]
    return float(np.clip(min(sides) / 4, cfg.mask_mpp, MAX_COARSE_UM))


def mask_grid(slide: Slide, cfg: TileConfig) -> MaskGrid:
    """The coarse and fine mask grids of ``slide`` (fine: about ``cfg.mask_mpp`` µm/px, never
    finer than level 0)."""
    assert slide.mpp is not None
    w0, h0 = slide.dimensions
    fine_ds = max(cfg.mask_mpp / slide.mpp, 1.0)
    factor = max(1, int(round(coarse_mask_um(cfg) / (fine_ds * slide.mpp))))
    cw = max(1, math.ceil(w0 / (fine_ds * factor)))
    ch = max(1, math.ceil(h0 / (fine_ds * factor)))
    return MaskGrid((cw, ch), factor, w0 / (cw * factor))


def two_level_mask(slide: Slide, cfg: TileConfig) -> tuple[np.ndarray, float, np.ndarray]:
    """Tissue mask of ``slide`` at about ``cfg.mask_mpp`` (see the module docstring).

    Returns
    -------
    mask : ndarray, shape (h, w), bool
        The fine mask.
    downsample : float
        Level-0 px per fine mask px.
    rgb : ndarray, shape (H, W, 3), uint8
        The largest whole image of the slide read on the way (for the QC image): the fine
        image when it is read whole (then the coarse one is reduced from it): when both grids
        come from the same level, or when tifffile reads the file (:func:`tiff_twin`), whose
        whole-level reads cost less than OpenSlide's reads of the edge blocks; else the
        coarse one.
    """
    from PIL import Image

    grid = mask_grid(slide, cfg)
    k = grid.factor
    full = None  # the whole fine image, when reading it costs no more than the edges
    fw, fh = grid.fine_size
    twin = tiff_twin(slide)
    try:
        same_level = slide.best_level_at_or_finer(grid.downsample * k) == (
            slide.best_level_at_or_finer(grid.downsample)
        )
        if k > 1 and (same_level or twin is not None) and 3 * fw * fh <= MAX_READ_BYTES:
            full = _read_whole(twin or slide, grid.fine_size, grid.downsample)
            rgb = np.asarray(Image.fromarray(full).reduce(k))
        else:
            rgb = (twin or slide).read_downsampled(grid.coarse_size)
    finally:
        if twin is not None:
            twin.close()
    coarse_um = grid.downsample * grid.factor * slide.mpp
    rule, sig = fit_tissue_rule(
        rgb, pixel_um=coarse_um, blur_um=BLUR_UM, remove_pen=cfg.remove_pen,
        white_level=cfg.white_level, black_level=cfg.black_level,
    )  # fmt: skip
    raw = rule.pixels(rgb, signal=sig)
    coarse = clean_mask(raw, pixel_um=coarse_um, min_tissue_um2=cfg.min_tissue_um2,
                        max_hole_um2=cfg.max_hole_um2)  # fmt: skip
    if k == 1:
        return coarse, grid.downsample, rgb
    weak = rule.pixels(rgb, signal=sig * 2.0)  # half the threshold: diluted strands, fringes
    edge = dilate_cross(coarse | weak) & ~erode_cross(coarse)
    fine = np.repeat(np.repeat(coarse, k, axis=0), k, axis=1)
    fine_um = grid.downsample * slide.mpp
    runs = list(edge_runs(edge))
    for (y0, y1), (x0, x1) in runs:
        if full is not None:
            block = full[y0 * k : y1 * k, x0 * k : x1 * k]
        else:
            block = read_fine(slide, grid, x0 * k, y0 * k, (x1 - x0) * k, (y1 - y0) * k)
        zone = np.repeat(np.repeat(edge[y0:y1, x0:x1], k, axis=0), k, axis=1)
        px = rule.pixels(block, blur_px=BLUR_UM / fine_um)
        view = fine[y0 * k : y1 * k, x0 * k : x1 * k]
        view[zone] = px[zone]
    for (y0, y1), (x0, x1) in runs:  # elsewhere the fine mask is the cleaned coarse one
        clean_window(fine, (y0 * k, y1 * k, x0 * k, x1 * k), pixel_um=fine_um,
                     min_tissue_um2=cfg.min_tissue_um2, max_hole_um2=cfg.max_hole_um2)  # fmt: skip
    return fine, grid.downsample, rgb if full is None else full


def clean_window(
    mask: np.ndarray, window: tuple[int, int, int, int], *, pixel_um: float,
    min_tissue_um2: float, max_hole_um2: float, margin: int = 3,
) -> None:  # fmt: skip
    """:func:`~wsimil.tissue.clean_mask` of ``mask[y0:y1, x0:x1]``, in place, as part of the
    whole mask: the morphology sees ``margin`` px around the window, and regions and holes
    that reach the window's edge are left as they are (they go on outside it; a fragment
    across two re-read windows is kept whatever its size)."""
    y0, y1, x0, x1 = window
    h, w = mask.shape
    ya, yb = max(0, y0 - margin), min(h, y1 + margin)
    xa, xb = max(0, x0 - margin), min(w, x1 + margin)
    sub = mask[ya:yb, xa:xb]
    inner = (slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa))
    sub[inner] = close_open(sub)[inner]
    drop_small(sub, pixel_um=pixel_um, min_tissue_um2=min_tissue_um2,
               max_hole_um2=max_hole_um2, keep_edge=True)  # fmt: skip


def edge_runs(edge: np.ndarray, *, block: int = BLOCK, max_px: int = 4096):
    """Rectangles of whole ``block`` x ``block`` cells (coarse px) that hold edge pixels,
    merged along rows into runs of at most ``max_px`` coarse px.

    Yields ``((y0, y1), (x0, x1))`` in coarse pixels.
    """
    h, w = edge.shape
    nby, nbx = math.ceil(h / block), math.ceil(w / block)
    padded = np.zeros((nby * block, nbx * block), bool)
    padded[:h, :w] = edge
    cells = padded.reshape(nby, block, nbx, block).any(axis=(1, 3))
    per_run = max(1, max_px // block)
    for by in range(nby):
        cols = np.flatnonzero(cells[by])
        if len(cols) == 0:
            continue
        starts = np.flatnonzero(np.diff(cols, prepend=-2) != 1)
        for i, s in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(cols)
            for a in range(cols[s], cols[end - 1] + 1, per_run):
                b = min(a + per_run, cols[end - 1] + 1)
                yield (by * block, min((by + 1) * block, h)), (a * block, min(b * block, w))


def read_fine(slide: Slide, grid: MaskGrid, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Fine-mask pixels ``[y:y+h, x:x+w]`` of the slide as RGB, (h, w, 3) uint8.

    Read from the coarsest level at or finer than the fine grid, in strips of at most
    ``MAX_READ_BYTES``, each box-averaged to the fine grid.
    """
    from PIL import Image

    ds = grid.downsample
    level = slide.best_level_at_or_finer(ds)
    lds = float(slide.level_downsamples[level])
    rows = max(1, int(MAX_READ_BYTES // (3 * w * (ds / lds) ** 2)))
    out = np.empty((h, w, 3), np.uint8)
    for r in range(0, h, rows):
        n = min(rows, h - r)
        x0, y0 = round(x * ds), round((y + r) * ds)
        size = (max(1, round((x + w) * ds / lds - x0 / lds)),
                max(1, round((y + r + n) * ds / lds - y0 / lds)))  # fmt: skip
        region = slide.read_region((x0, y0), level, size)
        if size != (w, n):
            region = np.asarray(Image.fromarray(region).resize((w, n), Image.Resampling.BOX))
        out[r : r + n] = region
    return out


def _read_whole(slide: Slide, size: tuple[int, int], downsample: float) -> np.ndarray:
    """The whole slide at ``size`` (about ``downsample`` level-0 px per px): a pyramid level of
    that size (to within a pixel in 500) is read as it is, padded or cut to ``size`` (a resize
    by a pixel would cost as much as the read); otherwise :meth:`Slide.read_downsampled`."""
    level = slide.best_level_at_or_finer(downsample)
    lw, lh = slide.level_dimensions[level]
    w, h = size
    if abs(lw - w) <= max(1, w // 500) and abs(lh - h) <= max(1, h // 500):
        return slide.read_region((0, 0), level, (w, h))
    return slide.read_downsampled(size)
