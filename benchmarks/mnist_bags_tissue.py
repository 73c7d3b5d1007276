"""MNIST-bags on real tissue, end to end: the paper's bags, each digit stained onto an H&E tile.

A bag is 8-12 tiles of 32 px cut from the real H&E background (>= 90 % tissue), each with one
MNIST digit stained in as the shape cohort does (``wsimil.synth.digits``); a positive bag holds
1-3 nines. ``--tissue-tiles K`` adds K digit-free tissue tiles to every bag. The last
``--test-bags`` bags are the test set; the others train ``wsimil.fit.fit`` (``instance_encoder="cnn"``, no
augmentation, no validation split: the test bags' loss is shown per epoch, never used). Prints
the losses per epoch and the test AUC.

    python benchmarks/mnist_bags_tissue.py --bags 600 --epochs 30 [--tissue-tiles 40] [--strength 2.2,2.8] [--white]

``mnist_bags_curve.py`` trains on the same bags and prints the test AUC after every epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from shape_holdout import holdout_auc  # noqa: E402

from wsimil.bags import Bag  # noqa: E402
from wsimil.config import TrainConfig  # noqa: E402
from wsimil.synth import digits as D  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def strength_range(text: str) -> tuple[float, float]:
    """``--strength LOW,HIGH`` as a pair of floats."""
    low, high = (float(v) for v in text.split(","))
    return low, high


def make_bags(n_bags: int, *, strength=(1.2, 1.6), tissue_tiles: int = 0, white: bool = False,
              background: Path = DATA / "slides" / "cmu_small_region.svs",
              mnist: Path = DATA / "mnist" / "mnist10k.npz", seed: int = 0) -> list[Bag]:  # fmt: skip
    """MNIST-bags on tissue: bag ``b`` is positive when ``b`` is odd; tiles (N, 32, 32, 3) uint8.

    ``white``: the digits on a plain 245-grey field instead of tissue (the paper's setting, in
    colour). Bags are a deterministic function of the arguments.
    """
    bg = D.load_background(background, mpp=1.0)
    if white:
        bg = np.full_like(bg, 245)
    tissue = D.tissue_pixels(bg) if not white else np.ones(bg.shape[:2], bool)
    with np.load(mnist) as z:
        imgs, labs = z["images"], z["labels"]
    rng = np.random.default_rng(seed)

    def tile(digit):
        while True:
            r, c = rng.integers(bg.shape[0] - 32), rng.integers(bg.shape[1] - 32)
            if tissue[r : r + 32, c : c + 32].mean() >= 0.9:
                break
        t = bg[r : r + 32, c : c + 32].copy()
        if digit is not None:
            i = rng.choice(np.flatnonzero(labs == digit))
            oy, ox = rng.integers(5, size=2)
            t[oy : oy + 28, ox : ox + 28] = D.stain_digit(
                t[oy : oy + 28, ox : ox + 28], D.digit_ink(imgs[i], 28), rng.uniform(*strength)
            )
        return t

    bags = []
    for b in range(n_bags):
        pos, n = b % 2, int(rng.integers(8, 13))
        k = int(rng.integers(1, 4)) if pos else 0
        digits = [9] * k + list(rng.choice(9, n - k)) + [None] * tissue_tiles  # 0-8
        bags.append(Bag(f"b{b}", np.stack([tile(d) for d in digits]), pos, f"b{b}"))
    return bags


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bags", type=int, default=200, help="bags in all")
    p.add_argument("--test-bags", type=int, default=100, help="the last bags, held out")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--tissue-tiles", type=int, default=0)
    p.add_argument("--strength", type=strength_range, default=(1.2, 1.6),
                   help="digit stain strength range LOW,HIGH")  # fmt: skip
    p.add_argument("--white", action="store_true", help="digits on a plain field, not tissue")
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args(argv)
    bags = make_bags(args.bags, strength=args.strength, tissue_tiles=args.tissue_tiles,
                     white=args.white)  # fmt: skip
    train, test = bags[: -args.test_bags], bags[-args.test_bags :]
    cfg = TrainConfig(instance_encoder="cnn", augment=False, lr=args.lr, epochs=args.epochs,
                      patience=10_000, val_fraction=0, device="cpu")  # fmt: skip
    return holdout_auc(train, test, cfg, what=f"test bags ({args.tissue_tiles} tissue tiles a bag)")


if __name__ == "__main__":
    main()
