"""Tile-level probes on freshly stained tiles: does the wsimil CNN (RGB) or the frozen encoder tell the key digit?

For each key digit and stain strength: 3,000 training and 600 test tiles of 32 px cut from the
real H&E background (at least 90 % tissue), each with one MNIST digit stained in as the shape
cohort does (half key digits; training and test digits from disjoint MNIST rows). Prints the
test AUC (key vs other digits) of ``PixelInstances("cnn")`` + a linear layer trained with tile
labels (8 epochs), and the 5-fold CV AUC of a logistic regression on EfficientNet-Lite0
features of 400 test tiles (resized to 224 px). Supervised upper bounds for each input.

    python benchmarks/shape_tile_probe.py --keys 9,0 [--background SVS] [--mnist NPZ]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from wsimil.synth import digits as D  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
STRENGTHS = ((1.2, 1.6), (2.2, 2.8))


def stained_tiles(n, key, strength, rng, pool, bg, tissue, imgs, labs):
    """``n`` (32, 32, 3) tiles, every other one a key digit; returns tiles and labels."""
    out, y = [], []
    while len(out) < n:
        r, c = rng.integers(bg.shape[0] - 32), rng.integers(bg.shape[1] - 32)
        if tissue[r : r + 32, c : c + 32].mean() < 0.9:
            continue
        t = bg[r : r + 32, c : c + 32].copy()
        is_key = len(out) % 2 == 0
        i = rng.choice(pool[(labs[pool] == key) == is_key])
        oy, ox = rng.integers(5, size=2)
        ink = D.digit_ink(imgs[i], 28)
        t[oy : oy + 28, ox : ox + 28] = D.stain_digit(t[oy : oy + 28, ox : ox + 28], ink,
                                                      rng.uniform(*strength))  # fmt: skip
        out.append(t)
        y.append(int(is_key))
    return np.stack(out), np.array(y)


def pixel_probe(tr_x, tr_y, te_x, te_y) -> float:
    from sklearn.metrics import roc_auc_score

    from wsimil.pixel_models import PixelInstances

    torch.manual_seed(0)
    f, head = PixelInstances("cnn", side=32, out_dim=64, augment=False), torch.nn.Linear(64, 1)
    opt = torch.optim.Adam([*f.parameters(), *head.parameters()], lr=1e-3)
    x, y = torch.from_numpy(tr_x), torch.from_numpy(tr_y).float()
    for _ in range(8):
        perm = torch.randperm(len(x))
        for b in range(0, len(x), 64):
            i = perm[b : b + 64]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(f(x[i]))[:, 0], y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    f.eval()
    with torch.no_grad():
        return float(roc_auc_score(te_y, head(f(torch.from_numpy(te_x)))[:, 0].numpy()))


def frozen_probe(te_x, te_y, n: int = 400) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from wsimil.encoders import create_encoder, normalise
    from wsimil.tile_reader import resize_tile

    enc = create_encoder("efficientnet_lite0")
    x = torch.from_numpy(np.stack([resize_tile(t, 224) for t in te_x[:n]]))
    with torch.no_grad():
        feats = torch.cat([enc(normalise(x[i : i + 50], enc.config)) for i in range(0, n, 50)])
    lr = LogisticRegression(max_iter=2000, C=0.1)
    return float(cross_val_score(lr, feats.numpy(), te_y[:n], cv=5, scoring="roc_auc").mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", default="9")
    p.add_argument("--background", type=Path, default=DATA / "slides" / "cmu_small_region.svs")
    p.add_argument("--mnist", type=Path, default=DATA / "mnist" / "mnist10k.npz")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    bg = D.load_background(args.background, mpp=1.0)
    tissue = D.tissue_pixels(bg)
    mnist = np.load(args.mnist)
    imgs, labs = mnist["images"], mnist["labels"]
    pools = np.random.default_rng(1).permutation(len(labs))
    for key in (int(k) for k in args.keys.split(",")):
        for strength in STRENGTHS:
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            common = (bg, tissue, imgs, labs)
            tr_x, tr_y = stained_tiles(3000, key, strength, rng, pools[:8000], *common)
            te_x, te_y = stained_tiles(600, key, strength, rng, pools[8000:], *common)
            pix, fro = pixel_probe(tr_x, tr_y, te_x, te_y), frozen_probe(te_x, te_y)
            print(f"key {key} stain {strength}: CNN on pixels AUC {pix:.3f}, frozen features "
                  f"AUC {fro:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
