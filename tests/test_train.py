"""Training: splits that respect cases, metrics, and learning a real MIL signal."""

import os

import numpy as np
import pytest
import torch

from wsimil.config import TrainConfig
from wsimil.cv import holdout_split as split_bags
from wsimil.train import Bag, Standardiser, binary_metrics, fit, predict_bags


def make_bags(n_bags, *, d=16, seed=0, n_inst=(20, 40)):
    """Positive bags hold a few 'key' instances shifted along one direction."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(d, np.float32)
    direction[:4] = 3.0
    bags, keys = [], []
    for i in range(n_bags):
        n = int(rng.integers(*n_inst))
        x = rng.normal(size=(n, d)).astype(np.float32)
        label = i % 2
        key = np.zeros(n, bool)
        if label:
            key[rng.choice(n, 3, replace=False)] = True
            x[key] += direction
        bags.append(Bag(f"b{i:03d}", x, label, f"case{i // 2:03d}"))
        keys.append(key)
    return bags, keys


def test_split_is_seeded_stratified_and_keeps_cases_together():
    bags, _ = make_bags(40)
    s1 = split_bags(bags, test_fraction=0.3, val_fraction=0.2, seed=1)
    assert s1 == split_bags(bags, test_fraction=0.3, val_fraction=0.2, seed=1)
    assert s1 != split_bags(bags, test_fraction=0.3, val_fraction=0.2, seed=2)
    by_case = {}
    for b in bags:
        by_case.setdefault(b.group, set()).add(s1[b.bag_id])
    assert all(len(v) == 1 for v in by_case.values())  # a case never straddles two splits
    test = [b for b in bags if s1[b.bag_id] == "test"]
    assert 10 <= len(test) <= 14
    assert 0 < sum(b.label for b in test) < len(test)


def test_metrics_match_hand_computed_values():
    m = binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["auc"] == pytest.approx(0.75)
    assert np.isnan(binary_metrics(np.array([1, 1]), np.array([0.2, 0.9]))["auc"])


def test_standardiser_uses_training_statistics_only():
    bags, _ = make_bags(6)
    std = Standardiser.fit(bags[:4])
    allx = np.concatenate([b.features for b in bags[:4]])
    z = np.concatenate([std(b.features).numpy() for b in bags[:4]])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(std.mean, allx.mean(0), rtol=1e-5)


@pytest.mark.parametrize("model", ["gated_attention", "attention"])
def test_attention_mil_learns_bag_labels_and_finds_the_key_instances(model):
    bags, keys = make_bags(80, seed=3)
    train, val, test = bags[:48], bags[48:60], bags[60:]
    cfg = TrainConfig(
        model=model, epochs=30, patience=10, hidden_dim=32, attention_dim=16, lr=1e-3, seed=0
    )
    net, std, history, best = fit(train, val, cfg)
    assert len(history) >= 1 and 1 <= best <= len(history)
    probs, outs = predict_bags(net, [std(b.features) for b in test])
    labels = np.array([b.label for b in test])
    assert probs.shape == (len(test), 2)  # two classes: [1 - p, p]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert binary_metrics(labels, probs[:, 1])["auc"] >= 0.95
    # On positive test bags the highest attention falls on a key instance.
    hits = [
        keys[60 + i][int(torch.argmax(o.attention[0]))]
        for i, o in enumerate(outs)
        if labels[i] == 1
    ]
    assert np.mean(hits) >= 0.8


def test_max_instances_subsamples_training_steps_only(monkeypatch):
    import wsimil.fit as tr

    bags, _ = make_bags(12, seed=5, n_inst=(30, 40))
    seen = {"train": [], "eval": []}
    build = tr.build_model

    def spy(cfg, in_dim, n_classes=2, **kw):  # record the bag length every pass of f sees
        m = build(cfg, in_dim, n_classes, **kw)
        m.f.register_forward_hook(
            lambda mod, i, o: seen["train" if mod.training else "eval"].append(i[0].shape[1])
        )
        return m

    monkeypatch.setattr(tr, "build_model", spy)
    cfg = TrainConfig(
        model="attention",
        epochs=2,
        patience=2,
        hidden_dim=8,
        attention_dim=4,
        max_instances=7,
        seed=0,
    )
    net, std, _, _ = fit(bags[:8], bags[8:], cfg)
    assert set(seen["train"]) == {7}  # every training step saw 7 instances
    assert set(seen["eval"]) == {
        len(b.features) for b in bags[8:]
    }  # validation sees every instance
    _, outs = predict_bags(net, [std(b.features) for b in bags[8:]])
    assert [o.attention.shape[1] for o in outs] == [len(b.features) for b in bags[8:]]


def test_bags_over_the_memory_budget_are_read_from_their_stores_with_the_same_result(tmp_path):
    """Zarr-backed bags (cohorts over budget) train and predict exactly like bags in memory."""
    import zarr

    from wsimil.bags import BagTensors

    torch.set_num_threads(1)
    bags, _ = make_bags(14, seed=3)
    stored = []
    for b in bags:
        arr = zarr.create_array(
            str(tmp_path / f"{b.bag_id}.zarr"),
            shape=b.features.shape,
            dtype="float32",
            chunks=(16, b.features.shape[1]),
        )
        arr[...] = b.features
        stored.append(
            Bag(
                b.bag_id,
                zarr.open_array(str(tmp_path / f"{b.bag_id}.zarr"), mode="r"),
                b.label,
                b.group,
            )
        )
    cfg = TrainConfig(
        model="gated_attention",
        epochs=3,
        patience=3,
        hidden_dim=8,
        attention_dim=4,
        max_instances=25,
        seed=1,
    )
    net_a, std_a, hist_a, _ = fit(bags[:10], bags[10:], cfg)
    budget_gb = sum(b.features.nbytes for b in bags[:5]) / 2**30  # about a third of the bags fit
    net_b, std_b, hist_b, _ = fit(stored[:10], stored[10:], cfg, memory_budget_gb=budget_gb)
    np.testing.assert_allclose(std_a.mean, std_b.mean, rtol=1e-6)
    np.testing.assert_allclose(hist_a.train_loss, hist_b.train_loss, rtol=1e-5)
    tensors = BagTensors(stored[10:], std_b, budget_bytes=0)
    assert tensors.n_streamed == 4 and not tensors.cached  # nothing held: all read on use
    pa, _ = predict_bags(net_a, [std_a(b.features) for b in bags[10:]])
    pb, _ = predict_bags(net_b, tensors)
    np.testing.assert_allclose(pa, pb, rtol=1e-5)
    order = [3, 0, 2, 1, 3]
    assert [i for i, _ in tensors.items(order)] == order  # read-ahead keeps the order asked for
    for i, x in tensors.items(order):
        np.testing.assert_array_equal(x.numpy(), std_b(bags[10 + i].features).numpy())


def test_small_heads_train_on_one_thread_and_the_process_keeps_its_threads():
    from wsimil.devices import train_threads

    small, _ = make_bags(8)
    big = [Bag("big", np.zeros((20_000, 64), np.float32), 1, "c")]
    cores = len(os.sched_getaffinity(0))
    assert train_threads(TrainConfig(), small) == 1
    assert train_threads(TrainConfig(), big) == cores
    assert train_threads(TrainConfig(max_instances=1000), big) == 1  # 1000 x 64 per step
    assert train_threads(TrainConfig(threads=3), small) == 3
    torch.set_num_threads(2)
    fit(small[:6], small[6:], TrainConfig(epochs=1, hidden_dim=8, attention_dim=4))
    assert torch.get_num_threads() == 2  # training on 1 thread left the process's setting alone


def test_training_flushes_denormals_and_gives_the_process_its_setting_back(monkeypatch):
    import wsimil.fit as fit_module

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = []
    build = fit_module.build_model

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda m, x: seen.append(float(torch.tensor([1e-39]) * 1.0))
        )
        return model

    monkeypatch.setattr(fit_module, "build_model", spy)
    small, _ = make_bags(8)
    fit(small[:6], small[6:], TrainConfig(epochs=1, hidden_dim=8, attention_dim=4))
    assert seen and set(seen) == {0.0}  # a denormal is zero while training
    assert float(torch.tensor([1e-39]) * 1.0) > 0  # and representable again afterwards


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_train_on_cuda_without_a_gpu_is_one_line(tmp_path):
    from click.testing import CliRunner

    from wsimil.cli import main

    rows = [f"{i % 2},b{i},{0.1 * i},{0.5 * (i % 2)}" for i in range(12)]
    (tmp_path / "bags.csv").write_text("\n".join(rows) + "\n")
    args = ["train", tmp_path / "run", "--bags", tmp_path / "bags.csv", "--device", "cuda"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1
    assert r.output.strip() == (
        "Error: --device cuda: no CUDA device is visible; use --device cpu or auto"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_gpu_training_give_the_same_predictions():
    bags, _ = make_bags(40, d=16, seed=3)
    cfg = TrainConfig(epochs=8, hidden_dim=16, attention_dim=8, dropout=0.0, seed=0)
    runs = {}
    for device in ("cpu", "cuda"):
        model, std, _, _ = fit(bags[:30], bags[30:], cfg.model_copy(update={"device": device}))
        assert next(model.parameters()).device.type == "cpu"  # returned on the CPU either way
        runs[device] = predict_bags(model, [std(b.features) for b in bags])[0]
    np.testing.assert_allclose(runs["cpu"], runs["cuda"], atol=2e-3)
