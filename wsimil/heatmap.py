"""``wsimil heatmap``: slide predictions and attention heatmaps for pathologist review.

For each slide with features, runs the trained model and writes to ``heatmaps/<model>/``:

- ``<slide_id>.csv``: per tile x, y (level 0), raw attention, per-slide min-max rescaled
  attention ``(a - min a) / (max a - min a)``, percentile rank, and the instance score for
  instance-level models;
- ``<slide_id>.png``: the rescaled attention painted on the tile grid (overlapping tiles
  averaged per pixel, optional Gaussian smoothing) over a thumbnail, with the tissue outline
  and a colour bar; ``<slide_id>.thumb.jpg`` the plain thumbnail;
- ``<slide_id>.geojson`` (QuPath tile objects with measurements), ``<slide_id>.heatmap.tiff``
  (pyramidal heatmap with the slide's geometry and mpp) and ``<slide_id>_top/`` (crops of the
  highest-attention tiles): see :mod:`wsimil.export`;
- ``predictions.csv`` (slide_id, probability, prediction, label), ``status.jsonl`` and the
  static review page ``index.html`` + ``<slide_id>.html`` (:mod:`wsimil.review`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .config import HeatmapConfig, save_config
from .manifest import mpp_override
from .slide import SlideError, open_slide
from .store import StatusLog, open_store


def minmax(values: np.ndarray) -> np.ndarray:
    """``(v - min v) / (max v - min v)``; all zeros when the values are constant."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values.astype(np.float32)
    lo, hi = values.min(), values.max()
    if hi - lo <= 0:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value as a fraction in [0, 1] (1 = highest)."""
    n = len(values)
    if n <= 1:
        return np.ones(n, np.float32)
    order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return (order / (n - 1)).astype(np.float32)


def paint_tiles(
    values: np.ndarray,
    coords: np.ndarray,
    *,
    tile_px_level0: int,
    downsample: float,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Average tile values per pixel of an image at ``downsample`` level-0 px per pixel.

    Parameters
    ----------
    values : ndarray, shape (N,)
    coords : ndarray, shape (N, 2)
        Level-0 (x, y) of each tile's top-left corner.
    shape : (h, w)
        Output image shape.

    Returns
    -------
    mean : ndarray, shape (h, w), float32
        Mean of the values of the tiles covering each pixel (0 where none).
    covered : ndarray, shape (h, w), bool
    """
    h, w = shape
    acc = np.zeros((h + 1, w + 1), np.float64)
    cnt = np.zeros((h + 1, w + 1), np.float64)
    x0 = np.clip(np.floor(coords[:, 0] / downsample).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / downsample).astype(np.int64), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + tile_px_level0) / downsample).astype(np.int64), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + tile_px_level0) / downsample).astype(np.int64), 0, h)
    # 2-D difference arrays: +v at (y0, x0), -v at (y0, x1) and (y1, x0), +v at (y1, x1).
    for arr, v in ((acc, values.astype(np.float64)), (cnt, np.ones(len(values)))):
        np.add.at(arr, (y0, x0), v)
        np.add.at(arr, (y0, x1), -v)
        np.add.at(arr, (y1, x0), -v)
        np.add.at(arr, (y1, x1), v)
    acc = acc.cumsum(0).cumsum(1)[:h, :w]
    cnt = np.rint(cnt.cumsum(0).cumsum(1)[:h, :w])
    covered = cnt > 0
    mean = np.zeros((h, w), np.float32)
    mean[covered] = acc[covered] / cnt[covered]
    return mean, covered


def smooth_heat(heat: np.ndarray, covered: np.ndarray, *, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing of ``heat`` normalised by the smoothed coverage (no bleed into background).

    Parameters
    ----------
    heat, covered : ndarray, shape (h, w)
    sigma_px : float
        Gaussian sigma in pixels of ``heat``; 0 returns ``heat`` unchanged.

    Returns
    -------
    ndarray, shape (h, w), float32; values only meaningful where ``covered``.
    """
    if sigma_px <= 0:
        return heat
    from scipy.ndimage import gaussian_filter

    c = covered.astype(np.float32)
    num = gaussian_filter(heat.astype(np.float32) * c, sigma_px, mode="constant")
    den = gaussian_filter(c, sigma_px, mode="constant")
    out = np.zeros_like(heat, dtype=np.float32)
    ok = den > 1e-6
    out[ok] = num[ok] / den[ok]
    return out


def tissue_outline(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boundary pixels of a tissue mask resized (nearest) to ``shape`` = (h, w), bool."""
    from scipy.ndimage import binary_erosion

    h, w = shape
    yi = np.minimum((np.arange(h) * mask.shape[0]) // h, mask.shape[0] - 1)
    xi = np.minimum((np.arange(w) * mask.shape[1]) // w, mask.shape[1] - 1)
    m = mask[yi][:, xi] > 0
    return m & ~binary_erosion(m, iterations=1, border_value=0)


def _save_png(img: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 image as PNG under a temporary name, then rename it into place."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(img).save(tmp)
    tmp.replace(path)


def render_overlay(
    thumb: np.ndarray,
    heat: np.ndarray,
    covered: np.ndarray,
    *,
    cmap: str,
    alpha: float,
    title: str = "",
    outline: np.ndarray | None = None,
) -> np.ndarray:
    """Blend ``heat`` (values in [0, 1]) over ``thumb`` and add a colour bar on the right.

    ``outline`` (h, w) bool marks tissue-boundary pixels, drawn in dark blue-grey on top.

    Returns
    -------
    ndarray, shape (h, w + bar, 3), uint8
    """
    import matplotlib

    lut = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    colour = lut[np.clip((heat * 255).round().astype(np.int64), 0, 255)]
    out = thumb.astype(np.float32)
    # Opacity grows with the value, so low-attention tissue stays readable underneath.
    a = (alpha * (0.25 + 0.75 * np.clip(heat, 0, 1)))[covered][:, None]
    out[covered] = (1 - a) * out[covered] + a * colour[covered]
    img = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if outline is not None:
        img[outline] = (40, 40, 90)
    return _add_colour_bar(img, lut, title=title)


def _add_colour_bar(img: np.ndarray, lut: np.ndarray, *, title: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = img.shape[:2]
    bar_w, pad = 90, 12
    canvas = np.full((h, w + bar_w, 3), 255, np.uint8)
    canvas[:, :w] = img
    top = min(40, h // 5)
    bottom = max(top + 1, h - top)
    ramp = lut[np.linspace(255, 0, bottom - top).astype(int)].astype(np.uint8)
    canvas[top:bottom, w + pad : w + pad + 20] = ramp[:, None, :]
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    d.text((w + pad, top - 14), "1.0 high", fill=(0, 0, 0))
    d.text((w + pad, bottom + 2), "0.0 low", fill=(0, 0, 0))
    d.text((w + pad, 4), "attention", fill=(0, 0, 0))
    if title:
        d.text((6, 4), title, fill=(0, 0, 0))
    return np.asarray(im)


def slide_scores(model, std, features: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Slide probability and per-tile scores.

    Returns
    -------
    probability : float
    per_tile : dict of (N,) arrays: ``attention`` (raw weight; for instance models the instance
        score), ``attention_scaled`` (min-max per slide), ``rank``, and ``instance_score``
        (NaN for attention models).
    """
    import torch

    with torch.inference_mode():
        out = model(std(features).unsqueeze(0))
    prob = float(torch.sigmoid(out.logits)[0])
    if out.attention is not None:
        att = out.attention[0].float().numpy()
        inst = np.full(len(att), np.nan, np.float32)
    else:
        inst = out.instance_scores[0].float().numpy()
        att = inst
    return prob, {
        "attention": att.astype(np.float32),
        "attention_scaled": minmax(att),
        "rank": percentile_rank(att),
        "instance_score": inst.astype(np.float32),
    }


def bounded_thumbnail(
    slide, max_px: int, *, band_bytes: int = 64 * 2**20
) -> tuple[np.ndarray, float]:
    """A thumbnail whose long side is ``max_px`` (or less), read in bands of one pyramid level.

    Memory stays near ``band_bytes`` + the output whatever the level's size: each band is
    box-reduced by an integer factor (no seams), and only the reduced image is resized.

    Returns
    -------
    image : ndarray, shape (h, w, 3), uint8
    downsample : float
        Level-0 pixels per thumbnail pixel.
    """
    from PIL import Image

    level = slide.best_level_for_thumbnail(max_px)
    lw, lh = slide.level_dimensions[level]
    lds = float(slide.level_downsamples[level])
    f = max(1, int(max(lw, lh) // max_px))
    rows = max(f, (band_bytes // (3 * lw)) // f * f)
    parts = []
    for y in range(0, lh, rows):
        n = min(rows, lh - y)
        band = slide.read_region((0, int(round(y * lds))), level, (lw, n))
        parts.append(np.asarray(Image.fromarray(band).reduce(f)) if f > 1 else band)
    img = np.concatenate(parts, axis=0)
    w0, h0 = slide.dimensions
    scale = max_px / max(w0, h0)
    if scale < 1:
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        if (tw, th) != (img.shape[1], img.shape[0]):
            img = np.asarray(Image.fromarray(img).resize((tw, th), Image.Resampling.LANCZOS))
    return img, w0 / img.shape[1]


def export_slide(
    slide,
    table: pd.DataFrame,
    *,
    slide_id: str,
    tile_px_level0: int,
    out_dir: str | Path,
    cfg: HeatmapConfig,
    title: str = "",
    tissue: tuple[np.ndarray, float] | None = None,
) -> dict:
    """Write every per-slide output except the score table.

    Parameters
    ----------
    slide : wsimil.slide.Slide
        The open slide (thumbnail, crops, geometry).
    table : DataFrame, N rows
        ``x``, ``y`` and the per-tile scores of :func:`slide_scores`.
    tissue : (mask, mask_downsample), optional
        Tissue mask from the tile store, for the outline.

    Returns
    -------
    dict: ``overlay``, ``thumbnail``, ``geojson``, ``tiff`` (file names or None), ``top`` (list of
    crop records, see :func:`wsimil.export.write_top_crops`), ``seconds`` per output.
    """
    from PIL import Image

    from .export import write_geojson, write_heatmap_tiff, write_top_crops

    out_dir = Path(out_dir)
    secs: dict[str, float] = {}
    res: dict = {
        "overlay": f"{slide_id}.png",
        "thumbnail": f"{slide_id}.thumb.jpg",
        "geojson": None,
        "tiff": None,
        "top": [],
    }
    coords = table[["x", "y"]].to_numpy(np.int64)
    scaled = table["attention_scaled"].to_numpy(np.float64)

    t0 = time.perf_counter()
    thumb, ds = bounded_thumbnail(slide, cfg.thumbnail_px)
    heat, covered = paint_tiles(
        scaled, coords, tile_px_level0=tile_px_level0, downsample=ds, shape=thumb.shape[:2]
    )
    heat = smooth_heat(heat, covered, sigma_px=cfg.smooth_tiles * tile_px_level0 / ds)
    outline = (
        tissue_outline(tissue[0], thumb.shape[:2])
        if (tissue is not None and cfg.tissue_outline)
        else None
    )
    img = render_overlay(
        thumb, heat, covered, cmap=cfg.cmap, alpha=cfg.alpha, title=title, outline=outline
    )
    _save_png(img, out_dir / res["overlay"])
    tmp = out_dir / f".{slide_id}.thumb.tmp.jpg"
    Image.fromarray(thumb).save(tmp, quality=85)
    tmp.replace(out_dir / res["thumbnail"])
    secs["overlay"] = time.perf_counter() - t0

    if cfg.geojson:
        t0 = time.perf_counter()
        res["geojson"] = f"{slide_id}.geojson"
        write_geojson(
            out_dir / res["geojson"], table, tile_px_level0=tile_px_level0, slide_id=slide_id
        )
        secs["geojson"] = time.perf_counter() - t0
    if cfg.pyramid_tiff:
        t0 = time.perf_counter()
        res["tiff"] = f"{slide_id}.heatmap.tiff"
        w, h = slide.dimensions
        write_heatmap_tiff(
            out_dir / res["tiff"],
            scaled,
            coords,
            tile_px_level0=tile_px_level0,
            width_px=w,
            height_px=h,
            mpp=slide.mpp,
            cmap=cfg.cmap,
        )
        secs["tiff"] = time.perf_counter() - t0
    if cfg.top_k > 0:
        t0 = time.perf_counter()
        res["top"] = write_top_crops(
            slide,
            table,
            out_dir / f"{slide_id}_top",
            k=cfg.top_k,
            tile_px_level0=tile_px_level0,
            crop_px=cfg.crop_px,
        )
        secs["top"] = time.perf_counter() - t0
    res["seconds"] = secs
    return res


def _tissue_of(tile_store: Path) -> tuple[np.ndarray, float] | None:
    """The tile store's tissue mask and its downsample, or None when absent."""
    if not tile_store.exists():
        return None
    try:
        g = open_store(tile_store)
        return np.asarray(g["tissue_mask"][...]), float(
            dict(g.attrs).get("mask_downsample", 0) or 0
        )
    except (KeyError, OSError, ValueError):
        return None


def run_heatmap(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: HeatmapConfig,
    *,
    model_name: str,
    console=None,
) -> pd.DataFrame:
    """Write scores, overlays, review-tool exports and the review page for every slide.

    A slide that fails (no features, other encoder, slide moved or changed since tiling) gets
    one error line in ``status.jsonl`` and on the console; the other slides go on.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, probability, prediction, label, seconds, message.

    Raises
    ------
    FileNotFoundError
        No checkpoint for ``model_name``.
    """
    from .embed import encoder_dir_name
    from .progress import progress_bar
    from .review import write_review_pages
    from .train import load_checkpoint

    out_dir = Path(out_dir)
    model_dir = out_dir / "models" / model_name
    ckpt = model_dir / "checkpoint.pt"
    if not ckpt.exists():
        raise FileNotFoundError(
            f"{ckpt}: no trained model {model_name!r}; run `wsimil train` first or pass --model"
        )
    model, std, meta = load_checkpoint(ckpt)
    encoder = meta["encoder"]
    feat_dir = out_dir / "features" / encoder_dir_name(encoder)
    hm_dir = out_dir / "heatmaps" / model_name
    hm_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, hm_dir / "config.yaml")
    log = StatusLog(hm_dir / "status.jsonl")
    label_col = meta["config"].get("label_column", "label")
    rows, pages = [], {}
    with progress_bar(console, "heatmap", len(manifest)) as advance:
        for rec in manifest.itertuples(index=False):
            t0 = time.perf_counter()
            sid = rec.slide_id
            label = getattr(rec, label_col, None)
            if label is not None and pd.isna(label):
                label = None
            row = {
                "slide_id": sid,
                "status": "",
                "probability": np.nan,
                "prediction": -1,
                "label": label,
                "message": "",
            }
            try:
                store = feat_dir / f"{sid}.zarr"
                if not store.exists():
                    raise SlideError(
                        f"{sid}: no features at {store}; run `wsimil embed --encoder {encoder}` first"
                    )
                g = open_store(store)
                attrs = dict(g.attrs)
                if attrs["encoder"]["name"] != encoder:
                    raise SlideError(
                        f"{sid}: features from encoder {attrs['encoder']['name']!r} but the model was trained on {encoder!r}; re-embed with --encoder {encoder}"
                    )
                feats = np.asarray(g["features"][...], dtype=np.float32)
                if len(feats) == 0:
                    # Still show the reviewer the slide, marked as having no tissue tiles.
                    with open_slide(rec.path, mpp=mpp_override(rec)) as slide:
                        thumb, _ = bounded_thumbnail(slide, cfg.thumbnail_px)
                    empty = np.zeros(thumb.shape[:2], np.float32)
                    img = render_overlay(
                        thumb,
                        empty,
                        empty > 0,
                        cmap=cfg.cmap,
                        alpha=cfg.alpha,
                        title=f"{sid}  no tissue tiles",
                    )
                    _save_png(img, hm_dir / f"{sid}.png")
                    row.update(status="empty", message=f"{sid}: 0 tiles, thumbnail only")
                else:
                    if feats.shape[1] != meta["in_dim"]:
                        raise SlideError(
                            f"{sid}: feature dim {feats.shape[1]} does not match the model's {meta['in_dim']}; re-embed with --encoder {encoder}"
                        )
                    coords = np.asarray(g["coords"][...])
                    prob, per_tile = slide_scores(model, std, feats)
                    tiles = attrs["tiles"]
                    table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], **per_tile})
                    tmp = hm_dir / f".{sid}.csv.tmp"
                    table.to_csv(tmp, index=False)
                    tmp.replace(hm_dir / f"{sid}.csv")
                    with open_slide(rec.path, mpp=mpp_override(rec)) as slide:
                        if slide.dimensions != (tiles["width_px"], tiles["height_px"]):
                            raise SlideError(
                                f"{rec.path}: slide is {slide.dimensions} px but was tiled at {(tiles['width_px'], tiles['height_px'])}; re-run tile and embed"
                            )
                        title = f"{sid}  p={prob:.3f}" + (
                            f"  label={label}" if label is not None else ""
                        )
                        tissue = _tissue_of(out_dir / "tiles" / f"{sid}.zarr")
                        pages[sid] = export_slide(
                            slide,
                            table,
                            slide_id=sid,
                            tile_px_level0=int(tiles["tile_px_level0"]),
                            out_dir=hm_dir,
                            cfg=cfg,
                            title=title,
                            tissue=tissue,
                        )
                    pages[sid]["n_tiles"] = len(table)
                    row.update(status="ok", probability=prob, prediction=int(prob >= 0.5))
            except (SlideError, OSError, KeyError) as exc:
                row.update(status="error", message=str(exc))
            except Exception as exc:
                row.update(status="error", message=f"{sid}: {type(exc).__name__}: {exc}")
            row["seconds"] = round(time.perf_counter() - t0, 3)
            log.write(sid, row["status"], row["message"], row["seconds"])
            if row["status"] == "error" and console is not None:
                console.print(f"[red]error[/red] {row['message']}")
            rows.append(row)
            advance()
    df = pd.DataFrame(rows)
    df[df.status == "ok"][["slide_id", "probability", "prediction", "label"]].to_csv(
        hm_dir / "predictions.csv", index=False
    )
    if cfg.review_page:
        write_review_pages(hm_dir, df, pages, model_name=model_name)
    return df
