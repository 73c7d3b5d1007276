"""``wsimil train``: a MIL head on bags of patch embeddings, with slide labels only.

Reads ``features/<encoder>/<slide_id>.zarr`` for the slides of the manifest, splits them
(seeded, stratified, by ``case_id`` when given so a patient never straddles train and test;
:mod:`wsimil.cv`), trains each fold (:func:`wsimil.fit.fit`, the training loop, one bag per
step, top to bottom), and writes ``models/<name>/``: the models (``model.safetensors`` +
``model.json``, :mod:`wsimil.checkpoint`: everything needed to predict or resume; nothing is
pickled), the predictions, metrics and plots (:mod:`wsimil.train_results`) and, last,
``card.json``, the deployable model (:mod:`wsimil.deploy`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .bags import Bag, Standardiser, load_slide_bags, read_bag_table, read_mil_table
from .checkpoint import has_model, load_checkpoint, save_checkpoint
from .classes import class_set
from .config import TrainConfig, save_config
from .cv import Fold, binary_metrics, make_folds
from .deploy import manifest_digest, training_features, training_pixels
from .fit import fit, predict_bags
from .layout import RunLayout
from .pixel_models import PIXEL_ENCODERS
from .train_results import (
    check_classes,
    fold_summary,
    fold_threshold,
    prediction_rows,
    write_card_and_plots,
    write_tables,
)

__all__ = [
    "Bag",
    "Standardiser",
    "binary_metrics",
    "load_slide_bags",
    "read_mil_table",
    "fit",
    "predict_bags",
    "run_train",
    "train_bags",
    "load_checkpoint",
]


def _same_run(saved: dict, current: dict) -> bool:
    """Whether a fold's model was trained with these settings (more repeats reuse the folds done).

    Both configs are compared as JSON (``model.json`` holds ``model_dump(mode="json")``).
    """
    same = ("n_repeats", "threads", "device", "threshold")  # none changes a fold's weights
    return {k: v for k, v in saved.items() if k not in same} == {
        k: v for k, v in current.items() if k not in same
    }


def _saved_model(folder: Path, cfg: TrainConfig, split: dict, classes: list[str]):
    """The model saved in ``folder`` when it was trained with these settings, split and
    classes (``n_repeats``, threads, device and threshold aside), else None. A legacy pickled
    ``checkpoint.pt`` is refused, never unpickled."""
    if not has_model(folder):
        return None
    model, std, meta = load_checkpoint(folder)
    same = (_same_run(meta["config"], cfg.model_dump(mode="json")) and meta["split"] == split
            and meta["classes"] == classes)  # fmt: skip
    return (model, std, meta) if same else None


def _fold_model(fold: Fold, bags, model_dir: Path, cfg: TrainConfig, classes: list[str], *,
                encoder, budget, console):  # fmt: skip
    """The fold's model: resumed from its checkpoint when trained with these settings, else fitted.

    Returns
    -------
    model, standardiser, history (None when resumed), best_epoch, resumed
    """
    fold_dir = model_dir / "folds" / f"r{fold.repeat}_f{fold.fold}"
    saved = _saved_model(fold_dir, cfg, fold.split, classes)
    if saved is not None:
        model, std, meta = saved
        return model, std, None, meta["best_epoch"], True
    train = [b for b in bags if fold.split[b.bag_id] == "train"]
    val = [b for b in bags if fold.split[b.bag_id] == "val"]
    model, std, history, best_epoch = fit(
        train, val, cfg, seed=cfg.seed + 7919 * fold.repeat + 101 * fold.fold,
        n_classes=len(classes), memory_budget_gb=budget, console=console, encoder=encoder,
    )  # fmt: skip
    fold_dir.mkdir(parents=True, exist_ok=True)
    history.to_csv(fold_dir / "history.csv", index=False)
    save_checkpoint(
        fold_dir, model, std, cfg, encoder=encoder, best_epoch=best_epoch, split=fold.split,
        classes=classes, threshold=None, repeat=fold.repeat, fold=fold.fold,
    )  # fmt: skip
    return model, std, history, best_epoch, False


def train_bags(
    bags: list[Bag],
    model_dir: str | Path,
    cfg: TrainConfig,
    *,
    classes: list[str] | None = None,
    encoder: str | None = None,
    split_values: dict[str, str] | None = None,
    memory_budget_gb: float = 8.0,
    console=None,
    features: dict | None = None,
    training: dict | None = None,
) -> dict:
    """Run ``cfg.protocol`` on bags: the one code path of slide cohorts and bag tables.

    ``classes`` names the classes the bag labels index (default binary ``0``, ``1``); three or
    more train a softmax head (:mod:`wsimil.classes`). Ends with ``card.json``
    (:mod:`wsimil.deploy`), written last: the deployable model, for every protocol (the
    ensemble of the fold models after CV), with its classes, decision threshold (binary:
    ``cfg.threshold``, or Youden's on each model's training slides, the median over folds),
    ``features`` (encoder and tile geometry) and ``training`` (cohort facts).

    Writes to ``model_dir``: ``config.yaml``; per fold ``folds/r<repeat>_f<fold>/`` with
    ``model.safetensors`` + ``model.json`` (:mod:`wsimil.checkpoint`; a fold trained with the
    same settings is resumed, not retrained) and ``history.csv``; the tables, pooled metrics
    and plots of :mod:`wsimil.train_results`. Holdout and split_column also write the model in
    ``model_dir`` itself.

    Returns
    -------
    dict: test ``n`` and the mean of each metric column (binary: accuracy, precision, recall,
    f1, auc; 3+ classes: accuracy, balanced_accuracy, f1, auc, macro), ``*_std``; best_epoch
    (of the first fold); n_folds; classes; model_dir.
    """
    model_dir = Path(model_dir)
    classes = [str(c) for c in (classes or ("0", "1"))]
    if not bags:
        raise ValueError(f"{model_dir}: no bags to train on")
    check_classes(bags, classes, model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if cfg.refit and cfg.protocol != "cv":
        raise ValueError(
            f"refit trains on every slide after cross-validation; use --protocol cv (got {cfg.protocol})"
        )
    save_config(cfg, model_dir / "config.yaml")
    folds = make_folds(bags, cfg, split_values=split_values)
    pred_rows, fold_metrics, thresholds = [], [], []
    for f in folds:
        model, std, history, best_epoch, resumed = _fold_model(
            f, bags, model_dir, cfg, classes, encoder=encoder, budget=memory_budget_gb,
            console=console,
        )  # fmt: skip
        threshold = fold_threshold(model, std, f, bags, cfg, len(classes))
        thresholds.append(threshold)
        shown = bags if len(folds) == 1 else [b for b in bags if f.split[b.bag_id] == "test"]
        rows, m = prediction_rows(model, std, f, shown, classes, threshold)
        pred_rows += rows
        fold_metrics.append({"repeat": f.repeat, "fold": f.fold, **m, "best_epoch": best_epoch,
                             "resumed": resumed, "threshold": threshold})  # fmt: skip
        if console is not None:
            console.print(fold_summary(f, m, best_epoch, resumed, threshold))
        if len(folds) == 1:
            save_checkpoint(
                model_dir, model, std, cfg, encoder=encoder, best_epoch=best_epoch,
                split=f.split, classes=classes, threshold=threshold,
            )  # fmt: skip
            pd.DataFrame(history if history is not None else []).to_csv(
                model_dir / "history.csv", index=False
            )
    out = write_tables(model_dir, pred_rows, fold_metrics, classes)
    refit = None
    if cfg.refit:
        refit = _refit(bags, model_dir, cfg, classes, fold_metrics, encoder=encoder,
                       budget=memory_budget_gb, console=console)  # fmt: skip
    write_card_and_plots(model_dir, folds, cfg, bags, classes, thresholds, pred_rows, out,
                         features=features, training=training, refit=refit)  # fmt: skip
    return out


def _refit(bags, model_dir: Path, cfg: TrainConfig, classes, fold_metrics, *, encoder, budget,
           console) -> dict:  # fmt: skip
    """One model on every bag for the median best epoch of the first repeat's folds (no
    validation split: the last epoch is kept), saved in ``model_dir`` itself; resumed when
    one was trained with these settings. Returns its epochs and threshold."""
    epochs = max(1, int(np.median([m["best_epoch"] for m in fold_metrics if m["repeat"] == 0])))
    settings = cfg.model_copy(update={"epochs": epochs, "val_fraction": 0.0, "refit": False})
    everything = Fold(0, 0, {b.bag_id: "train" for b in bags})
    saved = _saved_model(model_dir, settings, everything.split, classes)
    if saved is not None and saved[2]["extras"].get("refit"):
        model, std, _ = saved
    else:
        if console is not None:
            console.print(f"refit: one model on all {len(bags)} bags for {epochs} epochs")
        model, std, history, _ = fit(bags, [], settings, seed=cfg.seed, n_classes=len(classes),
                                     memory_budget_gb=budget, console=console,
                                     encoder=encoder)  # fmt: skip
        save_checkpoint(model_dir, model, std, settings, encoder=encoder, best_epoch=epochs,
                        split=everything.split, classes=classes, threshold=None, refit=True)  # fmt: skip
        history.to_csv(model_dir / "history.csv", index=False)
    threshold = fold_threshold(model, std, everything, bags, cfg, len(classes))
    return {"epochs": epochs, "threshold": threshold}


def run_train(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    encoder: str,
    memory_budget_gb: float = 8.0,
    console=None,
) -> dict:
    """Train on the features of ``encoder`` in ``out_dir``; write ``models/<cfg.name>/`` (see :func:`train_bags`).

    Returns
    -------
    dict of test metrics (and ``model_dir``, ``skipped``).
    """
    layout = RunLayout(out_dir)
    if cfg.label_column not in manifest.columns:
        raise ValueError(f"manifest has no label column {cfg.label_column!r}")
    classes = class_set(manifest[cfg.label_column], configured=cfg.classes, source="manifest")
    px = None
    if cfg.instance_encoder in PIXEL_ENCODERS:  # end to end: tiles from the tile cache
        px = cache_side(cfg, layout, manifest, encoder)
        from .tile_cache import run_cache

        run_cache(manifest, out_dir, px=px, console=console)  # writes what is missing
    bags, skipped = load_slide_bags(
        manifest,
        (lambda sid: layout.tile_cache_store(px, sid)) if px
        else (lambda sid: layout.feature_store(encoder, sid)),
        label_column=cfg.label_column,
        classes=classes,
        memory_budget_gb=memory_budget_gb,
        console=console,
        array="tiles" if px else "features",
    )  # fmt: skip
    split_values = None
    if cfg.protocol == "split_column" and cfg.split_column in manifest.columns:
        split_values = dict(
            zip(manifest.slide_id.astype(str), manifest[cfg.split_column], strict=True)
        )
    res = train_bags(
        bags,
        layout.model_dir(cfg.name),
        cfg,
        classes=classes,
        encoder="pixels" if px and cfg.instance_encoder != "finetune" else encoder,
        split_values=split_values,
        memory_budget_gb=memory_budget_gb,
        console=console,
        features=(
            training_pixels(layout, px, [b.bag_id for b in bags])
            if px
            else training_features(layout, encoder, [b.bag_id for b in bags])
        ),  # fmt: skip
        training={"n_slides": len(bags), "manifest_sha256": manifest_digest(manifest)},
    )
    return {**res, "skipped": skipped}


def cache_side(cfg: TrainConfig, layout: RunLayout, manifest: pd.DataFrame, encoder: str) -> int:
    """The cached tiles' side for an end-to-end model: ``cfg.cache_px``, else the encoder's input
    size (``finetune``) or the tile grid's ``tile_px`` (of the first tiled slide)."""
    if cfg.cache_px:
        return cfg.cache_px
    if cfg.instance_encoder == "finetune":
        from .encoders import create_encoder

        return int(create_encoder(encoder, pretrained=False).config.input_px)
    from .store import store_attrs

    for sid in manifest.slide_id.astype(str):
        attrs = store_attrs(layout.tile_store(sid))
        if attrs:
            return int(attrs["tile_px"])
    raise FileNotFoundError(f"{layout.tiles.path}: no tiled slide; run `wsimil tile` first")


def run_train_table(
    table: str | Path, model_dir: str | Path, cfg: TrainConfig, *, console=None
) -> dict:
    """Train on a MIL bag table (CSV: label, bag id, features...); write ``model_dir`` (see :func:`train_bags`)."""
    bags, classes = read_bag_table(table, classes=cfg.classes)
    return train_bags(bags, model_dir, cfg, classes=classes, encoder=None, console=console)
