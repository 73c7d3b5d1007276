"""``wsimil demo``: the whole path on generated sample cohorts, from slides to a deployed model.

Generates a labelled synthetic cohort (lesions in positive slides) and trains on it with 5-fold
cross-validation, which leaves the ensemble of the fold models as the deployable model
(``models/<name>/card.json``); then generates a second, unlabelled cohort in ``external/``
(other slides, labels withheld in ``external/truth/labels.csv``) and scores it with that model
where it lives (``wsimil predict`` and ``wsimil heatmap --model PATH``). It reports the pooled
cross-validation metrics, the external predictions against the withheld labels and how well
attention finds the external slides' ground-truth lesions. The settings are
:func:`demo_config` (mirrored in ``configs/demo.yaml``).
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
DEMO_N_EXTERNAL = 6
DEMO_SIZE_PX = 10_000
EXTERNAL = "external"  # the unlabelled cohort's run folder, inside the demo's


def demo_config(*, encoder: str | None = None, seed: int = 0) -> Config:
    """The demo's settings: 10x tiles (1 µm/px) of 224 px, EfficientNet-Lite0 ImageNet features,
    5-fold cross-validation (one repeat)."""
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
                "val_fraction": 0.2,
                "seed": seed,
                "protocol": "cv",
                "n_folds": 5,
                "n_repeats": 1,
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
    times[name] = times.get(name, 0.0) + time.perf_counter() - t0
    return out


def _make_cohort(out_dir: Path, n: int, size: int, seed: int, console) -> Path:
    from .progress import progress_bar
    from .synth import make_cohort

    with progress_bar(console, "synth", n) as advance:
        return make_cohort(
            out_dir, n_slides=n, width_px=size, height_px=size, mpp=0.5, seed=seed,
            progress=lambda i, k, sid: advance(),
        )  # fmt: skip


def _make_external(ext_dir: Path, n: int, size: int, seed: int, console) -> Path:
    """The unlabelled cohort: synthetic slides of another seed, ids ``ext_*``, the label column
    left empty; the withheld labels go to ``truth/labels.csv`` beside the lesion masks."""
    path = _make_cohort(ext_dir, n, size, seed + 1000, console)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table["slide_id"] = table["slide_id"].str.replace("synth_", "ext_", regex=False)
    table[["slide_id", "label"]].to_csv(ext_dir / "truth" / "labels.csv", index=False)
    table["label"] = ""
    table.to_csv(path, index=False)
    return path


def external_results(ext_dir: Path, model_name: str) -> dict:
    """The external predictions against the withheld labels: ``n_slides``, ``n_predicted_positive``,
    ``auc`` and ``accuracy`` (NaN when a class is missing), ``predictions`` (the CSV's path)."""
    from sklearn.metrics import roc_auc_score

    path = RunLayout(ext_dir).predicted(model_name).path / "predictions.csv"
    pred = pd.read_csv(path).merge(pd.read_csv(ext_dir / "truth" / "labels.csv"), on="slide_id",
                                   suffixes=("", "_withheld"))  # fmt: skip
    y = pred["label_withheld"].to_numpy()
    two = len(set(y.tolist())) == 2
    return {
        "n_slides": len(pred),
        "n_predicted_positive": int((pred.prediction == 1).sum()),
        "auc": float(roc_auc_score(y, pred.probability)) if two else float("nan"),
        "accuracy": float((pred.prediction == y).mean()) if len(pred) else float("nan"),
        "predictions": str(path),
    }


def _ci(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{m['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _print_results(say, out_dir: Path, cfg: Config, result: dict, tiles: dict) -> None:
    layout, ext = RunLayout(out_dir), RunLayout(out_dir / EXTERNAL)
    name, cv, xr, loc = cfg.train.name, result["cv"], result["external"], result["localisation"]
    say("")
    say("[bold]wsimil demo results[/bold]")
    say(
        f"  tiles: {tiles['cohort']:,} over the cohort's slides, {tiles['external']:,} over the external slides"
    )
    if cv is not None:
        m = cv["metrics"]
        say(
            f"  {cfg.train.n_folds}-fold CV, test predictions pooled ({cv['n_slides']} slides, each once; 95% CI): "
            f"AUC {_ci(m['auc'])}  balanced accuracy {_ci(m['balanced_accuracy'])}  "
            f"sensitivity {_ci(m['sensitivity'])}  specificity {_ci(m['specificity'])}"
        )
    say(f"  per fold: AUC {result['cv_auc_mean']:.3f} ± {result['cv_auc_std']:.3f}")
    say(
        f"  model (ensemble of the {cfg.train.n_folds} fold models): {layout.model_dir(name)}/card.json"
    )
    say(
        f"  external cohort ({xr['n_slides']} unlabelled slides): {xr['n_predicted_positive']} predicted positive; "
        f"against the withheld labels AUC {xr['auc']:.3f}, accuracy {xr['accuracy']:.3f}"
    )
    say(
        f"  lesion localisation on the external positive slides ({loc['n_slides']}; attention vs ground-truth "
        f"lesion tiles): AUC {loc['auc_mean']:.3f} (pooled {loc['auc_pooled']:.3f}), top-10 tiles on lesion {loc['top10_on_lesion']:.2f}"
    )
    times = result["seconds"]
    say("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f", total {result['total_seconds']:.0f}")  # fmt: skip
    say(f"  external predictions: {xr['predictions']}")
    say(f"  external heatmaps: {ext.heatmaps(name).path}/slides/<slide_id>/<slide_id>.png")
    say(f"  review page: {ext.review_index(name)}")
    say(f"  zoomable review in a browser: wsimil review {out_dir}  (or {ext.root})")


def _stages(manifests: dict, dirs: dict, cfg: Config, times: dict, say, console) -> dict:
    """Tile and embed both cohorts, train on the first, predict and draw the second."""
    from .embed import run_embed
    from .heatmap import run_heatmap
    from .predict import run_predict
    from .tile import run_tile
    from .train import run_train

    out = {"tile": {}, "embed": {}}
    say("[bold]2/6 tile[/bold] (both cohorts)")
    for k in manifests:
        out["tile"][k] = _timed(times, "tile", run_tile, manifests[k], dirs[k], cfg.tile,
                                console=console)  # fmt: skip
    say(f"[bold]3/6 embed[/bold] (both cohorts) with {cfg.embed.encoder}")
    for k in manifests:
        out["embed"][k] = _timed(times, "embed", run_embed, manifests[k], dirs[k], cfg.embed,
                                 console=console)  # fmt: skip
    say(f"[bold]4/6 train[/bold] {cfg.train.model}, {cfg.train.n_folds}-fold cross-validation")
    out["train"] = _timed(
        times, "train", run_train, manifests["cohort"], dirs["cohort"], cfg.train,
        encoder=cfg.embed.encoder, console=console,
    )  # fmt: skip
    model = str(Path(out["train"]["model_dir"]).resolve())
    say(f"[bold]5/6 predict[/bold] the external cohort with {model}")
    out["predict"] = _timed(times, "predict", run_predict, manifests["external"],
                            dirs["external"], model, console=console)  # fmt: skip
    say("[bold]6/6 heatmap[/bold] the external cohort, then the training cohort (for review)")
    out["heatmap"] = _timed(
        times, "heatmap", run_heatmap, manifests["external"], dirs["external"], cfg.heatmap,
        model_name=model, console=console,
    )  # fmt: skip
    _timed(times, "heatmap", run_heatmap, manifests["cohort"], dirs["cohort"], cfg.heatmap,
           model_name=cfg.train.name, console=console)  # fmt: skip
    return out


def _fit_folds(cfg: Config, manifest: pd.DataFrame, say) -> Config:
    """Fewer folds when a class has fewer slides than ``n_folds`` (a small ``--n-slides``)."""
    counts = manifest[cfg.train.label_column].value_counts()
    folds = min(cfg.train.n_folds, int(counts.min()) if len(counts) == 2 else 0)
    if folds < 2:
        raise ValueError(f"{len(manifest)} slides: cross-validation needs 2 of each class")
    if folds == cfg.train.n_folds:
        return cfg
    say(f"{counts.min()} slides in the smaller class: {folds}-fold cross-validation")
    train = cfg.train.model_copy(update={"n_folds": folds})
    return cfg.model_copy(update={"train": train})


def run_demo(
    out_dir: str | Path,
    *,
    n_slides: int | None = None,
    n_external: int | None = None,
    size_px: int | None = None,
    encoder: str | None = None,
    seed: int = 0,
    console=None,
) -> dict:
    """Generate the sample cohorts in ``out_dir`` and run every stage; print and return the results."""
    from .config import save_config
    from .manifest import read_manifest

    say = console.print if console is not None else print
    out_dir = Path(out_dir)
    dirs = {"cohort": out_dir, "external": out_dir / EXTERNAL}
    cfg = demo_config(encoder=encoder, seed=seed)
    n, n_ext, size = (
        n_slides or DEMO_N_SLIDES,
        n_external or DEMO_N_EXTERNAL,
        size_px or DEMO_SIZE_PX,
    )
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    say(f"[bold]1/6 synth[/bold]: {n} slides of {size:,} x {size:,} px at 0.5 µm/px into {out_dir}, "
        f"{n_ext} unlabelled ones into {dirs['external']}")  # fmt: skip
    paths = {"cohort": _timed(times, "synth", _make_cohort, out_dir, n, size, seed, console),
             "external": _timed(times, "synth", _make_external, dirs["external"], n_ext, size,
                                seed, console)}  # fmt: skip
    manifests = {k: read_manifest(p, require_label=k == "cohort") for k, p in paths.items()}
    cfg = _fit_folds(cfg, manifests["cohort"], say)
    save_config(cfg, RunLayout(out_dir).demo_config)
    out = _stages(manifests, dirs, cfg, times, say, console)

    model_name = Path(out["train"]["model_dir"]).name
    pooled = Path(out["train"]["model_dir"]) / "metrics_pooled.json"
    truth = pd.read_csv(dirs["external"] / "truth" / "labels.csv")
    loc = localisation(dirs["external"], manifests["external"], model_name,
                       truth[truth.label == 1].slide_id.tolist())  # fmt: skip
    frames = [*out["tile"].values(), *out["embed"].values(), out["predict"], out["heatmap"]]
    result = {
        "cv": json.loads(pooled.read_text()) if pooled.is_file() else None,
        "cv_auc_mean": out["train"]["auc"],
        "cv_auc_std": out["train"]["auc_std"],
        "external": external_results(dirs["external"], model_name),
        "localisation": loc,
        "seconds": times,
        "total_seconds": time.perf_counter() - t_all,
        "failed": sum(int((df.status == "error").sum()) for df in frames),
    }
    tiles = {k: int(df.n_tiles.sum()) for k, df in out["tile"].items()}
    _print_results(say, out_dir, cfg, result, tiles)
    if result["failed"]:
        say(f"[red]{result['failed']} slide-stage(s) failed; see the status.jsonl files[/red]")
    RunLayout(out_dir).demo_results.write_text(json.dumps(result, indent=2, default=float))
    return result
