"""Three or more classes: label names, softmax heads for every pooling, per-class attention,
macro metrics with a confusion matrix; and the binary decision threshold chosen on training
slides (Youden)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from wsimil.classes import class_set, class_value, decide, label_text
from wsimil.evaluate import evaluate
from wsimil.mil import create_mil, list_mil_models
from wsimil.train_results import youden_threshold

WSIMIL = [sys.executable, "-m", "wsimil.cli"]


def test_label_cells_become_class_names_in_a_stable_order():
    assert [label_text(v) for v in ("1", "1.0", 1.0, 2, " LUAD ", "", None)] == [
        "1", "1", "1", "2", "LUAD", None, None,
    ]  # fmt: skip
    assert class_set(["10", "2", "1", "2"]) == ["1", "2", "10"]  # integers in numeric order
    assert class_set(["LUSC", "LUAD", None]) == ["LUAD", "LUSC"]
    assert class_set(["b"], configured=["b", "a"]) == ["b", "a"]  # the configured order wins
    with pytest.raises(ValueError, match="training needs labels of at least two classes"):
        class_set(["1", "1"])
    with pytest.raises(ValueError, match=r"label\(s\) 'c' not in train.classes"):
        class_set(["a", "c"], configured=["a", "b"])
    assert class_value("1") == 1 and class_value("LUAD") == "LUAD"
    assert decide([0.3, 0.7], ["0", "1"], 0.75) == (0.7, "0")  # binary: the threshold decides
    assert decide([0.2, 0.5, 0.3], ["a", "b", "c"], None) == (0.5, "b")


@pytest.mark.parametrize("name", list_mil_models())
def test_every_pooling_has_a_softmax_head_for_three_classes_and_binary_keeps_one_logit(name):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False  # padding
    binary = create_mil(name, 12, hidden_dim=8, attention_dim=4).eval()
    assert binary(x, mask).logits.shape == (2,)
    assert binary.g[1].out_features == 1  # the paper's models, unchanged
    three = create_mil(name, 12, hidden_dim=8, attention_dim=4, n_classes=3).eval()
    with torch.no_grad():
        out = three(x, mask)
    assert out.logits.shape == (2, 3)
    per_tile = out.attention if out.attention is not None else out.instance_scores
    per_tile = per_tile if per_tile is not None else out.contributions
    assert per_tile.shape == (2, 9) and float(per_tile[1, 6:].abs().sum()) == 0.0
    if out.class_maps is not None:  # the (B, N) map is the most probable class's
        top = out.logits.argmax(dim=1)
        torch.testing.assert_close(per_tile, out.class_maps[torch.arange(2), top])


@pytest.mark.parametrize("name", ["attention", "gated_attention"])
def test_per_class_attention_branches_each_sum_to_one_and_feed_their_own_logit(name):
    torch.manual_seed(0)
    net = create_mil(name, 6, hidden_dim=8, attention_dim=4, n_classes=4, per_class_attention=True)
    net.eval()
    x = torch.randn(1, 7, 6)
    out = net(x)
    assert out.class_maps.shape == (1, 4, 7)
    torch.testing.assert_close(out.class_maps.sum(dim=2), torch.ones(1, 4))
    # Logit c is classifier row c applied to the bag vector pooled with branch c.
    h = net.f(x)
    z = out.class_maps[0] @ h[0]
    expected = (z * net.g[1].weight).sum(-1) + net.g[1].bias
    torch.testing.assert_close(out.logits[0], expected)
    with pytest.raises(ValueError, match="needs an attention pooling .* and three or more classes"):
        create_mil(name, 6, n_classes=2, per_class_attention=True)


def test_macro_metrics_and_the_confusion_matrix_agree_with_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    p = rng.dirichlet([1, 1, 1], 90) + np.eye(3)[y] * 0.8
    p /= p.sum(axis=1, keepdims=True)
    report = evaluate(y, p, np.arange(90).astype(str), classes=["a", "b", "c"], n_boot=100)
    m = report["metrics"]
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert report["confusion_matrix"]["counts"] == confusion_matrix(y, p.argmax(1)).tolist()
    lo, hi = m["auc"]["ci95"]
    assert lo <= m["auc"]["value"] <= hi and report["threshold"] is None


def test_youden_threshold_maximises_sensitivity_plus_specificity():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.35 + 0.2 * y + rng.normal(0, 0.12, 200), 0.01, 0.99)  # positives around 0.55
    t = youden_threshold(y, p)

    def j(th):
        pred = p >= th
        return pred[y == 1].mean() + (~pred)[y == 0].mean() - 1

    grid = np.unique(p)
    assert 0 < t < 1 and j(t) == pytest.approx(max(j(g) for g in grid))
    assert youden_threshold(np.ones(5), p[:5]) == 0.5  # one class: no choice to make


def _three_class_table(path, n=60, seed=0):
    """Bags of 8-dim instances; 'LUAD' and 'LUSC' bags hold key instances in dim 0 or 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["normal", "LUAD", "LUSC"][i % 3]
        x = rng.normal(0, 1, (int(rng.integers(8, 16)), 8))
        if label != "normal":
            x[:3, 0 if label == "LUAD" else 1] += 4.0
        rows += [[label, f"bag{i}", *v] for v in x]
    pd.DataFrame(rows).to_csv(path, header=False, index=False)


def test_a_three_class_bag_table_trains_with_cv_and_reports_macro_auc_and_a_confusion_matrix(
    tmp_path,
):
    table = tmp_path / "three.csv"
    _three_class_table(table)
    run = tmp_path / "run"
    r = subprocess.run(
        [*WSIMIL, "train", str(run), "--bags", str(table), "--protocol", "cv", "--folds", "3",
         "--epochs", "20", "--patience", "20", "--lr", "0.001", "--hidden-dim", "16",
         "--attention-dim", "8", "--per-class-attention", "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    printed = " ".join((r.stdout + r.stderr).split())  # the console wraps long lines
    assert "classes LUAD, LUSC, normal) (F1, AUC: macro): accuracy" in printed
    model = run / "models" / "gated_attention"
    card = json.loads((model / "card.json").read_text())
    assert card["classes"] == ["LUAD", "LUSC", "normal"] and card["kind"] == "ensemble"
    assert card["threshold"] is None and card["training"]["class_counts"] == [20, 20, 20]
    pooled = json.loads((model / "metrics_pooled.json").read_text())
    counts = np.array(pooled["confusion_matrix"]["counts"])
    assert counts.shape == (3, 3) and counts.sum() == 60 and counts.sum(axis=1).tolist() == [20] * 3
    assert pooled["metrics"]["auc"]["value"] > 0.9  # the key instances are easy to find
    pred = pd.read_csv(model / "predictions.csv")
    assert set(pred.label) == {"LUAD", "LUSC", "normal"} and set(pred.prediction) <= set(pred.label)
    assert {"p_LUAD", "p_LUSC", "p_normal"} <= set(pred.columns)
    summary = pd.read_csv(model / "metrics_summary.csv")
    assert {"balanced_accuracy", "auc"} <= set(summary.columns)
    assert (model / "roc.png").stat().st_size > 1000 and (model / "calibration.png").exists()


def test_a_youden_threshold_is_chosen_on_training_slides_and_stated_in_the_card(tmp_path):
    from wsimil.bags import Bag
    from wsimil.config import TrainConfig
    from wsimil.train import train_bags

    rng = np.random.default_rng(0)
    bags = []
    for i in range(24):
        y = i % 2
        x = rng.normal(0, 1, (10, 4)).astype(np.float32)
        x[:2, 0] += 2.5 * y
        bags.append(Bag(f"b{i}", x, y, f"b{i}"))
    cfg = TrainConfig(protocol="cv", n_folds=3, epochs=5, hidden_dim=8, attention_dim=4,
                      threshold="youden", threads=1)  # fmt: skip
    res = train_bags(bags, tmp_path / "m", cfg)
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    members = card["member_thresholds"]
    assert card["threshold_rule"] == "youden" and len(members) == 3
    assert card["threshold"] == pytest.approx(float(np.median(members)))
    assert all(0 < t < 1 for t in members) and res["n_folds"] == 3
    metrics = pd.read_csv(tmp_path / "m" / "metrics.csv")
    np.testing.assert_allclose(metrics.threshold, members)
    # The same folds, asked for 0.5, are resumed, not retrained: only the threshold changes.
    again = train_bags(bags, tmp_path / "m", cfg.model_copy(update={"threshold": 0.5}))
    assert json.loads((tmp_path / "m" / "card.json").read_text())["threshold"] == 0.5
    assert pd.read_csv(tmp_path / "m" / "metrics.csv").resumed.all() and again["n_folds"] == 3


def test_the_cohort_summary_scores_named_binary_and_three_class_records():
    from sklearn.metrics import roc_auc_score

    from wsimil.report import cohort_summary

    def rec(label, probs):
        pred = max(probs, key=probs.get)
        return {"status": "ok", "split": "external", "label": label, "prediction": pred,
                "probability": probs[pred], "probabilities": probs}  # fmt: skip

    named = [rec("benign", {"benign": 0.8, "tumour": 0.2}), rec("tumour", {"benign": 0.3, "tumour": 0.7}),
             rec("tumour", {"benign": 0.6, "tumour": 0.4})]  # fmt: skip
    s = cohort_summary(named, model_name="m")
    assert s["accuracy"] == pytest.approx(2 / 3) and s["auc"] == pytest.approx(1.0)
    three = [rec(c, {k: (0.6 if k == c else 0.2) for k in "abc"}) for c in "abc"]
    three[0]["prediction"] = "b"
    s = cohort_summary(three, model_name="m")
    assert s["accuracy"] == pytest.approx(2 / 3)
    p = [[r["probabilities"][k] for k in "abc"] for r in three]
    assert s["auc"] == pytest.approx(roc_auc_score([0, 1, 2], p, multi_class="ovr"))
