"""``wsimil train``: a MIL head on bags of patch embeddings, with slide labels only.

Reads ``features/<encoder>/<slide_id>.zarr`` for the slides of the manifest, splits them
(seeded, stratified, by ``case_id`` when given so a patient never straddles train and test),
trains with Adam and early stopping on the validation loss, and writes ``models/<name>/``:
``checkpoint.pt`` (everything needed to predict or resume), ``predictions.csv``,
``metrics.csv``, ``history.csv`` and ``config.yaml``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .bags import Bag, BagTensors, load_slide_bags, read_mil_table, read_rows
from .config import TrainConfig, save_config
from .cv import Fold, column_split, holdout_split, kfold_splits
from .mil import create_mil

__all__ = [
    "Bag",
    "load_slide_bags",
    "read_mil_table",
    "fit",
    "predict_bags",
    "run_train",
    "train_bags",
    "load_checkpoint",
]


def split_bags(
    bags: list[Bag], *, test_fraction: float, val_fraction: float, seed: int
) -> dict[str, str]:
    """Seeded holdout split (see :func:`wsimil.cv.holdout_split`)."""
    return holdout_split(bags, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 and ROC AUC (NaN when one class is missing)."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(probs) >= threshold).astype(int)
    out = {
        "n": len(labels),
        "accuracy": accuracy_score(labels, pred) if len(labels) else float("nan"),
        "precision": precision_score(labels, pred, zero_division=0),
        "recall": recall_score(labels, pred, zero_division=0),
        "f1": f1_score(labels, pred, zero_division=0),
        "auc": roc_auc_score(labels, probs) if len(set(labels.tolist())) == 2 else float("nan"),
    }
    return {k: (float(v) if k != "n" else int(v)) for k, v in out.items()}


class Standardiser:
    """Per-feature mean/std from the training bags only."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = mean.astype(np.float32)
        self.std = np.maximum(std, 1e-6).astype(np.float32)

    @classmethod
    def fit(cls, bags: list[Bag], *, block: int = 65536) -> Standardiser:
        """Two passes over the bags; bags kept in their stores are read ``block`` rows at a time."""

        def blocks(f):
            if isinstance(f, np.ndarray):
                yield f
            else:
                for start in range(0, f.shape[0], block):
                    yield read_rows(f, start, start + block)

        n = sum(b.features.shape[0] for b in bags)
        mean = sum(x.sum(0, dtype=np.float64) for b in bags for x in blocks(b.features)) / n
        ss = sum(
            ((x - mean) ** 2).sum(0, dtype=np.float64) for b in bags for x in blocks(b.features)
        )
        return cls(mean, np.sqrt(ss / max(n - 1, 1)))

    def __call__(self, features) -> torch.Tensor:
        """(N, D) features (array or Zarr array) -> standardised float32 tensor (N, D)."""
        return torch.from_numpy((read_rows(features) - self.mean) / self.std)


def bag_loss(model, x: torch.Tensor, y: float, loss_fn) -> torch.Tensor:
    out = model(x.unsqueeze(0))
    return loss_fn(out.logits, torch.tensor([y], dtype=torch.float32))


@torch.inference_mode()
def predict_bags(model, tensors) -> tuple[np.ndarray, list]:
    """Bag probabilities (K,) and per-bag MIL outputs for K (N, D) tensors (any iterable)."""
    model.eval()
    probs, outs = [], []
    for x in tensors:
        out = model(x.unsqueeze(0))
        probs.append(float(torch.sigmoid(out.logits)[0]))
        outs.append(out)
    return np.asarray(probs), outs


def build_model(cfg: TrainConfig, in_dim: int) -> torch.nn.Module:
    """The MIL model a config describes (instance transform f, pooling, classifier)."""
    return create_mil(cfg.model, in_dim, **model_kwargs(cfg))


def model_kwargs(cfg: TrainConfig) -> dict:
    return {
        "hidden_dim": cfg.hidden_dim,
        "attention_dim": cfg.attention_dim,
        "dropout": cfg.dropout,
        "mlp_dims": cfg.mlp_dims,
        "instance_encoder": cfg.instance_encoder,
    }


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
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    in_dim = train[0].features.shape[1]
    std = (
        Standardiser.fit(train)
        if cfg.standardise
        else Standardiser(np.zeros(in_dim), np.ones(in_dim))
    )
    per_bag = memory_budget_gb * 2**30 / max(len(train) + len(val), 1)  # budget split by bag count
    xs_train = BagTensors(train, std, budget_bytes=per_bag * len(train))
    xs_val = BagTensors(val, std, budget_bytes=per_bag * len(val))
    if console is not None and xs_train.n_streamed + xs_val.n_streamed:
        console.print(
            f"  {xs_train.n_streamed + xs_val.n_streamed} of {len(train) + len(val)} bags read from their stores at each use"
        )
    y_train = np.array([b.label for b in train], np.float32)
    y_val = np.array([b.label for b in val], np.float32)

    model = build_model(cfg, in_dim)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
    )
    n_pos = max(float(y_train.sum()), 1.0)
    n_neg = max(len(y_train) - float(y_train.sum()), 1.0)
    pos_weight = torch.tensor([n_neg / n_pos]) if cfg.balance == "class_weight" else None
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    eval_loss_fn = torch.nn.BCEWithLogitsLoss()
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
            loss = bag_loss(model, x, y_train[i], loss_fn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        if xs_val:
            probs, _ = predict_bags(model, xs_val)
            val_loss = float(
                eval_loss_fn(
                    torch.logit(torch.tensor(probs).clamp(1e-6, 1 - 1e-6)), torch.tensor(y_val)
                )
            )
        else:  # no validation bags: keep the last epoch
            val_loss = -float(epoch)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / len(xs_train),
                "val_loss": val_loss,
                "seconds": time.perf_counter() - t0,
            }
        )
        if val_loss < best[0] - 1e-4:
            best = (val_loss, copy.deepcopy(model.state_dict()), epoch)
        elif epoch - best[2] >= cfg.patience:
            break
        if console is not None and (epoch % 5 == 0 or epoch == 1):
            console.print(
                f"  epoch {epoch:3d}  train loss {history[-1]['train_loss']:.4f}  val loss {val_loss:.4f}"
            )
    model.load_state_dict(best[1])
    model.eval()
    return model, std, pd.DataFrame(history), best[2]


def save_checkpoint(
    path: Path,
    model,
    std: Standardiser,
    cfg: TrainConfig,
    *,
    encoder: str | None,
    best_epoch: int,
    split: dict,
    **extra,
) -> None:
    """Write everything needed to predict with, or resume from, a trained model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model_name": cfg.model,
            "model_kwargs": model_kwargs(cfg),
            "in_dim": model.in_dim,
            "state_dict": model.state_dict(),
            "feature_mean": std.mean,
            "feature_std": std.std,
            "config": cfg.model_dump(),
            "encoder": encoder,
            "best_epoch": best_epoch,
            "split": split,
            **extra,
        },
        tmp,
    )
    tmp.replace(path)  # a checkpoint that exists is complete


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Standardiser, dict]:
    """Rebuild a trained model from ``checkpoint.pt``; returns (model in eval mode, standardiser, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model checkpoint; run `wsimil train` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = create_mil(ckpt["model_name"], ckpt["in_dim"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, Standardiser(ckpt["feature_mean"], ckpt["feature_std"]), ckpt


METRIC_COLUMNS = ["accuracy", "precision", "recall", "f1", "auc"]


def make_folds(
    bags: list[Bag], cfg: TrainConfig, *, split_values: dict[str, str] | None = None
) -> list[Fold]:
    """The folds of ``cfg.protocol``: one holdout split, one fixed column split, or repeats x k folds."""
    if cfg.protocol == "cv":
        return kfold_splits(
            bags,
            n_folds=cfg.n_folds,
            n_repeats=cfg.n_repeats,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
    if cfg.protocol == "split_column":
        if split_values is None:
            raise ValueError(
                f"protocol split_column needs a {cfg.split_column!r} column in the manifest"
            )
        return [Fold(0, 0, column_split(bags, split_values))]
    if len(bags) < 4:
        raise ValueError(f"only {len(bags)} bags; need at least 4 to split train/val/test")
    return [
        Fold(
            0,
            0,
            holdout_split(
                bags, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed
            ),
        )
    ]


def summarise_metrics(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over folds of the paper's columns; one row ``mean`` and one ``std``."""
    cols = [c for c in METRIC_COLUMNS if c in per_fold]
    return pd.DataFrame(
        {
            "stat": ["mean", "std"],
            **{c: [per_fold[c].mean(), per_fold[c].std(ddof=0)] for c in cols},
        }
    )


def _same_run(saved: dict, current: dict) -> bool:
    """Whether a fold checkpoint was trained with these settings (more repeats reuse the folds done)."""
    return {k: v for k, v in saved.items() if k != "n_repeats"} == {
        k: v for k, v in current.items() if k != "n_repeats"
    }


def train_bags(
    bags: list[Bag],
    model_dir: str | Path,
    cfg: TrainConfig,
    *,
    encoder: str | None = None,
    split_values: dict[str, str] | None = None,
    memory_budget_gb: float = 8.0,
    console=None,
) -> dict:
    """Run ``cfg.protocol`` on bags: the one code path of slide cohorts and bag tables.

    Writes to ``model_dir``: ``config.yaml``; per fold ``folds/r<repeat>_f<fold>/checkpoint.pt``
    and ``history.csv`` (a fold whose checkpoint exists with the same config, ``n_repeats`` aside,
    is resumed from it, not retrained); ``predictions.csv`` (slide_id, repeat, fold, split, probability, prediction,
    label: test bags of every fold under CV, every bag under holdout/split_column);
    ``metrics.csv`` (test metrics per fold), ``metrics_summary.csv`` (mean and std over folds).
    Holdout and split_column also write ``checkpoint.pt`` (the model the heatmap stage uses).

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
        fold_dir = model_dir / "folds" / f"r{f.repeat}_f{f.fold}"
        ckpt_path = fold_dir / "checkpoint.pt"
        train = [b for b in bags if f.split[b.bag_id] == "train"]
        val = [b for b in bags if f.split[b.bag_id] == "val"]
        resumed = False
        if ckpt_path.is_file():
            model, std, meta = load_checkpoint(ckpt_path)
            resumed = _same_run(meta["config"], cfg.model_dump()) and meta["split"] == f.split
        if not resumed:
            model, std, history, best_epoch = fit(
                train,
                val,
                cfg,
                seed=cfg.seed + 7919 * f.repeat + 101 * f.fold,
                memory_budget_gb=memory_budget_gb,
                console=console,
            )
            fold_dir.mkdir(parents=True, exist_ok=True)
            history.to_csv(fold_dir / "history.csv", index=False)
            save_checkpoint(
                ckpt_path,
                model,
                std,
                cfg,
                encoder=encoder,
                best_epoch=best_epoch,
                split=f.split,
                repeat=f.repeat,
                fold=f.fold,
            )
        else:
            best_epoch = meta["best_epoch"]
        shown = bags if len(folds) == 1 else [b for b in bags if f.split[b.bag_id] == "test"]
        probs, _ = predict_bags(model, BagTensors(shown, std, budget_bytes=0))
        for b, p in zip(shown, probs, strict=True):
            pred_rows.append(
                {
                    "slide_id": b.bag_id,
                    "repeat": f.repeat,
                    "fold": f.fold,
                    "split": f.split[b.bag_id],
                    "probability": float(p),
                    "prediction": int(p >= 0.5),
                    "label": b.label,
                }
            )
        test = [
            (b.label, p) for b, p in zip(shown, probs, strict=True) if f.split[b.bag_id] == "test"
        ]
        m = binary_metrics(np.array([t[0] for t in test]), np.array([t[1] for t in test]))
        fold_metrics.append(
            {"repeat": f.repeat, "fold": f.fold, **m, "best_epoch": best_epoch, "resumed": resumed}
        )
        if console is not None:
            console.print(
                f"repeat {f.repeat} fold {f.fold}: test accuracy {m['accuracy']:.3f} AUC {m['auc']:.3f} (best epoch {best_epoch}{', resumed' if resumed else ''})"
            )
        if len(folds) == 1:
            save_checkpoint(
                model_dir / "checkpoint.pt",
                model,
                std,
                cfg,
                encoder=encoder,
                best_epoch=best_epoch,
                split=f.split,
            )
            pd.DataFrame(history if not resumed else []).to_csv(
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
    return out


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
    from .embed import encoder_dir_name

    out_dir = Path(out_dir)
    if cfg.label_column not in manifest.columns:
        raise ValueError(f"manifest has no label column {cfg.label_column!r}")
    bags, skipped = load_slide_bags(
        manifest,
        out_dir / "features" / encoder_dir_name(encoder),
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
        out_dir / "models" / cfg.name,
        cfg,
        encoder=encoder,
        split_values=split_values,
        memory_budget_gb=memory_budget_gb,
        console=console,
    )
    return {**res, "skipped": skipped}


def run_train_table(
    table: str | Path, model_dir: str | Path, cfg: TrainConfig, *, console=None
) -> dict:
    """Train on a MIL bag table (CSV: label, bag id, features...); write ``model_dir`` (see :func:`train_bags`)."""
    return train_bags(read_mil_table(table), model_dir, cfg, encoder=None, console=console)
