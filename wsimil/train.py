"""``wsimil train``: a MIL head on bags of patch embeddings, with slide labels only.

Reads ``features/<encoder>/<slide_id>.zarr`` for the slides of the manifest, splits them
(seeded, stratified, by ``case_id`` when given so a patient never straddles train and test;
:mod:`wsimil.cv`), trains with Adam and early stopping on the validation loss (:func:`fit`,
one bag per step, top to bottom), and writes ``models/<name>/``: ``model.safetensors`` +
``model.json`` (:mod:`wsimil.checkpoint`: everything needed to predict or resume; nothing is
pickled), ``predictions.csv``, ``metrics.csv``, ``history.csv`` and ``config.yaml``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .bags import Bag, BagTensors, Standardiser, load_slide_bags, read_mil_table
from .checkpoint import has_model, load_checkpoint, model_kwargs, save_checkpoint
from .config import TrainConfig, save_config
from .cv import METRIC_COLUMNS, Fold, binary_metrics, make_folds, summarise_metrics
from .deploy import manifest_digest, training_features, write_card
from .devices import pick_device, train_threads
from .layout import RunLayout
from .mil import create_mil
from .store import write_text_atomic

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


def bag_loss(model, x: torch.Tensor, y: float, loss_fn) -> torch.Tensor:
    out = model(x.unsqueeze(0))
    return loss_fn(out.logits, torch.tensor([y], dtype=torch.float32, device=x.device))


@torch.inference_mode()
def predict_bags(model, tensors) -> tuple[np.ndarray, list]:
    """Bag probabilities (K,) and per-bag MIL outputs for K (N, D) tensors (any iterable)."""
    model.eval()
    device = next(model.parameters()).device
    probs, outs = [], []
    for x in tensors:
        out = model(x.to(device, non_blocking=True).unsqueeze(0))
        probs.append(float(torch.sigmoid(out.logits)[0]))
        outs.append(out)
    return np.asarray(probs), outs


def build_model(cfg: TrainConfig, in_dim: int) -> torch.nn.Module:
    """The MIL model a config describes (instance transform f, pooling, classifier)."""
    return create_mil(cfg.model, in_dim, **model_kwargs(cfg))


def _bag_tensors(train, val, std, memory_budget_gb, console) -> tuple[BagTensors, BagTensors]:
    """Standardised bags; over-budget cohorts keep what fits and read the rest ahead of use."""
    per_bag = memory_budget_gb * 2**30 / max(len(train) + len(val), 1)  # budget split by bag count
    xs_train = BagTensors(train, std, budget_bytes=per_bag * len(train))
    xs_val = BagTensors(val, std, budget_bytes=per_bag * len(val))
    streamed = xs_train.n_streamed + xs_val.n_streamed
    if console is not None and streamed:
        console.print(
            f"  {streamed} of {len(train) + len(val)} bags read from their stores at each use"
        )
    return xs_train, xs_val


def _val_loss(model, xs_val, y_val: np.ndarray, epoch: int) -> float:
    """Unweighted BCE over the validation bags; without them, a falling number (keep the last)."""
    if not xs_val:
        return -float(epoch)
    probs, _ = predict_bags(model, xs_val)
    logits = torch.logit(torch.tensor(probs).clamp(1e-6, 1 - 1e-6))
    return float(torch.nn.BCEWithLogitsLoss()(logits, torch.tensor(y_val)))


def fit(
    train: list[Bag],
    val: list[Bag],
    cfg: TrainConfig,
    *,
    seed: int | None = None,
    memory_budget_gb: float = 8.0,
    console=None,
) -> tuple[torch.nn.Module, Standardiser, pd.DataFrame, int]:
    """Train a MIL model, one bag per step; early stopping on the validation loss; returns the best model.

    Features are standardised with statistics of ``train`` only. Bags longer than
    ``cfg.max_instances`` are subsampled per step (training only). Class imbalance is
    handled by ``cfg.balance``. Bags held in their stores (over-budget cohorts) are cached in
    memory up to ``memory_budget_gb`` and the rest read ahead of each step (:class:`BagTensors`).

    Returns
    -------
    model, standardiser, history (epoch, train_loss, val_loss, seconds), best_epoch
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(train_threads(cfg, train))
    try:
        return _fit(train, val, cfg, seed=seed, memory_budget_gb=memory_budget_gb, console=console)
    finally:
        torch.set_num_threads(threads)  # no change to the rest of the process


def _fit(
    train: list[Bag],
    val: list[Bag],
    cfg: TrainConfig,
    *,
    seed: int | None = None,
    memory_budget_gb: float = 8.0,
    console=None,
) -> tuple[torch.nn.Module, Standardiser, pd.DataFrame, int]:
    """:func:`fit` on the threads it set."""
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    in_dim = train[0].features.shape[1]
    std = (
        Standardiser.fit(train)
        if cfg.standardise
        else Standardiser(np.zeros(in_dim), np.ones(in_dim))
    )
    xs_train, xs_val = _bag_tensors(train, val, std, memory_budget_gb, console)
    y_train = np.array([b.label for b in train], np.float32)
    y_val = np.array([b.label for b in val], np.float32)

    device = torch.device(pick_device(cfg.device))
    model = build_model(cfg, in_dim).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
    )
    n_pos = max(float(y_train.sum()), 1.0)
    n_neg = max(len(y_train) - float(y_train.sum()), 1.0)
    pos_weight = (
        torch.tensor([n_neg / n_pos], device=device) if cfg.balance == "class_weight" else None
    )
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    p_sample = np.where(y_train > 0, 0.5 / n_pos, 0.5 / n_neg)
    p_sample /= p_sample.sum()

    best = (float("inf"), copy.deepcopy(model.state_dict()), 0)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        if cfg.balance == "sampling":
            order = rng.choice(len(xs_train), len(xs_train), replace=True, p=p_sample)
        else:
            order = rng.permutation(len(xs_train))
        for i, x in xs_train.items(order):
            if cfg.max_instances and len(x) > cfg.max_instances:
                x = x[torch.from_numpy(rng.choice(len(x), cfg.max_instances, replace=False))]
            loss = bag_loss(model, x.to(device, non_blocking=True), y_train[i], loss_fn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        val_loss = _val_loss(model, xs_val, y_val, epoch)
        history.append({"epoch": epoch, "train_loss": total / len(xs_train),
                        "val_loss": val_loss, "seconds": time.perf_counter() - t0})  # fmt: skip
        if val_loss < best[0] - 1e-4:
            best = (val_loss, copy.deepcopy(model.state_dict()), epoch)
        elif epoch - best[2] >= cfg.patience:
            break
        if console is not None and (epoch % 5 == 0 or epoch == 1):
            console.print(
                f"  epoch {epoch:3d}  train loss {history[-1]['train_loss']:.4f}  val loss {val_loss:.4f}"
            )
    model.load_state_dict(best[1])
    model.to("cpu").eval()  # saved and scored from the CPU
    return model, std, pd.DataFrame(history), best[2]


def _same_run(saved: dict, current: dict) -> bool:
    """Whether a fold's model was trained with these settings (more repeats reuse the folds done).

    Both configs are compared as JSON (``model.json`` holds ``model_dump(mode="json")``).
    """
    same = ("n_repeats", "threads", "device")  # none changes what a fold's model is
    return {k: v for k, v in saved.items() if k not in same} == {
        k: v for k, v in current.items() if k not in same
    }


def _fold_model(fold: Fold, bags, model_dir: Path, cfg: TrainConfig, *, encoder, budget, console):
    """The fold's model: resumed from its checkpoint when trained with these settings, else fitted.

    Returns
    -------
    model, standardiser, history (None when resumed), best_epoch, resumed
    """
    fold_dir = model_dir / "folds" / f"r{fold.repeat}_f{fold.fold}"
    if has_model(fold_dir):  # a legacy pickled checkpoint.pt is refused, never unpickled
        model, std, meta = load_checkpoint(fold_dir)
        if _same_run(meta["config"], cfg.model_dump(mode="json")) and meta["split"] == fold.split:
            return model, std, None, meta["best_epoch"], True
    train = [b for b in bags if fold.split[b.bag_id] == "train"]
    val = [b for b in bags if fold.split[b.bag_id] == "val"]
    model, std, history, best_epoch = fit(
        train, val, cfg, seed=cfg.seed + 7919 * fold.repeat + 101 * fold.fold,
        memory_budget_gb=budget, console=console,
    )  # fmt: skip
    fold_dir.mkdir(parents=True, exist_ok=True)
    history.to_csv(fold_dir / "history.csv", index=False)
    save_checkpoint(
        fold_dir, model, std, cfg, encoder=encoder, best_epoch=best_epoch, split=fold.split,
        repeat=fold.repeat, fold=fold.fold,
    )  # fmt: skip
    return model, std, history, best_epoch, False


def _predict_fold(model, std, fold: Fold, shown: list[Bag]) -> tuple[list[dict], dict]:
    """Prediction rows of ``shown`` bags and the fold's test metrics."""
    probs, _ = predict_bags(model, BagTensors(shown, std, budget_bytes=0))
    rows = [
        {"slide_id": b.bag_id, "repeat": fold.repeat, "fold": fold.fold,
         "split": fold.split[b.bag_id], "probability": float(p), "prediction": int(p >= 0.5),
         "label": b.label}
        for b, p in zip(shown, probs, strict=True)
    ]  # fmt: skip
    test = [(r["label"], r["probability"]) for r in rows if r["split"] == "test"]
    return rows, binary_metrics(np.array([t[0] for t in test]), np.array([t[1] for t in test]))


def train_bags(
    bags: list[Bag],
    model_dir: str | Path,
    cfg: TrainConfig,
    *,
    encoder: str | None = None,
    split_values: dict[str, str] | None = None,
    memory_budget_gb: float = 8.0,
    console=None,
    features: dict | None = None,
    training: dict | None = None,
) -> dict:
    """Run ``cfg.protocol`` on bags: the one code path of slide cohorts and bag tables.

    Ends with ``card.json`` (:mod:`wsimil.deploy`), written last: the deployable model, for
    every protocol (the ensemble of the fold models after CV), with ``features`` (the encoder
    and tile geometry of the training features) and ``training`` (cohort facts) in it.

    Writes to ``model_dir``: ``config.yaml``; per fold ``folds/r<repeat>_f<fold>/``
    ``model.safetensors`` + ``model.json`` (:mod:`wsimil.checkpoint`) and ``history.csv`` (a
    fold whose model exists with the same config, ``n_repeats`` aside, is resumed from it, not
    retrained; a legacy pickled ``checkpoint.pt`` is refused, never unpickled);
    ``predictions.csv`` (slide_id, repeat, fold, split, probability, prediction, label: test
    bags of every fold under CV, every bag under holdout/split_column);
    ``metrics.csv`` (test metrics per fold), ``metrics_summary.csv`` (mean and std over folds).
    Holdout and split_column also write ``model.safetensors`` + ``model.json`` in ``model_dir``
    (the model the heatmap stage uses).

    Returns
    -------
    dict: test ``n`` and mean accuracy, precision, recall, f1, auc; ``*_std``; best_epoch
    (of the first fold); n_folds; model_dir.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, model_dir / "config.yaml")
    if not bags:
        raise ValueError(f"{model_dir}: no bags to train on")
    folds = make_folds(bags, cfg, split_values=split_values)
    pred_rows, fold_metrics = [], []
    for f in folds:
        model, std, history, best_epoch, resumed = _fold_model(
            f, bags, model_dir, cfg, encoder=encoder, budget=memory_budget_gb, console=console
        )
        shown = bags if len(folds) == 1 else [b for b in bags if f.split[b.bag_id] == "test"]
        rows, m = _predict_fold(model, std, f, shown)
        pred_rows += rows
        fold_metrics.append(
            {"repeat": f.repeat, "fold": f.fold, **m, "best_epoch": best_epoch, "resumed": resumed}
        )
        if console is not None:
            console.print(
                f"repeat {f.repeat} fold {f.fold}: test accuracy {m['accuracy']:.3f} AUC {m['auc']:.3f} (best epoch {best_epoch}{', resumed' if resumed else ''})"
            )
        if len(folds) == 1:
            save_checkpoint(
                model_dir, model, std, cfg, encoder=encoder,
                best_epoch=best_epoch, split=f.split,
            )  # fmt: skip
            pd.DataFrame(history if history is not None else []).to_csv(
                model_dir / "history.csv", index=False
            )
    pd.DataFrame(pred_rows).to_csv(model_dir / "predictions.csv", index=False)
    per_fold = pd.DataFrame(fold_metrics)
    per_fold.to_csv(model_dir / "metrics.csv", index=False)
    summary = summarise_metrics(per_fold)
    summary.to_csv(model_dir / "metrics_summary.csv", index=False)
    out = {
        "n": int(per_fold["n"].sum()),
        "best_epoch": int(fold_metrics[0]["best_epoch"]),
        "n_folds": len(folds),
        "model_dir": str(model_dir),
    }
    for c in METRIC_COLUMNS:
        out[c] = float(summary.loc[0, c])
        out[f"{c}_std"] = float(summary.loc[1, c])
    _write_card(model_dir, folds, cfg, bags, pred_rows, out, features=features, training=training)
    return out


def _write_card(model_dir, folds, cfg, bags, pred_rows, out, *, features, training) -> None:
    """The deployable model (the single model, or after CV the ensemble of the fold models),
    with the test metrics and the pooled test metrics with intervals (``metrics_pooled.json``)."""
    from .evaluate import pooled_test_metrics

    metrics = {k: v for k, v in out.items() if k != "model_dir"}
    pooled = pooled_test_metrics(pred_rows, bags)
    if pooled is not None:
        write_text_atomic(model_dir / "metrics_pooled.json", json.dumps(pooled, indent=1) + "\n")
        metrics["pooled_test"] = pooled
    n_bags = len(bags)
    members = ["."] if len(folds) == 1 else [f"folds/r{f.repeat}_f{f.fold}" for f in folds]
    write_card(
        model_dir, kind="single" if len(folds) == 1 else "ensemble", members=members, cfg=cfg,
        features=features, training={**(training or {}), "n_bags": n_bags,
        "protocol": cfg.protocol}, metrics=metrics,
    )  # fmt: skip


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
    bags, skipped = load_slide_bags(
        manifest,
        lambda sid: layout.feature_store(encoder, sid),
        label_column=cfg.label_column,
        memory_budget_gb=memory_budget_gb,
        console=console,
    )
    split_values = None
    if cfg.protocol == "split_column" and cfg.split_column in manifest.columns:
        split_values = dict(
            zip(manifest.slide_id.astype(str), manifest[cfg.split_column], strict=True)
        )
    res = train_bags(
        bags,
        layout.model_dir(cfg.name),
        cfg,
        encoder=encoder,
        split_values=split_values,
        memory_budget_gb=memory_budget_gb,
        console=console,
        features=training_features(layout, encoder, [b.bag_id for b in bags]),
        training={"n_slides": len(bags), "manifest_sha256": manifest_digest(manifest)},
    )
    return {**res, "skipped": skipped}


def run_train_table(
    table: str | Path, model_dir: str | Path, cfg: TrainConfig, *, console=None
) -> dict:
    """Train on a MIL bag table (CSV: label, bag id, features...); write ``model_dir`` (see :func:`train_bags`)."""
    return train_bags(read_mil_table(table), model_dir, cfg, encoder=None, console=console)
