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
from .grid import grid_coords, tile_fractions, tissue_grid  # noqa: F401 (grid_coords, tile_fractions: wsimil.tile API)
from .layout import RunLayout
from .manifest import MPP_RANGE, mpp_override
from .mask import two_level_mask
from .runner import SlideOutcome, SlideStage, run_slides
from .slide import Slide, SlideError, open_slide
from .store import atomic_output, atomic_store, config_hash, store_attrs, write_array


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


def slide_tissue_mask(
    slide: Slide, cfg: TileConfig, *, mask_file: str | Path | None = None
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Tissue mask at about ``cfg.mask_mpp``: a user mask, or :func:`wsimil.mask.two_level_mask`
    (segmented on a coarse level, edges redrawn at ``cfg.mask_mpp``; never a big level 0).

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
        The coarse image the mask was segmented on (None for a user mask), for the QC image.
    """
    assert slide.mpp is not None
    if mask_file is not None:
        w0, h0 = slide.dimensions
        mw = max(1, math.ceil(w0 / max(cfg.mask_mpp / slide.mpp, 1.0)))
        from .annotations import load_mask

        return load_mask(mask_file, width_px=w0, height_px=h0, downsample=w0 / mw), w0 / mw, None
    return two_level_mask(slide, cfg)


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
    coords, frac, n_candidates = tissue_grid(
        mask, mask_ds, (w0, h0), tile_px=geom.tile_px_level0, stride_px=geom.stride_px_level0,
        threshold=cfg.tissue_threshold, edges=cfg.edge_tiles, gaps=cfg.gap_tiles,
    )  # fmt: skip
    return {
        "coords": coords,
        "tissue_fraction": frac,
        "mask": mask,
        "mask_downsample": mask_ds,
        "mask_rgb": mask_rgb,
        "geometry": geom,
        "n_candidates": int(n_candidates),
        "slide_px": (w0, h0),
    }


def write_qc_image(slide: Slide, result: dict, path: Path, *, max_px: int) -> None:
    """Thumbnail with the tissue-mask outline (green) and the kept tiles (blue boxes).

    Drawn on the largest image the mask read whole (reduced by a whole factor to at most
    ``max_px`` when larger), so
    no larger level is decoded for it, unless that image is under 256 px across (or there is
    none, for a user mask): then on a thumbnail of at most ``max_px`` and no larger than the
    mask.
    """
    from PIL import Image

    from .raster import mask_outline, tile_outlines

    thumb, mask = result.get("mask_rgb"), result["mask"]
    if thumb is None or max(thumb.shape[:2]) < min(256, max_px, max(mask.shape)):
        thumb, ds = slide.thumbnail(min(max_px, max(mask.shape)))
    else:
        if max(thumb.shape[:2]) > max_px:  # by a whole factor: quick, no resampling filter
            f = math.ceil(max(thumb.shape[:2]) / max_px)
            thumb = np.asarray(Image.fromarray(thumb).reduce(f))
        ds = slide.dimensions[0] / thumb.shape[1]
    img = thumb.copy()
    img[mask_outline(mask, thumb.shape[:2])] = (0, 200, 0)
    boxes = tile_outlines(result["coords"], thumb.shape[:2],
                          tile_px_level0=result["geometry"].tile_px_level0, downsample=ds)  # fmt: skip
    img[boxes] = (30, 60, 220)
    im = Image.fromarray(img)
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
        write_array(g, "tissue_mask", result["mask"].view(np.uint8), chunk_rows=1024)  # no copy
        g.update_attributes(
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
