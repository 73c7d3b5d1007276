"""``wsimil tile``: tissue-mask each slide and grid it into tiles at a target resolution.

Writes, per slide, ``tiles/<slide_id>.zarr`` with

- ``coords`` (N, 2) int32: level-0 (x, y) of each tile's top-left corner,
- ``tissue_fraction`` (N,) float32,
- ``tissue_mask`` (h, w) uint8 at ``mask_downsample`` level-0 px per mask px,

and attributes describing the geometry (slide size, slide mpp, target mpp, tile size at target
mpp and at level 0, read level, thresholds, config hash, reader). A QC image
``tiles/<slide_id>.qc.png`` shows the thumbnail, the mask outline and the kept tiles.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .config import TileConfig
from .layout import RunLayout
from .manifest import MPP_RANGE, mpp_override
from .runner import SlideOutcome, SlideStage, run_slides
from .slide import Slide, SlideError, open_slide
from .store import atomic_output, atomic_store, config_hash, store_attrs, write_array
from .tissue import tissue_mask


@dataclass(frozen=True)
class TileGeometry:
    """How tiles at ``target_mpp`` map onto a slide."""

    slide_mpp: float
    target_mpp: float
    tile_px: int
    tile_px_level0: int
    stride_px_level0: int
    read_level: int
    read_downsample: float
    read_px: int  # tile side in pixels of ``read_level``


def tile_geometry(slide: Slide, cfg: TileConfig) -> TileGeometry:
    """Tile size and pyramid level for ``cfg`` on ``slide``.

    Reads come from the coarsest level at or finer than the target resolution and are resized
    to ``tile_px``.
    """
    if slide.mpp is None:
        raise SlideError(
            f"{slide.path}: the slide has no microns-per-pixel metadata; fill the 'mpp' column "
            "of the manifest for this slide"
        )
    lo, hi = MPP_RANGE
    if not lo <= slide.mpp <= hi:
        raise SlideError(
            f"{slide.path}: the slide's own mpp {slide.mpp:g} is outside the plausible range "
            f"({lo}-{hi} µm per level-0 pixel); give the right value in the manifest's 'mpp' column"
        )
    scale = cfg.target_mpp / slide.mpp  # level-0 px per target px
    tile0 = max(1, round(cfg.tile_px * scale))
    stride0 = max(1, round((cfg.tile_px - cfg.overlap_px) * scale))
    level = slide.best_level_at_or_finer(scale)
    ds = float(slide.level_downsamples[level])
    return TileGeometry(
        slide_mpp=float(slide.mpp),
        target_mpp=cfg.target_mpp,
        tile_px=cfg.tile_px,
        tile_px_level0=tile0,
        stride_px_level0=stride0,
        read_level=level,
        read_downsample=ds,
        read_px=max(1, round(tile0 / ds)),
    )


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
    h, w = mask.shape
    dtype = np.int32 if h * w < 2**31 else np.int64  # exact counts, half the memory of float64
    integral = np.zeros((h + 1, w + 1), dtype)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=dtype), axis=1, dtype=dtype)
    x0 = np.clip(np.round(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + tile_px) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + tile_px) / downsample).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    # The whole tile's area, also where it runs over the image's edge (white padding there).
    full = max(1, round(tile_px / downsample)) ** 2
    area = np.maximum((x1 - x0) * (y1 - y0), full)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (s / area).astype(np.float32)


def slide_tissue_mask(
    slide: Slide, cfg: TileConfig, *, mask_file: str | Path | None = None
) -> tuple[np.ndarray, float]:
    """Tissue mask at about ``cfg.mask_mpp`` from a low-resolution level (never a big level 0).

    A slide whose finest usable level is too big to hold (no pyramid) is read in bounded
    strips, each block-averaged down to the mask grid.

    Parameters
    ----------
    mask_file : path, optional
        A user mask (GeoJSON annotations or mask image, see :mod:`wsimil.annotations`) used
        instead of the computed one.

    Returns
    -------
    mask : ndarray, shape (h, w), bool
    downsample : float
        Level-0 px per mask px.
    rgb : ndarray, shape (h, w, 3), uint8, or None
        The image the mask was computed from (None for a user mask), reused for the QC image.
    """
    assert slide.mpp is not None
    w0, h0 = slide.dimensions
    ds = max(cfg.mask_mpp / slide.mpp, 1.0)
    mw, mh = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    if mask_file is not None:
        from .annotations import load_mask

        return load_mask(mask_file, width_px=w0, height_px=h0, downsample=w0 / mw), w0 / mw, None
    rgb = slide.read_downsampled((mw, mh))
    pixel_um = slide.mpp * (w0 / mw)
    mask = tissue_mask(
        rgb,
        pixel_um=pixel_um,
        min_tissue_um2=cfg.min_tissue_um2,
        max_hole_um2=cfg.max_hole_um2,
        remove_pen=cfg.remove_pen,
        white_level=cfg.white_level,
        black_level=cfg.black_level,
    )
    return mask, w0 / mw, rgb


def tile_settings(cfg: TileConfig, *, mask: str | None = None) -> dict:
    """The settings that shape a tile store (hashed into its attrs)."""
    out = {"stage": "tile", **cfg.model_dump(exclude={"qc_px"})}
    if mask:
        out["mask"] = str(mask)
    return out


def tile_slide(slide: Slide, cfg: TileConfig, *, mask_file: str | Path | None = None) -> dict:
    """Mask and grid one open slide.

    Returns
    -------
    dict with ``coords`` (N, 2) int32, ``tissue_fraction`` (N,) float32, ``mask`` (h, w) bool,
    ``mask_downsample`` float and ``geometry`` (:class:`TileGeometry`).
    """
    geom = tile_geometry(slide, cfg)
    mask, mask_ds, mask_rgb = slide_tissue_mask(slide, cfg, mask_file=mask_file)
    w0, h0 = slide.dimensions
    coords = grid_coords(w0, h0, tile_px=geom.tile_px_level0, stride_px=geom.stride_px_level0,
                         edges=cfg.edge_tiles)  # fmt: skip
    frac = tile_fractions(mask, coords, tile_px=geom.tile_px_level0, downsample=mask_ds)
    keep = frac >= max(cfg.tissue_threshold, 1e-6)
    return {
        "coords": coords[keep],
        "tissue_fraction": frac[keep],
        "mask": mask,
        "mask_downsample": mask_ds,
        "mask_rgb": mask_rgb,
        "geometry": geom,
        "n_candidates": int(len(coords)),
        "slide_px": (w0, h0),
    }


def write_qc_image(slide: Slide, result: dict, path: Path, *, max_px: int) -> None:
    """Thumbnail with the tissue-mask outline (green) and the kept tiles (blue boxes).

    Drawn on the image the mask was computed from (reduced to ``max_px`` when larger), so no
    larger level is decoded for it; a user mask's QC reads a thumbnail of ``max_px``.
    """
    from PIL import Image, ImageDraw

    from .raster import mask_outline

    thumb = result.get("mask_rgb")
    if thumb is None:
        thumb, ds = slide.thumbnail(max_px)
    else:
        if max(thumb.shape[:2]) > max_px:
            s = max_px / max(thumb.shape[:2])
            size = (max(1, round(thumb.shape[1] * s)), max(1, round(thumb.shape[0] * s)))
            thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BOX))
        ds = slide.dimensions[0] / thumb.shape[1]
    img = thumb.copy()
    img[mask_outline(result["mask"], thumb.shape[:2])] = (0, 200, 0)
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    t = result["geometry"].tile_px_level0 / ds
    for x, y in result["coords"]:
        x0, y0 = x / ds, y / ds
        draw.rectangle([x0, y0, x0 + t - 1, y0 + t - 1], outline=(30, 60, 220))
    # A 256-colour palette keeps the QC image about 3x smaller than RGB and is quick to encode.
    im = im.quantize(256, method=Image.Quantize.FASTOCTREE)
    with atomic_output(path) as tmp:
        im.save(tmp, format="PNG", compress_level=1)


class TileStage(SlideStage):
    """``wsimil tile`` for :func:`wsimil.runner.run_slides`: one slide = mask, grid, QC, store."""

    name = "tile"
    columns = {"n_tiles": 0, "tissue_mm2": 0.0}
    changed = "other tile settings"

    def __init__(self, layout: RunLayout, cfg: TileConfig, *, mask: str | None = None):
        super().__init__(layout.tiles)
        self.layout, self.cfg, self.mask = layout, cfg, mask
        self.hash = config_hash(tile_settings(cfg, mask=mask))

    def outputs(self, row):
        sid = row["slide_id"]
        return [self.layout.tile_store(sid), self.layout.tile_qc(sid)]

    def state(self, row):
        attrs = store_attrs(self.layout.tile_store(row["slide_id"]))
        if attrs is None:
            return "missing", {}
        if attrs.get("config_hash") != self.hash:
            return "changed", {}
        return "complete", {"n_tiles": int(attrs.get("n_tiles", 0))}

    def check(self, row) -> None:
        path = row.get("path")
        if path is None or (isinstance(path, float) and path != path):
            raise SlideError(
                f"{row['slide_id']}: empty 'path' in the manifest; give the slide file"
            )
        if not os.path.exists(path):
            raise SlideError(f"{path}: no such file (slide {row['slide_id']}); fix its 'path' cell")
        mpp_override(row)

    def plan(self, row):
        mask_file = None
        if self.mask:
            from .annotations import resolve_mask_path

            mask_file = resolve_mask_path(str(self.mask), row["slide_id"])
        return {"row": row, "mask_file": mask_file, "mpp": mpp_override(row)}

    def run_one(self, job) -> SlideOutcome:
        row, cfg = job["row"], self.cfg
        sid, path = row["slide_id"], row["path"]
        with open_slide(path, mpp=job["mpp"]) as slide:
            result = tile_slide(slide, cfg, mask_file=job["mask_file"])
            write_qc_image(slide, result, self.layout.tile_qc(sid), max_px=cfg.qc_px)
            _write_tile_store(self.layout.tile_store(sid), slide, result, cfg, self.hash, sid)
        n = len(result["coords"])
        px_mm = result["mask_downsample"] * result["geometry"].slide_mpp / 1e3
        values = {"n_tiles": n, "tissue_mm2": round(float(result["mask"].sum()) * px_mm**2, 3)}
        if n == 0:
            small = min(result["slide_px"]) < result["geometry"].tile_px_level0
            why = [*(["slide smaller than one tile"] if small else []),
                   *(["no tissue found"] if result["n_candidates"] else [])]  # fmt: skip
            return SlideOutcome("empty", f"{path}: {'; '.join(why)}; 0 tiles", values)
        return SlideOutcome("ok", "", values)


def run_tile(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: TileConfig,
    *,
    overwrite: bool = False,
    console=None,
    mask: str | None = None,
) -> pd.DataFrame:
    """Tile every slide of ``manifest`` into ``out_dir/tiles`` (see :mod:`wsimil.runner`).

    Slides whose complete store exists with the same settings are skipped; a store made with
    other settings is an error unless ``overwrite``. Several workers can share one cohort.

    Parameters
    ----------
    mask : str, optional
        Folder of per-slide mask files, or a path template with ``{slide_id}`` (see
        :mod:`wsimil.annotations`); these masks replace the computed tissue mask.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, message, seconds, n_tiles, tissue_mm2.
    """
    stage = TileStage(RunLayout(out_dir), cfg, mask=mask)
    return run_slides(stage, manifest, overwrite=overwrite, console=console, settings=cfg)


def _write_tile_store(
    store: Path, slide: Slide, result: dict, cfg: TileConfig, chash: str, slide_id: str
) -> None:
    geom: TileGeometry = result["geometry"]
    info = slide.info()
    with atomic_store(store) as g:
        write_array(g, "coords", result["coords"].astype(np.int32))
        write_array(g, "tissue_fraction", result["tissue_fraction"].astype(np.float32))
        write_array(g, "tissue_mask", result["mask"].astype(np.uint8), chunk_rows=1024)
        g.attrs.update(
            {
                "slide_id": slide_id,
                "slide_path": str(slide.path),
                "width_px": info.width_px,
                "height_px": info.height_px,
                "slide_mpp": geom.slide_mpp,
                "target_mpp": geom.target_mpp,
                "tile_px": geom.tile_px,
                "tile_px_level0": geom.tile_px_level0,
                "stride_px_level0": geom.stride_px_level0,
                "overlap_px": cfg.overlap_px,
                "read_level": geom.read_level,
                "read_downsample": geom.read_downsample,
                "read_px": geom.read_px,
                "tissue_threshold": cfg.tissue_threshold,
                "mask_mpp": cfg.mask_mpp,
                "mask_downsample": float(result["mask_downsample"]),
                "n_tiles": int(len(result["coords"])),
                "config_hash": chash,
                "reader": info.reader,
                "wsimil_version": __version__,
            }
        )
