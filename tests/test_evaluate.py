"""External-validation metrics: point values agree with scikit-learn, intervals cover them."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from wsimil.evaluate import (
    bootstrap_intervals,
    evaluate,
    expected_calibration_error,
    point_metrics,
)
from wsimil.train_results import pooled_test_metrics


def _cohort(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    groups = np.array([f"case{i // 2}" for i in range(n)])  # two slides per case
    y[1::2] = y[::2]  # a case's slides share the label
    return y, p, groups


def test_point_metrics_match_scikit_learn():
    y, p, _ = _cohort()
    m = point_metrics(y, p, threshold=0.5)
    pred = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["sensitivity"] == pytest.approx(pred[y == 1].mean())
    assert m["specificity"] == pytest.approx(1 - pred[y == 0].mean())


def test_bootstrap_intervals_cover_the_estimate_and_narrow_with_more_cases():
    y, p, g = _cohort(60)
    small = bootstrap_intervals(y, p, g, n_boot=300, seed=1)
    y2, p2, g2 = _cohort(600)
    big = bootstrap_intervals(y2, p2, g2, n_boot=300, seed=1)
    for k in ("auc", "balanced_accuracy", "sensitivity"):
        lo, hi = small[k]
        assert lo <= point_metrics(y, p)[k] <= hi
        assert big[k][1] - big[k][0] < hi - lo
    assert bootstrap_intervals(y, p, g, n_boot=300, seed=1) == small  # seeded


def test_calibration_error_is_zero_for_calibrated_and_large_for_overconfident():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = (rng.uniform(0, 1, 20000) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    assert expected_calibration_error(y, np.round(p)) > 0.2
    report = evaluate(y[:200], p[:200], np.arange(200), n_boot=50)
    assert report["n_cases"] == 200 and set(report["metrics"]["auc"]) == {"value", "ci95"}


def test_pooled_test_metrics_take_each_bag_once_from_the_first_repeat():
    from types import SimpleNamespace

    y, p, g = _cohort(40)
    bags = [SimpleNamespace(bag_id=f"s{i}", group=g[i]) for i in range(40)]
    rows = [
        {
            "slide_id": f"s{i}",
            "repeat": r,
            "split": "test",
            "_y": int(y[i]),
            "_p": np.array([1 - p[i], p[i]] if r == 0 else [p[i], 1 - p[i]]),
        }
        for r in (0, 1)
        for i in range(40)
    ]
    rows += [{"slide_id": "s0", "repeat": 0, "split": "train", "_y": 1, "_p": np.array([1.0, 0.0])}]
    pooled = pooled_test_metrics(rows, bags, ["0", "1"], threshold=0.5, n_boot=100)
    assert pooled["n_slides"] == 40 and pooled["n_cases"] == 20
    assert pooled["metrics"]["auc"]["value"] == pytest.approx(point_metrics(y, p)["auc"])
    assert pooled_test_metrics(rows[:1], bags, ["0", "1"], threshold=0.5) is None  # one class
