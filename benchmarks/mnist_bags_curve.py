"""MNIST-bags on tissue (``mnist_bags_tissue.make_bags``): the test AUC after every epoch.

How many bags, and how dark a shape, does the end-to-end CNN need before it learns the digit
instead of memorising the bags? One bag per Adam step (lr 5e-4, weight decay 1e-4), gated
attention over the paper's LeNet-style CNN on RGB pixels (``instance_encoder="cnn"``,
hidden 500, dropout 0.25, no augmentation); the last ``--test-bags`` bags are scored after
each epoch (a learning curve to read, never used to pick anything).

    python benchmarks/mnist_bags_curve.py --bags 900 --strength 2.2,2.8 --epochs 12 [--white]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_bags_tissue import make_bags, strength_range  # noqa: E402

from wsimil.mil import create_mil  # noqa: E402


def main(argv=None) -> list[tuple]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bags", type=int, default=300, help="bags in all")
    p.add_argument("--test-bags", type=int, default=100, help="the last bags, scored each epoch")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--strength", type=strength_range, default=(1.2, 1.6),
                   help="digit stain strength range LOW,HIGH")  # fmt: skip
    p.add_argument("--white", action="store_true", help="digits on a plain field, not tissue")
    p.add_argument("--pooling", default="gated_attention")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bags = make_bags(args.bags, strength=args.strength, white=args.white, seed=args.seed)
    xs = [torch.from_numpy(b.features) for b in bags]
    ys = [int(b.label) for b in bags]
    train = np.arange(args.bags - args.test_bags)
    test = range(args.bags - args.test_bags, args.bags)
    model = create_mil(args.pooling, 3, instance_encoder="cnn", hidden_dim=500, dropout=0.25,
                       pixels={"side": 32, "augment": False})  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    curve = []
    for epoch in range(1, args.epochs + 1):
        t0, total = time.perf_counter(), 0.0
        model.train()
        for i in np.random.default_rng(args.seed * 1000 + epoch).permutation(train):
            loss = bce(model(xs[i][None]).logits, torch.tensor([float(ys[i])]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        model.eval()
        with torch.no_grad():
            probs = [torch.sigmoid(model(xs[i][None]).logits).item() for i in test]
        auc = roc_auc_score([ys[i] for i in test], probs)
        curve.append((epoch, round(total / len(train), 4), round(auc, 3),
                      round(time.perf_counter() - t0, 1)))  # fmt: skip
        print("epoch {} train loss {} test AUC {} ({} s)".format(*curve[-1]), flush=True)
    print(json.dumps({"settings": vars(args), "curve": curve}))
    return curve


if __name__ == "__main__":
    main()
