"""Evaluation protocols: holdout, repeated stratified group k-fold with an inner validation
split, or a fixed split column; and the metrics reported per fold.

Splits are over groups (``Bag.group``: the case/patient), so the slides of one case never
straddle train and test, nor train and validation. Everything is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import TrainConfig


@dataclass
class Fold:
    """One train/val/test assignment: ``split`` maps bag_id -> "train" | "val" | "test"."""

    repeat: int
    fold: int
    split: dict[str, str]


def _group_labels(bags) -> tuple[list[str], np.ndarray]:
    groups = sorted({b.group for b in bags})
    lab = dict.fromkeys(groups, 0)
    for b in bags:
        lab[b.group] = max(lab[b.group], int(b.label))
    return groups, np.array([lab[g] for g in groups])


def _take(
    pool: list[str], y: np.ndarray, fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    from sklearn.model_selection import train_test_split

    if fraction == 0:
        return list(pool), []
    try:  # stratified when every class has enough groups, plain otherwise (tiny cohorts)
        return train_test_split(pool, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:
        return train_test_split(pool, test_size=fraction, random_state=seed)


def kfold_splits(
    bags, *, n_folds: int, n_repeats: int, val_fraction: float, seed: int
) -> list[Fold]:
    """Stratified k-fold over groups, repeated with reshuffles; a validation split inside each training fold.

    Parameters
    ----------
    bags : list of Bag
    n_folds, n_repeats : int
        ``n_repeats`` x ``n_folds`` folds; every group is in the test part of exactly one
        fold per repeat.
    val_fraction : float
        Share of each training fold's groups held out for early stopping (0: none).
    seed : int

    Returns
    -------
    list of Fold
    """
    from sklearn.model_selection import StratifiedKFold

    groups, y = _group_labels(bags)
    per_class = np.bincount(y, minlength=max(2, int(y.max()) + 1))
    if min(per_class) < n_folds:
        raise ValueError(
            f"{len(groups)} cases with {per_class.tolist()} per class: too few for {n_folds} stratified folds; lower n_folds"
        )
    garr = np.array(groups)
    folds = []
    for r in range(n_repeats):
        skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed + 1000 * r)
        for k, (tr, te) in enumerate(skf.split(garr, y)):
            g_train, g_val = _take(garr[tr].tolist(), y[tr], val_fraction, seed + 1000 * r + k + 1)
            where = {
                **dict.fromkeys(g_train, "train"),
                **dict.fromkeys(g_val, "val"),
                **dict.fromkeys(garr[te].tolist(), "test"),
            }
            folds.append(Fold(r, k, {b.bag_id: where[b.group] for b in bags}))
    return folds


def holdout_split(bags, *, test_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """Seeded train/val/test split, stratified by label, grouped by ``Bag.group``.

    Returns
    -------
    dict bag_id -> "train" | "val" | "test"
    """
    groups, y = _group_labels(bags)
    g_trainval, g_test = _take(groups, y, test_fraction, seed)
    ytv = np.array([y[groups.index(g)] for g in g_trainval])
    g_train, g_val = _take(g_trainval, ytv, val_fraction, seed + 1)
    where = {
        **dict.fromkeys(g_train, "train"),
        **dict.fromkeys(g_val, "val"),
        **dict.fromkeys(g_test, "test"),
    }
    return {b.bag_id: where[b.group] for b in bags}


def column_split(bags, values: dict[str, str]) -> dict[str, str]:
    """A fixed split from a manifest column (bag_id -> train/val/test); refuses other values and split cases."""
    out = {}
    for b in bags:
        v = str(values.get(b.bag_id, "")).strip().lower()
        if v not in ("train", "val", "test"):
            raise ValueError(
                f"slide {b.bag_id}: split value {values.get(b.bag_id)!r}; use train, val or test"
            )
        out[b.bag_id] = v
    by_group: dict[str, set] = {}
    for b in bags:
        by_group.setdefault(b.group, set()).add(out[b.bag_id])
    bad = [g for g, s in by_group.items() if len(s) > 1]
    if bad:
        raise ValueError(
            f"case {bad[0]} has slides in {sorted(by_group[bad[0]])}; a case must stay in one split"
        )
    return out


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


def class_metrics(labels: np.ndarray, probs: np.ndarray, *, threshold: float = 0.5) -> dict:
    """Per-fold test metrics from class indices (K,) and class probabilities (K, C).

    Two classes: :func:`binary_metrics` of the positive class (the paper's columns). Three or
    more: accuracy, balanced accuracy, macro F1 and macro one-vs-rest ROC AUC (NaN unless
    every class is present).
    """
    probs = np.asarray(probs, dtype=float).reshape(len(labels), -1)
    if probs.shape[1] == 2:
        return binary_metrics(labels, probs[:, 1], threshold)
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    labels = np.asarray(labels).astype(int)
    pred = probs.argmax(axis=1)
    every = len(labels) and set(labels.tolist()) == set(range(probs.shape[1]))
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)) if len(labels) else float("nan"),
        "f1": float(f1_score(labels, pred, average="macro", labels=range(probs.shape[1]), zero_division=0)),
        "auc": float(roc_auc_score(labels, probs, multi_class="ovr", average="macro")) if every else float("nan"),
    }  # fmt: skip


#: binary columns (the paper's); 3+ classes report accuracy, balanced_accuracy, f1 and auc (macro)
METRIC_COLUMNS = ["accuracy", "precision", "recall", "f1", "auc"]
SUMMARY_COLUMNS = ["accuracy", "balanced_accuracy", "precision", "recall", "f1", "auc"]


def make_folds(
    bags: list, cfg: TrainConfig, *, split_values: dict[str, str] | None = None
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
    """Mean and std over folds of the metric columns; one row ``mean`` and one ``std``."""
    cols = [c for c in SUMMARY_COLUMNS if c in per_fold]
    return pd.DataFrame(
        {
            "stat": ["mean", "std"],
            **{c: [per_fold[c].mean(), per_fold[c].std(ddof=0)] for c in cols},
        }
    )
