"""Metrics a reviewer accepts: point estimates with stratified bootstrap 95% intervals over
cases, calibration, and the ROC and reliability plots.

Used by ``wsimil train`` (the pooled test predictions of its folds) and ``wsimil predict``
(external validation, any cohort with labels). Two classes: AUC, balanced accuracy, F1,
sensitivity, specificity and accuracy at the model's threshold. Three or more: macro
one-vs-rest AUC, balanced accuracy, macro F1, accuracy and the confusion matrix; calibration
of the predicted class's probability (top-label).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .store import atomic_output

METRICS = ("auc", "balanced_accuracy", "f1", "sensitivity", "specificity", "accuracy")
MULTICLASS_METRICS = ("auc", "balanced_accuracy", "f1", "accuracy")


def multiclass_metrics(y: np.ndarray, p: np.ndarray, **_) -> dict[str, float]:
    """Macro one-vs-rest AUC (NaN unless every class is present), balanced accuracy (mean
    recall of the classes present), macro F1 and accuracy for class indices ``y`` (K,) and
    probabilities ``p`` (K, C)."""
    from .cv import class_metrics

    m = class_metrics(y, p)
    return {k: m[k] for k in MULTICLASS_METRICS}


def confusion(y: np.ndarray, p: np.ndarray) -> list[list[int]]:
    """Confusion matrix (C, C): rows true class, columns predicted (most probable) class."""
    c = p.shape[1]
    out = np.zeros((c, c), dtype=int)
    np.add.at(out, (np.asarray(y, int), p.argmax(axis=1)), 1)
    return out.tolist()


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


def _top_label(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary (y, p) -> itself; (K, C) probabilities -> (predicted class correct, its probability)."""
    p = np.asarray(p, float)
    if p.ndim == 1:
        return np.asarray(y, float), p
    if p.shape[1] == 2:
        return np.asarray(y, float), p[:, 1]
    return (p.argmax(axis=1) == np.asarray(y)).astype(float), p.max(axis=1)


def _binary_metrics_matrix(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """:func:`point_metrics` of each row of (B, n) labels and probabilities, vectorised (AUC
    from average ranks, the Mann-Whitney statistic, as ``roc_auc_score`` computes it)."""
    from scipy.stats import rankdata

    pred = p >= threshold
    pos, neg = y == 1, y == 0
    tp, fn = (pred & pos).sum(1), (~pred & pos).sum(1)
    tn, fp = (~pred & neg).sum(1), (pred & neg).sum(1)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        spec = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
        f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        u = (rankdata(p, axis=1) * pos).sum(1) - n_pos * (n_pos + 1) / 2
        auc = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return {"auc": auc, "balanced_accuracy": (sens + spec) / 2, "f1": f1, "sensitivity": sens,
            "specificity": spec, "accuracy": (tp + tn) / y.shape[1]}  # fmt: skip


def expected_calibration_error(y: np.ndarray, p: np.ndarray, *, bins: int = 10) -> float:
    """Mean |observed rate - mean probability| over equal-width bins, weighted by their counts
    (3+ classes: of the predicted class's probability and whether it is right)."""
    y, p = _top_label(y, p)
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
    """Percentile intervals of :func:`point_metrics` (``p`` (K,)) or :func:`multiclass_metrics`
    (``p`` (K, C)), resampling cases within each class.

    Slides of one case (``groups``) are drawn together; the cases of each class are resampled
    separately so every replicate keeps the cohort's class balance (a case's class is its
    highest slide label).

    Returns
    -------
    dict metric -> (low, high); NaN where a metric is undefined in too many replicates.
    """
    y, p, groups = np.asarray(y).astype(int), np.asarray(p, float), np.asarray(groups)
    binary = p.ndim == 1
    score, names = (point_metrics, METRICS) if binary else (multiclass_metrics, MULTICLASS_METRICS)
    cases, inverse = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(cases))]
    case_y = np.array([y[r].max() for r in rows_of])
    by_class = [np.flatnonzero(case_y == c) for c in np.unique(case_y)]
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in names}
    picks = [np.concatenate([rng.choice(c, size=len(c), replace=True) for c in by_class if len(c)])
             for _ in range(n_boot)]  # fmt: skip
    if binary and all(len(r) == 1 for r in rows_of):  # one slide per case: all at once
        rows = np.array([r[0] for r in rows_of])[np.stack(picks)]  # (n_boot, n)
        draws = _binary_metrics_matrix(y[rows], p[rows], threshold)
    else:
        for picked in picks:
            rows = np.concatenate([rows_of[i] for i in picked])
            m = score(y[rows], p[rows], threshold=threshold)
            for k in names:
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


def evaluate(y, p, groups, *, classes=None, threshold: float | None = 0.5, n_boot: int = 1000,
             seed: int = 0) -> dict:  # fmt: skip
    """Point metrics, their 95% intervals, ECE and counts, as one JSON-friendly dict.

    ``y``: class indices (K,); ``p``: the positive class's probability (K,), or class
    probabilities (K, C) (two columns: binary). ``classes`` names them (default 0, 1).
    """
    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    classes = [str(c) for c in (classes or ["0", "1"])]
    threshold = 0.5 if threshold is None else threshold
    binary = p.ndim == 1
    point = (point_metrics if binary else multiclass_metrics)(y, p, threshold=threshold)
    ci = bootstrap_intervals(y, p, groups, threshold=threshold, n_boot=n_boot, seed=seed)
    out = {
        "n_slides": int(len(y)),
        "n_cases": int(len(np.unique(groups))),
        "classes": classes,
        "n_per_class": np.bincount(y, minlength=len(classes)).tolist(),
        "n_positive": int(np.sum(y == 1)) if binary else None,
        "threshold": threshold if binary else None,
        "metrics": {k: {"value": point[k], "ci95": list(ci[k])} for k in point},
        "ece": expected_calibration_error(y, p),
        "bootstrap": {"replicates": n_boot, "seed": seed, "unit": "case, within class"},
    }
    if not binary:
        out["confusion_matrix"] = {"rows": "true class", "columns": "predicted class",
                                   "counts": confusion(y, p)}  # fmt: skip
        out["averaging"] = "macro over classes; AUC one-vs-rest"
    return out


def plot_roc_and_calibration(y, p, out_dir: Path, *, title: str, classes=None) -> list[Path]:
    """``roc.png`` and ``calibration.png`` (reliability diagram, 10 bins) in ``out_dir``.

    ``p``: (K,) positive-class probabilities or (K, C) class probabilities; 3+ classes draw one
    one-vs-rest ROC curve per class and the calibration of the predicted class's probability.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y, p = np.asarray(y).astype(int), np.asarray(p, float)
    if p.ndim == 2 and p.shape[1] == 2:
        p = p[:, 1]
    names = [str(c) for c in (classes or range(1 if p.ndim == 1 else p.shape[1]))]
    paths = []
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    curves = [(None, y, p)] if p.ndim == 1 else [(n, y == k, p[:, k]) for k, n in enumerate(names)]
    for name, yk, pk in curves:
        if len(set(np.asarray(yk, int).tolist())) == 2:
            fpr, tpr, _ = roc_curve(np.asarray(yk, int), pk)
            ax.plot(fpr, tpr, lw=2, label=None if name is None else f"{name} vs rest")
    if p.ndim == 2:
        ax.legend(fontsize=7, loc="lower right")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC: {title}")
    paths.append(Path(out_dir) / "roc.png")
    with atomic_output(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    hit, conf = _top_label(y, p)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    edges = np.linspace(0, 1, 11)
    idx = np.minimum((conf * 10).astype(int), 9)
    mids = [conf[idx == b].mean() for b in range(10) if (idx == b).any()]
    rates = [hit[idx == b].mean() for b in range(10) if (idx == b).any()]
    ax.plot(mids, rates, "o-", lw=2)
    ax.plot(edges, edges, "k--", lw=0.8)
    xlabel, ylabel = (("mean predicted probability", "observed positive rate") if p.ndim == 1
                      else ("probability of the predicted class", "share predicted right"))  # fmt: skip
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"calibration: {title}", xlim=(0, 1), ylim=(0, 1))
    paths.append(Path(out_dir) / "calibration.png")
    with atomic_output(paths[-1]) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return paths
