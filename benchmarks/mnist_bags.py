"""MNIST-bags of Ilse et al. (2018): test AUC against the number of training bags.

Usage::

    python benchmarks/mnist_bags.py /work/shared/data/mnist/mnist10k.npz OUT_DIR \
        [--sizes 50,100,150,200,300,400,500] [--repeats 5] [--models attention,gated_attention,...]

A bag holds ~N(10, 2) digits (at least 1); it is positive when it contains a 9. Training and
validation bags are drawn from 6,000 of the file's digits (a fixed random half-split; the file is
sorted by digit), the 1,000 test bags from the 4,000 held-out digits; training bags are balanced (half positive). f is the paper's LeNet-style CNN
(wsimil.mil.LeNetEncoder, 500-d), trained end to end with wsimil.train.fit (early stopping on
a validation split of the training bags). Each finished run is kept as OUT_DIR/runs/*.json (a
re-run skips it; ``--shard I/N`` splits the grid over processes); then writes
OUT_DIR/results.csv (all finished runs) and OUT_DIR/mnist_bags_auc.png; prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from wsimil.bags import Bag
from wsimil.config import TrainConfig
from wsimil.train import binary_metrics, fit, predict_bags


def make_bags(images, labels, n_bags: int, *, target: int = 9, mean_size: float = 10, sd_size: float = 2, balanced: bool, rng) -> list[Bag]:
    """Bags of flattened digits (N, 784) in [0, 1]; label 1 when a ``target`` digit is inside."""
    want = {0: n_bags // 2, 1: n_bags - n_bags // 2} if balanced else None
    bags: list[Bag] = []
    while len(bags) < n_bags:
        n = max(1, int(round(rng.normal(mean_size, sd_size))))
        idx = rng.choice(len(images), n, replace=False)
        y = int((labels[idx] == target).any())
        if want is not None:
            if want[y] == 0:
                continue
            want[y] -= 1
        bags.append(Bag(f"bag{len(bags):04d}", images[idx].reshape(n, -1).astype(np.float32) / 255.0, y, f"bag{len(bags):04d}"))
    return bags


def run_one(images, labels, *, model: str, n_train: int, repeat: int, epochs: int = 40, n_test: int = 1000) -> dict:
    rng = np.random.default_rng(1000 + repeat)
    order = np.random.default_rng(12345).permutation(len(images))  # the file is sorted by digit
    train_pool, test_pool = order[:6000], order[6000:]
    train_bags = make_bags(images[train_pool], labels[train_pool], n_train, balanced=True, rng=rng)
    test_bags = make_bags(images[test_pool], labels[test_pool], n_test, balanced=False, rng=np.random.default_rng(99))
    n_val = max(2, n_train // 5)
    cfg = TrainConfig(model=model, instance_encoder="lenet", hidden_dim=500, attention_dim=128, dropout=0.0, lr=5e-4,
                      weight_decay=1e-4, epochs=epochs, patience=8, standardise=False, balance="none", seed=repeat)
    t0 = time.perf_counter()
    net, std, history, best = fit(train_bags[n_val:], train_bags[:n_val], cfg, seed=repeat)
    probs, _ = predict_bags(net, [std(b.features) for b in test_bags])
    m = binary_metrics(np.array([b.label for b in test_bags]), probs[:, 1])
    return {"model": model, "n_train": n_train, "repeat": repeat, "auc": m["auc"], "accuracy": m["accuracy"], "epochs": len(history), "best_epoch": best, "seconds": round(time.perf_counter() - t0, 1)}


def plot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, g in df.groupby("model"):
        s = g.groupby("n_train").auc.agg(["mean", "std"]).reset_index()
        ax.errorbar(s.n_train, s["mean"], yerr=s["std"].fillna(0), marker="o", capsize=3, label=model)
    ax.set_xlabel("training bags")
    ax.set_ylabel("test AUC (1,000 bags)")
    ax.set_title("MNIST-bags, target 9, bag size ~ N(10, 2)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def collect(out_dir: Path):
    """All finished runs (OUT_DIR/runs/*.json) as one table; writes results.csv and the plot."""
    import pandas as pd

    rows = [json.loads(p.read_text()) for p in sorted((out_dir / "runs").glob("*.json"))]
    df = pd.DataFrame(rows).sort_values(["model", "n_train", "repeat"])
    df.to_csv(out_dir / "results.csv", index=False)
    plot(df, out_dir / "mnist_bags_auc.png")
    return df


def markdown(df) -> str:
    """Test AUC mean ± std over repeats (and the number of repeats) per training-set size and model."""
    models = sorted(df.model.unique())
    lines = ["| training bags | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for n, g in df.groupby("n_train"):
        cells = []
        for m in models:
            a = g[g.model == m].auc
            cells.append(f"{a.mean():.3f} ± {a.std(ddof=0):.3f} ({len(a)})" if len(a) else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("npz", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--sizes", default="50,100,150,200,300,400,500")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="attention,gated_attention,instance_max,instance_mean,embedding_max,embedding_mean")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th run starting at I (several processes share the grid)")
    ap.add_argument("--summary", action="store_true", help="only collect the finished runs: results.csv, the plot and a markdown table")
    args = ap.parse_args()
    if args.summary:
        print(markdown(collect(args.out_dir)))
        return
    torch.set_num_threads(args.threads)
    data = np.load(args.npz)
    images, labels = data["images"], data["labels"]
    runs_dir = args.out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    shard, n_shards = (int(v) for v in args.shard.split("/"))
    grid = [(r, n, m) for r in range(args.repeats) for n in [int(s) for s in args.sizes.split(",")] for m in args.models.split(",")]
    for repeat, n_train, model in grid[shard::n_shards]:
        done = runs_dir / f"{model}_{n_train}_r{repeat}_e{args.epochs}.json"
        if done.is_file():  # finished by an earlier (killed) run: resume
            continue
        row = {**run_one(images, labels, model=model, n_train=n_train, repeat=repeat, epochs=args.epochs), "max_epochs": args.epochs}
        print(json.dumps(row), flush=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(row))
        tmp.replace(done)
    collect(args.out_dir)


if __name__ == "__main__":
    main()
