"""Three-class MNIST-bags: which key digit a bag holds, with slide-level labels only.

Usage::

    python benchmarks/mnist_multiclass.py /work/shared/data/mnist/mnist10k.npz OUT_DIR \
        [--n-train 300] [--repeats 3] [--models gated_attention,gated_attention+per_class,embedding_max]

A bag holds ~N(10, 2) digits (at least 1) and is ``nine`` when it contains a 9, ``seven`` when
it contains a 7 and no 9, else ``none`` (bags holding both are not drawn, so the classes are
exclusive). Training bags are balanced over the classes; 1,000 test bags (not balanced) come
from 4,000 held-out digits, as in ``mnist_bags.py``. f is the paper's LeNet-style CNN trained
end to end through the pooling with :func:`wsimil.fit.fit` (softmax head, cross-entropy,
early stopping on 20 % of the training bags). ``+per_class`` gives the attention pooling one
branch per class. Prints one JSON line per run (macro one-vs-rest AUC, balanced accuracy,
confusion matrix, and how often the highest-attention digit of the predicted class's branch
is that class's key digit) and writes OUT_DIR/results.csv.
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
from wsimil.evaluate import confusion, multiclass_metrics
from wsimil.fit import fit, predict_bags

CLASSES = ["nine", "none", "seven"]  # alphabetical, as wsimil orders class names
KEY = {"nine": 9, "seven": 7}


def bag_class(digits: np.ndarray) -> str | None:
    has9, has7 = bool((digits == 9).any()), bool((digits == 7).any())
    if has9 and has7:
        return None
    return "nine" if has9 else "seven" if has7 else "none"


def make_bags(images, labels, n_bags: int, *, balanced: bool, rng) -> tuple[list[Bag], list]:
    """Bags of flattened digits in [0, 1] with class indices; and each bag's digit labels."""
    want = dict.fromkeys(range(3), n_bags // 3) if balanced else None
    if want is not None:
        want[0] += n_bags - 3 * (n_bags // 3)
    bags, digits = [], []
    while len(bags) < n_bags:
        n = max(1, int(round(rng.normal(10, 2))))
        idx = rng.choice(len(images), n, replace=False)
        name = bag_class(labels[idx])
        if name is None:
            continue
        y = CLASSES.index(name)
        if want is not None:
            if want[y] == 0:
                continue
            want[y] -= 1
        bid = f"bag{len(bags):04d}"
        bags.append(Bag(bid, images[idx].reshape(n, -1).astype(np.float32) / 255.0, y, bid))
        digits.append(labels[idx])
    return bags, digits


def run_one(images, labels, *, model: str, n_train: int, repeat: int, epochs: int) -> dict:
    rng = np.random.default_rng(2000 + repeat)
    order = np.random.default_rng(12345).permutation(len(images))  # the file is sorted by digit
    pool, held = order[:6000], order[6000:]
    train, _ = make_bags(images[pool], labels[pool], n_train, balanced=True, rng=rng)
    test, test_digits = make_bags(images[held], labels[held], 1000, balanced=False,
                                  rng=np.random.default_rng(99))  # fmt: skip
    pooling, _, per_class = model.partition("+")
    cfg = TrainConfig(model=pooling, instance_encoder="lenet", hidden_dim=500, attention_dim=128,
                      dropout=0.0, lr=5e-4, weight_decay=1e-4, epochs=epochs, patience=8,
                      per_class_attention=bool(per_class), standardise=False, seed=repeat,
                      threads=1)  # fmt: skip
    t0 = time.perf_counter()
    n_val = n_train // 5
    net, std, history, best = fit(train[n_val:], train[:n_val], cfg, seed=repeat, n_classes=3)
    probs, outs = predict_bags(net, [std(b.features) for b in test])
    y = np.array([b.label for b in test])
    m = multiclass_metrics(y, probs)
    hits = []  # the predicted class's top-attention digit is its key digit (key classes only)
    for p, o, d in zip(probs, outs, test_digits, strict=True):
        name = CLASSES[int(np.argmax(p))]
        if name in KEY and o.attention is not None:
            hits.append(int(d[int(torch.argmax(o.attention[0]))] == KEY[name]))
    return {"model": model, "n_train": n_train, "repeat": repeat, **{k: round(v, 4) for k, v in m.items()},
            "confusion": confusion(y, probs), "top_attention_on_key": round(float(np.mean(hits)), 3) if hits else None,
            "epochs": len(history), "best_epoch": best, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("npz", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="gated_attention,gated_attention+per_class,embedding_max")
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = np.load(args.npz)
    images, labels = data["images"], data["labels"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for repeat in range(args.repeats):
        for model in args.models.split(","):
            row = run_one(images, labels, model=model, n_train=args.n_train, repeat=repeat,
                          epochs=args.epochs)  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(args.out_dir / "results.csv", index=False)
    print(df.groupby("model")[["auc", "balanced_accuracy", "top_attention_on_key"]].agg(["mean", "std"]).round(3))


if __name__ == "__main__":
    main()
