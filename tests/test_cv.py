"""Protocol: folds without leakage, bag tables, one code path for tables and slides, resume."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from wsimil.bags import Bag, read_mil_table
from wsimil.config import TrainConfig
from wsimil.cv import column_split, kfold_splits
from wsimil.mil import create_mil
from wsimil.train import train_bags

MIL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mil"


def toy_bags(n_cases=30, *, slides_per_case=2, d=8, seed=0):
    """Cases with 1-2 slides each; positive slides hold a few shifted 'key' instances."""
    rng = np.random.default_rng(seed)
    bags = []
    for c in range(n_cases):
        label = c % 2
        for s in range(int(rng.integers(1, slides_per_case + 1))):
            x = rng.normal(size=(int(rng.integers(5, 15)), d)).astype(np.float32)
            if label:
                x[:2, :3] += 3.0
            bags.append(Bag(f"c{c:02d}s{s}", x, label, f"c{c:02d}"))
    return bags


def test_kfold_never_puts_a_case_in_train_and_test_and_covers_each_case_once_per_repeat():
    bags = toy_bags(40)
    folds = kfold_splits(bags, n_folds=5, n_repeats=2, val_fraction=0.2, seed=3)
    assert len(folds) == 10
    assert [f.split for f in folds] == [
        f.split for f in kfold_splits(bags, n_folds=5, n_repeats=2, val_fraction=0.2, seed=3)
    ]
    for f in folds:
        where = {}
        for b in bags:
            where.setdefault(b.group, set()).add(f.split[b.bag_id])
        assert all(len(v) == 1 for v in where.values())  # a case sits in exactly one part
        test_labels = {b.label for b in bags if f.split[b.bag_id] == "test"}
        assert test_labels == {0, 1}  # stratified
        assert {"train", "val", "test"} == set(f.split.values())
    for r in (0, 1):
        tested = [
            b.bag_id for f in folds if f.repeat == r for b in bags if f.split[b.bag_id] == "test"
        ]
        assert sorted(tested) == sorted(b.bag_id for b in bags)
    assert folds[0].split != folds[5].split  # repeats reshuffle


def test_no_validation_split_trains_on_the_whole_training_fold_and_keeps_the_last_epoch(tmp_path):
    bags = toy_bags(20)
    folds = kfold_splits(bags, n_folds=5, n_repeats=1, val_fraction=0.0, seed=0)
    assert all(set(f.split.values()) == {"train", "test"} for f in folds)
    torch.set_num_threads(1)
    cfg = TrainConfig(
        model="attention",
        protocol="cv",
        n_folds=5,
        n_repeats=1,
        val_fraction=0.0,
        epochs=6,
        patience=1,
        hidden_dim=16,
        attention_dim=8,
    )
    train_bags(bags, tmp_path / "m", cfg)
    for hist in sorted((tmp_path / "m" / "folds").glob("*/history.csv")):
        assert (
            len(pd.read_csv(hist)) == 6
        )  # patience is moot without validation bags: all epochs run
    assert (pd.read_csv(tmp_path / "m" / "metrics.csv").best_epoch == 6).all()
    train_bags(
        bags, tmp_path / "m", cfg.model_copy(update={"n_repeats": 2})
    )  # more repeats reuse the folds done
    m = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert m[m.repeat == 0].resumed.all() and not m[m.repeat == 1].resumed.any() and len(m) == 10


def test_too_few_cases_for_the_folds_and_split_cases_are_refused():
    with pytest.raises(ValueError, match="lower n_folds"):
        kfold_splits(toy_bags(6), n_folds=5, n_repeats=1, val_fraction=0.2, seed=0)
    bags = [
        Bag("a", np.zeros((1, 2), np.float32), 0, "p1"),
        Bag("b", np.zeros((1, 2), np.float32), 0, "p1"),
    ]
    with pytest.raises(ValueError, match="case p1"):
        column_split(bags, {"a": "train", "b": "test"})
    with pytest.raises(ValueError, match="slide a"):
        column_split(bags, {"a": "dev", "b": "test"})


def test_bag_table_reader(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("1,7,0.5,1.0\n1,7,0.1,2.0\n0,3,9.0,9.0\n")
    bags = read_mil_table(p)
    assert [(b.bag_id, b.label, b.features.shape) for b in bags] == [
        ("7", 1, (2, 2)),
        ("3", 0, (1, 2)),
    ]
    p.write_text("label,bag,f0\n1,7,0.5\n")
    with pytest.raises(ValueError, match="no header"):
        read_mil_table(p)
    p.write_text("1,7,0.5\n0,7,0.1\n")
    with pytest.raises(ValueError, match="bag 7"):
        read_mil_table(p)


@pytest.mark.skipif(
    not (MIL_DATA / "musk1.csv").is_file(), reason="real MIL data not at ../shared/data/mil"
)
def test_reads_real_musk1():
    bags = read_mil_table(MIL_DATA / "musk1.csv")
    assert len(bags) == 92 and sum(b.label for b in bags) == 47
    assert sum(len(b.features) for b in bags) == 476 and bags[0].features.shape[1] == 166


def test_cv_writes_fold_outputs_and_resumes_from_checkpoints(tmp_path):
    torch.set_num_threads(1)
    bags = toy_bags(24, seed=1)
    cfg = TrainConfig(
        model="attention",
        protocol="cv",
        n_folds=3,
        n_repeats=1,
        epochs=8,
        patience=8,
        hidden_dim=16,
        attention_dim=8,
        lr=3e-3,
    )
    res = train_bags(bags, tmp_path / "m", cfg)
    pred = pd.read_csv(tmp_path / "m" / "predictions.csv")
    assert {"slide_id", "repeat", "fold", "probability", "prediction", "label"} <= set(pred.columns)
    assert sorted(pred.slide_id) == sorted(b.bag_id for b in bags)  # each bag tested once
    assert res["n_folds"] == 3 and res["accuracy"] > 0.6
    summary = pd.read_csv(tmp_path / "m" / "metrics_summary.csv")
    assert list(summary.columns) == ["stat", "accuracy", "precision", "recall", "f1", "auc"]
    ckpts = sorted((tmp_path / "m" / "folds").glob("*/model.safetensors"))
    assert len(ckpts) == 3
    mtimes = [c.stat().st_mtime_ns for c in ckpts]
    again = train_bags(bags, tmp_path / "m", cfg)  # resume: nothing retrained, same predictions
    assert [c.stat().st_mtime_ns for c in ckpts] == mtimes
    assert pd.read_csv(tmp_path / "m" / "metrics.csv").resumed.all()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "m" / "predictions.csv"), pred)
    assert again["accuracy"] == res["accuracy"]
    changed = cfg.model_copy(update={"lr": 1e-3})  # other settings: retrain, never mix
    train_bags(bags, tmp_path / "m", changed)
    assert not pd.read_csv(tmp_path / "m" / "metrics.csv").resumed.any()


def test_cli_trains_on_a_bag_table_through_the_same_path(tmp_path):
    from wsimil.cli import main

    rows = []
    for b in toy_bags(12, slides_per_case=1, seed=2):
        rows += [[b.label, b.bag_id, *x] for x in b.features]
    table = tmp_path / "bags.csv"
    pd.DataFrame(rows).to_csv(table, header=False, index=False)
    r = CliRunner().invoke(
        main,
        [
            "train",
            str(tmp_path / "run"),
            "--bags",
            str(table),
            "--model",
            "gated_attention",
            "--protocol",
            "cv",
            "--folds",
            "3",
            "--epochs",
            "3",
        ],
    )
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "run" / "models" / "gated_attention" / "metrics.csv")) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n")
    r = CliRunner().invoke(main, ["train", str(tmp_path / "run"), "--bags", str(bad)])
    assert r.exit_code != 0 and "bad.csv" in r.output


def test_lenet_instance_transform_for_image_bags():
    torch.manual_seed(0)
    m = create_mil(
        "gated_attention",
        784,
        instance_encoder="lenet",
        hidden_dim=500,
        attention_dim=128,
        dropout=0.0,
    ).eval()
    x = torch.rand(2, 6, 784)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    out = m(x, mask)
    assert out.logits.shape == (2,) and out.attention.shape == (2, 6)
    assert torch.all(out.attention[1, 3:] == 0)
    perm = torch.tensor([2, 0, 1, 5, 4, 3])
    out_p = m(x[:, perm], mask[:, perm])
    torch.testing.assert_close(out_p.logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        m(x[1:, :3]).logits, out.logits[1:], atol=1e-5, rtol=1e-5
    )  # padding ignored


def test_refit_trains_one_model_on_every_bag_for_the_folds_median_best_epoch(tmp_path):
    import json

    from wsimil.deploy import load_model

    bags = toy_bags(24)
    cfg = TrainConfig(protocol="cv", n_folds=3, epochs=12, patience=3, hidden_dim=8,
                      attention_dim=4, lr=1e-3, refit=True, threads=1)  # fmt: skip
    model_dir = tmp_path / "m"
    train_bags(bags, model_dir, cfg)
    card = json.loads((model_dir / "card.json").read_text())
    best = pd.read_csv(model_dir / "metrics.csv").best_epoch
    assert card["kind"] == "single" and card["members"] == ["."]
    assert card["training"]["refit"]["epochs"] == max(1, int(np.median(best)))
    meta = json.loads((model_dir / "model.json").read_text())
    assert set(meta["split"].values()) == {"train"} and len(meta["split"]) == len(bags)
    assert (
        meta["extras"]["refit"] and meta["config"]["epochs"] == card["training"]["refit"]["epochs"]
    )
    history = pd.read_csv(model_dir / "history.csv")
    assert len(history) == card["training"]["refit"]["epochs"]  # no early stop: no validation
    assert "pooled_test" in card["metrics"]  # the metrics stay those of the folds
    predictor = load_model(model_dir)
    assert len(predictor.members) == 1 and predictor.split_of(bags[0].bag_id) == "train"
    # Run again: folds and refit are resumed, nothing is retrained.
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    train_bags(bags, model_dir, cfg)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="use --protocol cv"):
        train_bags(bags, tmp_path / "h", cfg.model_copy(update={"protocol": "holdout"}))
