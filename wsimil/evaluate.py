"""Metrics a reviewer accepts: point estimates with stratified bootstrap 95% intervals over
cases, calibration, and the ROC and reliability plots.

Used by ``wsimil predict`` for external validation (any cohort with labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .store import atomic_output

METRICS = ("auc", "balanced_accuracy", "f1", "sensitivity", "specificity", "accuracy")


def point_metrics(y: np.ndarray, p: np.ndarray, *, threshold: float = 0.5) -> dict[str, float]:
    """AUC, balanced accuracy, F1, sensitivity, specificity, accuracy for binary ``y`` (0/1)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    both = len(set(y.tolist())) == 2
    return {
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "balanced_accuracy": (sens + spec) / 2,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        "sensitivity": sens,
        "specificity": spec,
        "accuracy": (tp + tn) / len(y) if len(y) else float("nan"),
    }


def expected_calibration_error(y: np.ndarray, p: np.ndarray, *, bins: int = 10) -> float:
    """Mean |observed rate - mean probability| over equal-width bins, weighted by their counts."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            err += sel.sum() / len(p) * abs(y[sel].mean() - p[sel].mean())
    return float(err)


def bootstrap_intervals(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, *, threshold: float = 0.5,
    n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Percentile intervals of :func:`point_metrics`, resampling cases within each class.

    Slides of one case (``groups``) are drawn together; positive and negative cases are
    resampled separately so every replicate keeps the cohort's class balance (a case's class
    is its highest slide label).

    Returns
    -------
    dict metric -> (low, high); NaN where a metric is undefined in too many replicates.
    """
    y, p, groups = np.asarray(y).astype(int), np.asarray(p, float), np.asarray(groups)
    cases, inverse = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(cases))]
    case_y = np.array([y[r].max() for r in rows_of])
    by_class = [np.flatnonzero(case_y == c) for c in (0, 1)]
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in METRICS}
    for _ in range(n_boot):
        picked = [rng.choice(c, size=len(c), replace=True) for c in by_class if len(c)]
        rows = np.concatenate([rows_of[i] for i in np.concatenate(picked)])
        m = point_metrics(y[rows], p[rows], threshold=threshold)
        for k in METRICS:
            draws[k].append(m[k])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    out = {}
    for k, v in draws.items():
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]
        ok = len(v) >= 0.9 * n_boot
        out[k] = (
            (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if ok else (np.nan, np.nan)
        )
    return out


def evaluate(y, p, groups, *, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict:
    """Point metrics, their 95% intervals, ECE and counts, as one JSON-friendly dict."""
    point = point_metrics(y, p, threshold=threshold)
    ci = bootstrap_intervals(y, p, groups, threshold=threshold, n_boot=n_boot, seed=seed)
    return {
        "n_slides": int(len(y)),
        "n_cases": int(len(np.unique(groups))),
        "n_positive": int(np.sum(np.asarray(y) == 1)),
        "threshold": threshold,
        "metrics": {k: {"value": point[k], "ci95": list(ci[k])} for k in METRICS},
        "ece": expected_calibration_error(y, p),
        "bootstrap": {"replicates": n_boot, "seed": seed, "unit": "case, within class"},
    }


def plot_roc_and_calibration(y, p, out_dir: Path, *, title: str) -> list[Path]:
    """``roc.png`` and ``calibration.png`` (reliability diagram, 10 bins) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    paths = []
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    if len(set(y.tolist())) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=2)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {title}")
    paths.append(Path(out_dir) / "roc.png")
    with atomic_output(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    edges = np.linspace(0, 1, 11)
    idx = np.minimum((p * 10).astype(int), 9)
    mids = [p[idx == b].mean() for b in range(10) if (idx == b).any()]
    rates = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
    ax.plot(mids, rates, "o-", lw=2)
    ax.plot(edges, edges, "k--", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed positive rate",
           title=f"calibration: {title}", xlim=(0, 1), ylim=(0, 1))  # fmt: skip
    paths.append(Path(out_dir) / "calibration.png")
    with atomic_output(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return paths


def pooled_test_metrics(pred_rows: list[dict], bags: list, *, n_boot: int = 1000) -> dict | None:
    """Metrics over the test predictions pooled across folds (repeat 0: each bag once), with
    stratified case-bootstrap 95% intervals (:func:`wsimil.evaluate.evaluate`); None when the
    test bags lack a class."""
    group = {b.bag_id: b.group for b in bags}
    rows = [r for r in pred_rows if r["split"] == "test" and r.get("repeat", 0) == 0]
    y = np.array([int(r["label"]) for r in rows])
    if len(set(y.tolist())) < 2:
        return None
    p = np.array([float(r["probability"]) for r in rows])
    g = np.array([str(group[r["slide_id"]]) for r in rows])
    return evaluate(y, p, g, n_boot=n_boot)
