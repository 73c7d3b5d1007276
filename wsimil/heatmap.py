"""``wsimil heatmap``: slide predictions and attention heatmaps as overlays for review.

For each slide with features, runs the trained model and writes to ``heatmaps/<model>/``:

- ``<slide_id>.png``: the per-slide min-max rescaled attention ``(a - min a) / (max a - min a)``
  painted on the tile grid over a thumbnail (colormap, alpha blend, colour bar);
- ``<slide_id>.csv``: per tile x, y (level 0), raw attention, rescaled attention, percentile
  rank, and the instance score for instance-level models;
- ``predictions.csv``: slide_id, probability, prediction, label.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .config import HeatmapConfig, save_config
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
    values: np.ndarray, coords: np.ndarray, *, tile_px_level0: int, downsample: float, shape: tuple[int, int]
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


def render_overlay(thumb: np.ndarray, heat: np.ndarray, covered: np.ndarray, *, cmap: str, alpha: float, title: str = "") -> np.ndarray:
    """Blend ``heat`` (values in [0, 1]) over ``thumb`` and add a colour bar on the right.

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


def run_heatmap(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: HeatmapConfig,
    *,
    model_name: str,
    console=None,
) -> pd.DataFrame:
    """Write overlays and per-tile scores for every slide with features.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, probability, prediction, label, seconds, message.
    """
    from .embed import encoder_dir_name
    from .progress import progress_bar
    from .train import load_checkpoint

    out_dir = Path(out_dir)
    model_dir = out_dir / "models" / model_name
    model, std, meta = load_checkpoint(model_dir / "checkpoint.pt")
    encoder = meta["encoder"]
    feat_dir = out_dir / "features" / encoder_dir_name(encoder)
    hm_dir = out_dir / "heatmaps" / model_name
    hm_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, hm_dir / "config.yaml")
    log = StatusLog(hm_dir / "status.jsonl")
    label_col = meta["config"].get("label_column", "label")
    rows = []
    with progress_bar(console, "heatmap", len(manifest)) as advance:
        for rec in manifest.itertuples(index=False):
            t0 = time.perf_counter()
            sid = rec.slide_id
            label = getattr(rec, label_col, None)
            row = {"slide_id": sid, "status": "", "probability": np.nan, "prediction": -1, "label": label, "message": ""}
            try:
                store = feat_dir / f"{sid}.zarr"
                if not store.exists():
                    raise SlideError(f"{sid}: no features at {store}; run `wsimil embed --encoder {encoder}` first")
                g = open_store(store)
                attrs = dict(g.attrs)
                if attrs["encoder"]["name"] != encoder:
                    raise SlideError(f"{sid}: features from encoder {attrs['encoder']['name']!r} but the model was trained on {encoder!r}")
                feats = np.asarray(g["features"][...], dtype=np.float32)
                if len(feats) == 0:
                    row.update(status="empty", message=f"{sid}: 0 tiles, no heatmap")
                else:
                    if feats.shape[1] != meta["in_dim"]:
                        raise SlideError(f"{sid}: feature dim {feats.shape[1]} does not match the model's {meta['in_dim']}")
                    coords = np.asarray(g["coords"][...])
                    prob, per_tile = slide_scores(model, std, feats)
                    tiles = attrs["tiles"]
                    table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], **per_tile})
                    table.to_csv(hm_dir / f"{sid}.csv", index=False)
                    mpp = getattr(rec, "mpp", None)
                    with open_slide(rec.path, mpp=None if mpp is None or pd.isna(mpp) else float(mpp)) as slide:
                        if slide.dimensions != (tiles["width_px"], tiles["height_px"]):
                            raise SlideError(f"{rec.path}: slide is {slide.dimensions} px but was tiled at {(tiles['width_px'], tiles['height_px'])}; re-run tile and embed")
                        thumb, ds = slide.thumbnail(cfg.thumbnail_px)
                    heat, covered = paint_tiles(per_tile["attention_scaled"], coords, tile_px_level0=int(tiles["tile_px_level0"]), downsample=ds, shape=thumb.shape[:2])
                    title = f"{sid}  p={prob:.3f}" + (f"  label={label}" if label is not None else "")
                    img = render_overlay(thumb, heat, covered, cmap=cfg.cmap, alpha=cfg.alpha, title=title)
                    from PIL import Image

                    tmp = hm_dir / f".{sid}.png.tmp.png"
                    Image.fromarray(img).save(tmp)
                    tmp.replace(hm_dir / f"{sid}.png")
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
    df[df.status == "ok"][["slide_id", "probability", "prediction", "label"]].to_csv(hm_dir / "predictions.csv", index=False)
    return df
