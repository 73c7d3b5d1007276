"""``wsimil demo``: the main job on a generated sample cohort.

Generates synthetic slides (lesions in positive slides), runs tile, embed, train and heatmap,
then reports the held-out slide AUC and how well attention finds the ground-truth lesions.
The settings are :func:`demo_config` (mirrored in ``configs/demo.yaml``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config
from .layout import RunLayout

DEMO_N_SLIDES = 24
DEMO_SIZE_PX = 10_000


def demo_config(*, encoder: str | None = None, seed: int = 0) -> Config:
    """The demo's settings: 10x tiles (1 µm/px) of 224 px, EfficientNet-Lite0 ImageNet features."""
    return Config.model_validate(
        {
            "tile": {"target_mpp": 1.0, "tile_px": 224, "tissue_threshold": 0.5},
            "embed": {
                "encoder": encoder or "efficientnet_lite0",
                "batch_size": 64,
                "num_workers": 1,
            },
            "train": {
                "name": "gated_attention",
                "model": "gated_attention",
                "epochs": 60,
                "patience": 15,
                "lr": 2e-4,
                "test_fraction": 0.3,
                "val_fraction": 0.2,
                "seed": seed,
            },
            "heatmap": {"thumbnail_px": 1024},
        }
    )


def lesion_tile_labels(
    coords: np.ndarray,
    *,
    tile_px_level0: int,
    mask: np.ndarray,
    mask_downsample: float,
    min_fraction: float = 0.5,
) -> np.ndarray:
    """1 for tiles whose area is at least ``min_fraction`` lesion, shape (N,) int."""
    from .tile import tile_fractions

    frac = tile_fractions(mask, coords, tile_px=tile_px_level0, downsample=mask_downsample)
    return (frac >= min_fraction).astype(int)


def localisation(
    run_dir: Path, manifest: pd.DataFrame, model_name: str, slide_ids: list[str]
) -> dict:
    """Attention against ground-truth lesion tiles on the given (positive) slides.

    Returns
    -------
    dict: ``auc_mean`` (mean per-slide ROC AUC), ``auc_pooled`` (over all tiles, attention
    rescaled per slide), ``top10_on_lesion`` (fraction of each slide's 10 highest-attention tiles
    on lesions, averaged), ``n_slides``.
    """
    from sklearn.metrics import roc_auc_score

    from .store import open_store
    from .synth import load_lesion_mask

    layout = RunLayout(run_dir)
    aucs, tops, pooled_y, pooled_s = [], [], [], []
    rows = manifest.set_index("slide_id")
    for sid in slide_ids:
        table_path = layout.heatmap_slide(model_name, sid).table
        if not table_path.exists():
            continue
        table = pd.read_csv(table_path)
        tattrs = dict(open_store(layout.tile_store(sid)).attrs)
        mask, ds = load_lesion_mask(rows.loc[sid, "lesion_mask"], slide_width_px=tattrs["width_px"])
        y = lesion_tile_labels(
            table[["x", "y"]].to_numpy(),
            tile_px_level0=tattrs["tile_px_level0"],
            mask=mask,
            mask_downsample=ds,
        )
        s = table["attention_scaled"].to_numpy()
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc_score(y, s))
            pooled_y.append(y)
            pooled_s.append(s)
        top = np.argsort(-table["attention"].to_numpy())[:10]
        tops.append(float(y[top].mean()))
    pooled = (
        roc_auc_score(np.concatenate(pooled_y), np.concatenate(pooled_s))
        if pooled_y
        else float("nan")
    )
    return {
        "auc_mean": float(np.mean(aucs)) if aucs else float("nan"),
        "auc_pooled": float(pooled),
        "top10_on_lesion": float(np.mean(tops)) if tops else float("nan"),
        "n_slides": len(aucs),
    }


def _timed(times: dict, name: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    times[name] = time.perf_counter() - t0
    return out


def _make_cohort(out_dir: Path, n: int, size: int, seed: int, console) -> Path:
    from .progress import progress_bar
    from .synth import make_cohort

    with progress_bar(console, "synth", n) as advance:
        return make_cohort(
            out_dir, n_slides=n, width_px=size, height_px=size, mpp=0.5, seed=seed,
            progress=lambda i, k, sid: advance(),
        )  # fmt: skip


def _print_results(say, out_dir: Path, cfg: Config, tiles, res, loc_test, loc_all, times, total):
    layout = RunLayout(out_dir)
    say("")
    say("[bold]wsimil demo results[/bold]")
    say(
        f"  tiles: {int(tiles.n_tiles.sum()):,} over {len(tiles)} slides; "
        f"features in {layout.features(cfg.embed.encoder).path}"
    )
    say(
        f"  held-out slides: {res['n']}  slide AUC {res['auc']:.3f}  accuracy {res['accuracy']:.3f}  F1 {res['f1']:.3f}"
    )
    say(
        f"  lesion localisation (attention vs ground-truth lesion tiles), held-out positive slides ({loc_test['n_slides']}): "
        f"AUC {loc_test['auc_mean']:.3f} (pooled {loc_test['auc_pooled']:.3f}), top-10 tiles on lesion {loc_test['top10_on_lesion']:.2f}"
    )
    say(
        f"  all positive slides ({loc_all['n_slides']}): AUC {loc_all['auc_mean']:.3f}, top-10 on lesion {loc_all['top10_on_lesion']:.2f}"
    )
    say(
        "  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + f", total {total:.0f}"
    )
    say(f"  model: {res['model_dir']}")
    say(f"  heatmaps: {layout.heatmaps(cfg.train.name).path}/slides/<slide_id>/<slide_id>.png")
    say(f"  review page: {layout.review_index(cfg.train.name)}")


def run_demo(
    out_dir: str | Path,
    *,
    n_slides: int | None = None,
    size_px: int | None = None,
    encoder: str | None = None,
    seed: int = 0,
    console=None,
) -> dict:
    """Generate the sample cohort in ``out_dir`` and run every stage; print and return the results."""
    from .config import save_config
    from .embed import run_embed
    from .heatmap import run_heatmap
    from .manifest import read_manifest
    from .tile import run_tile
    from .train import run_train

    say = console.print if console is not None else print
    out_dir = Path(out_dir)
    layout = RunLayout(out_dir)
    cfg = demo_config(encoder=encoder, seed=seed)
    n, size = n_slides or DEMO_N_SLIDES, size_px or DEMO_SIZE_PX
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    say(f"[bold]1/5 synth[/bold]: {n} slides of {size:,} x {size:,} px at 0.5 µm/px into {out_dir}")
    manifest_path = _timed(times, "synth", _make_cohort, out_dir, n, size, seed, console)
    save_config(cfg, layout.demo_config)
    manifest = read_manifest(manifest_path, require_label=True)
    say("[bold]2/5 tile[/bold]")
    tiles = _timed(times, "tile", run_tile, manifest, out_dir, cfg.tile, console=console)
    say(f"[bold]3/5 embed[/bold] with {cfg.embed.encoder}")
    feats = _timed(times, "embed", run_embed, manifest, out_dir, cfg.embed, console=console)
    say(f"[bold]4/5 train[/bold] {cfg.train.model}")
    res = _timed(
        times, "train", run_train, manifest, out_dir, cfg.train, encoder=cfg.embed.encoder,
        console=console,
    )  # fmt: skip
    say("[bold]5/5 heatmap[/bold]")
    hm = _timed(
        times, "heatmap", run_heatmap, manifest, out_dir, cfg.heatmap,
        model_name=cfg.train.name, console=console,
    )  # fmt: skip

    pred = pd.read_csv(Path(res["model_dir"]) / "predictions.csv")
    test_pos = pred[(pred.split == "test") & (pred.label == 1)].slide_id.tolist()
    loc_test = localisation(out_dir, manifest, cfg.train.name, test_pos)
    loc_all = localisation(
        out_dir, manifest, cfg.train.name, pred[pred.label == 1].slide_id.tolist()
    )
    total = time.perf_counter() - t_all
    failed = sum(int((df.status == "error").sum()) for df in (tiles, feats, hm))
    _print_results(say, out_dir, cfg, tiles, res, loc_test, loc_all, times, total)
    if failed:
        say(f"[red]{failed} slide-stage(s) failed; see the status.jsonl files[/red]")
    result = {
        "slide_auc": res["auc"],
        "localisation": loc_test,
        "localisation_all": loc_all,
        "seconds": times,
        "total_seconds": total,
        "failed": failed,
    }
    layout.demo_results.write_text(json.dumps(result, indent=2, default=float))
    return result
