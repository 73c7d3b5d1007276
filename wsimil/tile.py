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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .config import TileConfig, save_config
from .manifest import mpp_override
from .slide import Slide, SlideError, open_slide
from .store import StatusLog, atomic_store, config_hash, store_status, write_array
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


def grid_coords(width_px: int, height_px: int, *, tile_px: int, stride_px: int) -> np.ndarray:
    """Top-left corners of all tiles that lie wholly inside a ``width_px`` x ``height_px`` image.

    Returns
    -------
    ndarray, shape (N, 2), int32
        (x, y) in row-major order (y, then x). Empty when the image is smaller than one tile.
    """
    xs = np.arange(0, width_px - tile_px + 1, stride_px, dtype=np.int64)
    ys = np.arange(0, height_px - tile_px + 1, stride_px, dtype=np.int64)
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
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    x0 = np.clip(np.round(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.round(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.round((coords[:, 0] + tile_px) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.round((coords[:, 1] + tile_px) / downsample).astype(np.int64), 0, h)
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
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
    """
    assert slide.mpp is not None
    w0, h0 = slide.dimensions
    ds = max(cfg.mask_mpp / slide.mpp, 1.0)
    mw, mh = max(1, math.ceil(w0 / ds)), max(1, math.ceil(h0 / ds))
    if mask_file is not None:
        from .annotations import load_mask

        return load_mask(mask_file, width_px=w0, height_px=h0, downsample=w0 / mw), w0 / mw
    rgb = low_res_image(slide, (mw, mh))
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
    return mask, w0 / mw


def low_res_image(
    slide: Slide,
    size: tuple[int, int],
    *,
    max_level_px: int = 64_000_000,
    max_strip_px: int = 16_000_000,
) -> np.ndarray:
    """The whole slide resized to ``size`` = (w, h), read from the best level.

    Reads a whole level when it has at most ``max_level_px`` pixels; otherwise reads the level
    in horizontal strips of at most ``max_strip_px`` pixels and block-averages each strip, so
    memory stays bounded.

    Returns
    -------
    ndarray, shape (h, w, 3), uint8
    """
    mw, mh = size
    w0, h0 = slide.dimensions
    ds = w0 / mw
    level = slide.best_level_at_or_finer(ds)
    lw, lh = slide.level_dimensions[level]
    if lw * lh <= max_level_px:
        rgb = slide.read_level(level)
    else:
        f = max(1, int(ds / slide.level_downsamples[level]))  # level px per block
        rows_per_strip = max(f, (max_strip_px // max(lw, 1)) // f * f)
        bw, bh = lw // f, math.ceil(lh / f)
        rgb = np.empty((bh, max(bw, 1), 3), np.uint8)
        lds = slide.level_downsamples[level]
        for y in range(0, lh, rows_per_strip):
            n = min(rows_per_strip, lh - y)
            strip = slide.read_region((0, round(y * lds)), level, (bw * f, n))
            nb = math.ceil(n / f)
            pad = nb * f - n
            if pad:
                strip = np.concatenate([strip, np.full((pad, strip.shape[1], 3), 255, np.uint8)])
            blocks = strip.reshape(nb, f, bw, f, 3).mean(axis=(1, 3), dtype=np.float32)
            rgb[y // f : y // f + nb] = np.clip(blocks + 0.5, 0, 255).astype(np.uint8)
            del strip, blocks
    if (rgb.shape[1], rgb.shape[0]) != (mw, mh):
        from PIL import Image

        # Area-averaging (box) reduction: antialiased and much faster than a Gaussian prefilter.
        rgb = np.asarray(
            Image.fromarray(np.ascontiguousarray(rgb)).resize((mw, mh), Image.Resampling.BOX)
        )
    return rgb


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
    mask, mask_ds = slide_tissue_mask(slide, cfg, mask_file=mask_file)
    w0, h0 = slide.dimensions
    coords = grid_coords(w0, h0, tile_px=geom.tile_px_level0, stride_px=geom.stride_px_level0)
    frac = tile_fractions(mask, coords, tile_px=geom.tile_px_level0, downsample=mask_ds)
    keep = frac >= max(cfg.tissue_threshold, 1e-6)
    return {
        "coords": coords[keep],
        "tissue_fraction": frac[keep],
        "mask": mask,
        "mask_downsample": mask_ds,
        "geometry": geom,
        "n_candidates": int(len(coords)),
    }


def write_qc_image(slide: Slide, result: dict, path: Path, *, max_px: int) -> None:
    """Thumbnail with the tissue-mask outline (green) and the kept tiles (blue boxes)."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    w0, h0 = slide.dimensions
    scale = min(1.0, max_px / max(w0, h0))
    thumb = low_res_image(slide, (max(1, round(w0 * scale)), max(1, round(h0 * scale))))
    ds = w0 / thumb.shape[1]
    img = thumb.copy()
    m = result["mask"]
    rows = np.minimum(
        (np.arange(thumb.shape[0]) + 0.5) * m.shape[0] / thumb.shape[0], m.shape[0] - 1
    ).astype(int)
    cols = np.minimum(
        (np.arange(thumb.shape[1]) + 0.5) * m.shape[1] / thumb.shape[1], m.shape[1] - 1
    ).astype(int)
    mask = m[rows][:, cols]
    edge = find_boundaries(mask, mode="inner")
    img[edge] = (0, 200, 0)
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    t = result["geometry"].tile_px_level0 / ds
    for x, y in result["coords"]:
        x0, y0 = x / ds, y / ds
        draw.rectangle([x0, y0, x0 + t - 1, y0 + t - 1], outline=(30, 60, 220))
    tmp = path.with_name(path.name + ".tmp.png")
    # A 256-colour palette keeps the QC image about 3x smaller than RGB and is quick to encode.
    im = im.quantize(256, method=Image.Quantize.FASTOCTREE)
    im.save(tmp, format="PNG", compress_level=1)
    tmp.replace(path)


def run_tile(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: TileConfig,
    *,
    overwrite: bool = False,
    console=None,
    mask: str | None = None,
) -> pd.DataFrame:
    """Tile every slide of ``manifest`` into ``out_dir/tiles``.

    Slides whose complete store exists with the same settings are skipped; a store made with
    other settings is an error unless ``overwrite``. A failing slide is logged and the others
    go on. Each slide is locked (``tiles/.locks/<slide_id>.lock``) while it is worked on, so
    several workers can run on one cohort at once: a slide locked elsewhere is skipped.
    Temporary leftovers of killed runs are removed under the lock.

    Parameters
    ----------
    mask : str, optional
        Folder of per-slide mask files, or a path template with ``{slide_id}`` (see
        :mod:`wsimil.annotations`); these masks replace the computed tissue mask.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, n_tiles, tissue_mm2, seconds, message.
    """
    from .locks import slide_lock
    from .progress import progress_bar

    missing = [c for c in ("slide_id", "path") if c not in manifest.columns]
    if missing:
        raise ValueError(
            f"manifest lacks column(s) {', '.join(missing)}; it needs slide_id and path"
        )
    dups = manifest["slide_id"][manifest["slide_id"].duplicated()].astype(str).unique().tolist()
    if dups:
        raise ValueError(
            f"manifest has duplicate slide_id(s) {', '.join(dups[:5])}; slide_id must be unique"
        )
    tiles_dir = Path(out_dir) / "tiles"
    tiles_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, tiles_dir / "config.yaml")
    log = StatusLog(tiles_dir / "status.jsonl")
    chash = config_hash(tile_settings(cfg, mask=mask))
    rows = []
    with progress_bar(console, "tile", len(manifest)) as advance:
        for rec in manifest.itertuples(index=False):
            sid = str(rec.slide_id)
            t0 = time.perf_counter()
            row = {"slide_id": sid, "status": "", "n_tiles": 0, "tissue_mm2": 0.0, "message": ""}
            logged = True
            with slide_lock(tiles_dir, sid) as mine:
                if mine:
                    logged = _tile_one(
                        rec, sid, tiles_dir, cfg, chash, row, overwrite=overwrite, mask=mask
                    )
                else:
                    row.update(status="skipped", message="in progress elsewhere")
            row["seconds"] = round(time.perf_counter() - t0, 3)
            if logged:
                log.write(
                    sid, row["status"], row["message"], row["seconds"], n_tiles=row["n_tiles"]
                )
            if row["status"] == "error" and console is not None:
                console.print(f"[red]error[/red] {row['message']}")
            rows.append(row)
            advance()
    return pd.DataFrame(
        rows, columns=["slide_id", "status", "n_tiles", "tissue_mm2", "message", "seconds"]
    )


def _tile_one(
    rec,
    sid: str,
    tiles_dir: Path,
    cfg: TileConfig,
    chash: str,
    row: dict,
    *,
    overwrite: bool,
    mask: str | None,
) -> bool:
    """Tile one slide while holding its lock; fills ``row``. Returns whether to log the attempt."""
    from .locks import remove_slide_temps

    store = tiles_dir / f"{sid}.zarr"
    remove_slide_temps(tiles_dir, store.name)
    remove_slide_temps(tiles_dir, f"{sid}.qc.png")
    state = store_status(store, chash)
    if state == "complete" and not overwrite:
        row.update(status="skipped", message="complete store exists")
        return False
    if state == "changed" and not overwrite:
        row.update(
            status="error",
            message=f"{store}: made with other tile settings; pass --overwrite to redo it or use another output folder",
        )
        return True
    path = getattr(rec, "path", None)
    try:
        mask_file = None
        if mask:
            from .annotations import resolve_mask_path

            mask_file = resolve_mask_path(str(mask), sid)
        mpp = mpp_override(rec)
        if mpp is not None and not mpp > 0:
            raise SlideError(
                f"{path}: mpp {mpp} in the manifest is not positive; fix the 'mpp' column"
            )
        with open_slide(path, mpp=mpp) as slide:
            result = tile_slide(slide, cfg, mask_file=mask_file)
            write_qc_image(slide, result, tiles_dir / f"{sid}.qc.png", max_px=cfg.qc_px)
            _write_tile_store(store, slide, result, cfg, chash, sid)
        n = len(result["coords"])
        area = (
            float(result["mask"].sum())
            * (result["mask_downsample"] * result["geometry"].slide_mpp) ** 2
            / 1e6
        )
        if n == 0:
            why = (
                "slide smaller than one tile" if result["n_candidates"] == 0 else "no tissue found"
            )
            row.update(status="empty", message=f"{path}: {why}; 0 tiles")
        else:
            row.update(status="ok")
        row.update(n_tiles=n, tissue_mm2=round(area, 3))
    except (SlideError, ValueError) as exc:
        row.update(
            status="error",
            message=str(exc).splitlines()[0] if str(exc) else f"{path}: {type(exc).__name__}",
        )
    except Exception as exc:  # one bad slide must not stop the cohort
        row.update(status="error", message=f"{path}: {type(exc).__name__}: {exc}".splitlines()[0])
    return True


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
