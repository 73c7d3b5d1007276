"""One holdout split of a shape cohort's tile caches, trained end to end in process (issue 19).

A quicker look than ``shape_cohort.py``'s 5-fold CV: a quarter of the slides (seeded) are held
out, the rest train ``wsimil.fit.fit`` with the held-out slides as the watched validation set
(never used to pick the epoch: ``patience`` is the epoch count), and the held-out AUC is
printed with the per-epoch losses. ``--bag-norm`` standardises each bag's instance embeddings
over its tiles before the pooling (an experiment; not a wsimil setting).

    python benchmarks/shape_holdout.py RUN --lr 5e-4 --epochs 20 [--pooling instance_max] [--bag-norm]

RUN is a run folder with ``tile_cache/<px>px`` (``wsimil cache RUN --px 32``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wsimil.fit as fit_module  # noqa: E402
from wsimil.bags import load_slide_bags  # noqa: E402
from wsimil.config import TrainConfig  # noqa: E402
from wsimil.layout import RunLayout  # noqa: E402
from wsimil.manifest import read_manifest  # noqa: E402


class BagNorm(torch.nn.Module):
    """``f`` followed by standardising each embedding dimension over the bag's tiles."""

    def __init__(self, f: torch.nn.Module):
        super().__init__()
        self.inner = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return (h - h.mean(1, keepdim=True)) / (h.std(1, keepdim=True) + 1e-3)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--px", type=int, default=32)
    p.add_argument("--pooling", default="gated_attention")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--bag-norm", action="store_true")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.bag_norm:
        build = fit_module.build_model

        def with_bag_norm(*a, **k):
            model = build(*a, **k)
            model.f = BagNorm(model.f)
            return model

        fit_module.build_model = with_bag_norm
    layout = RunLayout(args.run)
    df = read_manifest(args.run / "manifest.csv")
    bags, _ = load_slide_bags(df, lambda s: layout.tile_cache_store(args.px, s), array="tiles")
    order = np.random.default_rng(0).permutation(len(bags))
    n_test = len(bags) // 4
    test, train = [bags[i] for i in order[:n_test]], [bags[i] for i in order[n_test:]]
    cfg = TrainConfig(instance_encoder="cnn", augment=False, model=args.pooling, lr=args.lr,
                      epochs=args.epochs, patience=args.epochs, val_fraction=0,
                      weight_decay=args.weight_decay, dropout=args.dropout, device=args.device,
                      threads=args.threads)  # fmt: skip
    return holdout_auc(train, test, cfg, what="held-out slides")


def holdout_auc(train: list, test: list, cfg: TrainConfig, *, what: str) -> float:
    """Train on ``train`` (``test`` watched as the validation set, never used to pick the epoch),
    print the losses per epoch, and return the test bags' ROC AUC."""
    from sklearn.metrics import roc_auc_score

    t0 = time.perf_counter()
    model, _, history, _ = fit_module.fit(train, test, cfg, seed=0)
    print(history[["epoch", "train_loss", "val_loss", "seconds"]].to_string())
    probs, _ = fit_module.predict_bags(model, [torch.from_numpy(b.features) for b in test])
    auc = roc_auc_score([b.label for b in test], probs[:, 1])
    print(f"{len(train)} training bags / {len(test)} {what}: AUC {auc:.3f} "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return auc


if __name__ == "__main__":
    main()
