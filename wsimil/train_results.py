"""What a training run reports besides its models: prediction rows, per-fold and pooled test
metrics, the decision threshold chosen on training slides, and the model card.

Used by :func:`wsimil.train.train_bags`; the functions here read trained models and bags and
write ``predictions.csv``, ``metrics*.csv``, ``metrics_pooled.json``, ``roc.png``,
``calibration.png`` and ``card.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .bags import Bag, BagTensors
from .classes import class_value, decide
from .cv import Fold, class_metrics, summarise_metrics
from .fit import predict_bags
from .store import write_text_atomic


def check_classes(bags: list[Bag], classes: list[str], source) -> None:
    """Every class has two bags or more (a one-slide class is most often a typo)."""
    counts = np.bincount([b.label for b in bags], minlength=len(classes))
    if max(b.label for b in bags) >= len(classes):
        raise ValueError(f"{source}: a bag label is not an index into the classes {classes}")
    thin = [f"{c!r} ({n})" for c, n in zip(classes, counts, strict=True) if n < 2]
    if thin:
        raise ValueError(
            f"{source}: class(es) {', '.join(thin)} with fewer than 2 slides among {classes}; "
            "fix the labels, or set train.classes and label at least two slides of each"
        )


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 on (y, p); 0.5 with one class.

    Ties go to the threshold nearest 0.5. The value lies strictly inside (0, 1).
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(int)
    if len(set(y.tolist())) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, np.asarray(p, float))
    thr = np.clip(thr, 1e-6, 1 - 1e-6)  # the first threshold is inf: nothing positive
    j = tpr - fpr
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(thr[best[np.argmin(np.abs(thr[best] - 0.5))]])


def fold_threshold(model, std, fold: Fold, bags: list[Bag], cfg, n_classes: int) -> float | None:
    """The fold model's binary threshold: ``cfg.threshold``, or Youden's on its training and
    validation slides (never its test slides). None for three or more classes."""
    if n_classes > 2:
        return None
    if cfg.threshold != "youden":
        return float(cfg.threshold)
    seen = [b for b in bags if fold.split[b.bag_id] in ("train", "val")]
    probs, _ = predict_bags(model, BagTensors(seen, std, budget_bytes=0))
    return youden_threshold(np.array([b.label for b in seen]), probs[:, 1])


def prediction_rows(
    model, std, fold: Fold, shown: list[Bag], classes: list[str], threshold: float | None
) -> tuple[list[dict], dict]:
    """Prediction rows of the ``shown`` bags and the fold's test metrics.

    A row: slide_id, repeat, fold, split, probability (binary: of the positive class; else of
    the predicted class), prediction and label (class names; integers for integer classes),
    ``p_<class>`` per class for three or more classes, and private ``_y`` (class index) and
    ``_p`` (class probabilities) for the pooled metrics.
    """
    probs, _ = predict_bags(model, BagTensors(shown, std, budget_bytes=0))
    rows = []
    for b, p in zip(shown, probs, strict=True):
        prob, pred = decide(p, classes, threshold)
        row = {"slide_id": b.bag_id, "repeat": fold.repeat, "fold": fold.fold,
               "split": fold.split[b.bag_id], "probability": prob,
               "prediction": class_value(pred), "label": class_value(classes[b.label])}  # fmt: skip
        if len(classes) > 2:
            row.update({f"p_{c}": float(v) for c, v in zip(classes, p, strict=True)})
        rows.append({**row, "_y": b.label, "_p": p})
    test = [r for r in rows if r["split"] == "test"]
    y = np.array([r["_y"] for r in test], dtype=int)
    p = np.array([r["_p"] for r in test]).reshape(len(test), len(classes))
    return rows, class_metrics(y, p, threshold=0.5 if threshold is None else threshold)


def write_tables(model_dir: Path, pred_rows: list[dict], fold_metrics: list[dict],
                 classes: list[str]) -> dict:  # fmt: skip
    """``predictions.csv``, ``metrics.csv`` and ``metrics_summary.csv``.

    Returns
    -------
    dict: test ``n``, the mean of each metric and its ``*_std`` over folds, ``best_epoch`` (of
    the first fold), ``n_folds``, ``classes``, ``model_dir``.
    """
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in pred_rows]
    pd.DataFrame(public).to_csv(model_dir / "predictions.csv", index=False)
    per_fold = pd.DataFrame(fold_metrics)
    per_fold.to_csv(model_dir / "metrics.csv", index=False)
    summary = summarise_metrics(per_fold)
    summary.to_csv(model_dir / "metrics_summary.csv", index=False)
    out = {"n": int(per_fold["n"].sum()), "best_epoch": int(fold_metrics[0]["best_epoch"]),
           "n_folds": len(fold_metrics), "classes": classes, "model_dir": str(model_dir)}  # fmt: skip
    for c in summary.columns.drop("stat"):
        out[c] = float(summary.loc[0, c])
        out[f"{c}_std"] = float(summary.loc[1, c])
    return out


def pooled_rows(pred_rows: list[dict]) -> list[dict]:
    """The test predictions pooled over the folds: repeat 0, so each bag once."""
    return [r for r in pred_rows if r["split"] == "test" and r.get("repeat", 0) == 0]


def pooled_test_metrics(pred_rows: list[dict], bags: list[Bag], classes: list[str], *,
                        threshold: float | None, n_boot: int = 1000) -> dict | None:  # fmt: skip
    """Metrics over the test predictions pooled across folds (repeat 0: each bag once), with
    stratified case-bootstrap 95% intervals (:func:`wsimil.evaluate.evaluate`); None when the
    test bags lack a class."""
    from .evaluate import evaluate

    group = {b.bag_id: b.group for b in bags}
    rows = pooled_rows(pred_rows)
    y = np.array([r["_y"] for r in rows], dtype=int)
    if len(set(y.tolist())) < 2:
        return None
    p = np.array([r["_p"] for r in rows]).reshape(len(rows), len(classes))
    g = np.array([str(group[r["slide_id"]]) for r in rows])
    return evaluate(y, p, g, classes=classes, threshold=threshold, n_boot=n_boot)


def write_card_and_plots(model_dir: Path, folds, cfg, bags, classes, thresholds, pred_rows,
                         out: dict, *, features, training, refit=None) -> None:  # fmt: skip
    """The deployable model's card (the single model, after CV the ensemble of the fold
    models or, with ``refit`` (its epochs and threshold), the model trained on every bag;
    written last) with the test metrics, the pooled test metrics with intervals
    (``metrics_pooled.json``) and their ROC and calibration plots."""
    from .deploy import write_card
    from .evaluate import plot_roc_and_calibration

    threshold = None if len(classes) > 2 else float(np.median(thresholds))
    metrics = {k: v for k, v in out.items() if k != "model_dir"}
    pooled = pooled_test_metrics(pred_rows, bags, classes, threshold=threshold)
    if pooled is not None:
        write_text_atomic(model_dir / "metrics_pooled.json", json.dumps(pooled, indent=1) + "\n")
        metrics["pooled_test"] = pooled
        rows = pooled_rows(pred_rows)
        plot_roc_and_calibration(
            np.array([r["_y"] for r in rows]), np.array([r["_p"] for r in rows]), model_dir,
            title=f"{cfg.name} ({'pooled folds' if len(folds) > 1 else 'test'})", classes=classes,
        )  # fmt: skip
    members = ["."] if len(folds) == 1 else [f"folds/r{f.repeat}_f{f.fold}" for f in folds]
    training = {**(training or {})}
    if refit is not None:  # deployed: the refit model; the metrics stay those of the folds
        members, thresholds = ["."], [refit["threshold"]]
        threshold = refit["threshold"]
        training["refit"] = {"epochs": refit["epochs"], "rule": "median best epoch of the folds"}
    decision = {"threshold": threshold, "threshold_rule": cfg.threshold if threshold is not None
                else "most probable class"}  # fmt: skip
    if threshold is not None and len(thresholds) > 1:
        decision["member_thresholds"] = [float(t) for t in thresholds]
    write_card(
        model_dir, kind="single" if members == ["."] else "ensemble", members=members, cfg=cfg,
        classes=classes, decision=decision, features=features,
        training={**training, "n_bags": len(bags), "protocol": cfg.protocol,
                  "class_counts": np.bincount([b.label for b in bags],
                                              minlength=len(classes)).tolist()},
        metrics=metrics,
    )  # fmt: skip


def fold_summary(fold: Fold, m: dict, best_epoch: int, resumed: bool, threshold) -> str:
    """The console line of one fold's test result."""
    extra = "" if threshold is None or threshold == 0.5 else f", threshold {threshold:.3f}"
    return (
        f"repeat {fold.repeat} fold {fold.fold}: test accuracy {m['accuracy']:.3f} AUC "
        f"{m['auc']:.3f} (best epoch {best_epoch}{', resumed' if resumed else ''}{extra})"
    )
