"""Tile-level probes on the shape cohort: is the key shape in the frozen features, and in the pixels?

Usage::

    nice .venv/bin/python benchmarks/shape_probe.py RUN_DIR [--encoder efficientnet_lite0]

RUN_DIR is a run of ``benchmarks/shape_cohort.py`` (cohort, tiles and the frozen arm's features).
The test tiles are the cohort's digit tiles (the grid cell of every box in ``boxes.csv``),
labelled 1 when the digit is the key digit, 0 for a distractor digit:

1. frozen features: logistic regression on the encoder's features of those tiles, stratified
   5-fold CV ROC AUC (key vs distractor), and the same for "any digit" vs the slides' other
   tiles (does the encoder see digits at all?).
2. pixels: the paper's LeNet (``wsimil.mil.LeNetEncoder``, side = tile px, on grey levels) trained
   with tile labels on fresh tiles (random tissue crops of the same background, one MNIST digit
   stained in as the cohort does, from MNIST rows the cohort does not use, half key digits),
   tested on the cohort's digit tiles (ROC AUC key vs distractor).

A supervised upper bound for each input: MIL sees only slide labels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


def digit_tiles(run: Path, boxes: pd.DataFrame, encoder: str):
    """(slide_id, tile row, level-0 x, y, is_key) of every digit's tile, and all feature rows."""
    from wsimil.layout import RunLayout
    from wsimil.store import open_store

    lay, rows, feats, other = RunLayout(run), [], [], []
    for sid, b in boxes.groupby("slide_id"):
        g = open_store(lay.tile_store(sid))
        xy, t = np.asarray(g["coords"][...]), int(g.attrs["tile_px_level0"])
        f = np.asarray(open_store(lay.feature_store(encoder, sid))["features"][...], np.float32)
        at = {(int(x), int(y)): i for i, (x, y) in enumerate(xy)}
        used = set()
        for r in b.itertuples():
            cell = (r.x0 // t * t, r.y0 // t * t)
            if cell in at:
                rows.append((sid, cell[0], cell[1], int(r.is_key)))
                feats.append(f[at[cell]])
                used.add(at[cell])
        other.append(f[[i for i in range(len(f)) if i not in used]])
    return (
        pd.DataFrame(rows, columns=["slide_id", "x", "y", "is_key"]),
        np.stack(feats),
        np.concatenate(other),
    )


def cv_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Stratified 5-fold CV ROC AUC of a standardised logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(clf, x, y, cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def grey(rgb: np.ndarray) -> np.ndarray:
    """(..., px, px, 3) uint8 -> (..., px * px) float32 darkness in [0, 1]."""
    g = 1.0 - rgb.astype(np.float32).mean(-1) / 255.0
    return g.reshape(*g.shape[:-2], -1)


def training_tiles(source, images, labels, pool, *, n: int, px: int, key: int, seed: int):
    """``n`` fresh tiles, one digit each (half key digits), from MNIST rows in ``pool``.

    A tile is a ``px`` window of the background (turned and flipped at random) that is at least
    95 % tissue; the digit is stained in as the cohort does, at a random offset.
    """
    from wsimil.synth.digits import STRENGTH, digit_ink, stain_digit, tissue_pixels

    rng = np.random.default_rng(seed)
    views = []
    for k in range(4):
        for flip in (False, True):
            v = np.rot90(source, k)
            v = np.ascontiguousarray(v[:, ::-1] if flip else v)
            ii = np.pad(tissue_pixels(v).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            frac = (ii[px:, px:] - ii[:-px, px:] - ii[px:, :-px] + ii[:-px, :-px]) / px**2
            views.append((v, np.argwhere(frac >= 0.95)))
    keys, others = pool[labels[pool] == key], pool[labels[pool] != key]
    x, y = np.empty((n, px, px, 3), np.uint8), np.zeros(n, np.float32)
    for i in range(n):
        v, corners = views[int(rng.integers(len(views)))]
        r, c = corners[int(rng.integers(len(corners)))]
        tile = v[r : r + px, c : c + px].copy()
        ink = digit_ink(images[int(rng.choice(keys if i % 2 == 0 else others))], 28)
        oy, ox = rng.integers(px - 28 + 1, size=2)
        tile[oy : oy + 28, ox : ox + 28] = stain_digit(
            tile[oy : oy + 28, ox : ox + 28], ink, rng.uniform(*STRENGTH)
        )
        x[i], y[i] = tile, float(i % 2 == 0)
    return x, y


def train_lenet(x: np.ndarray, y: np.ndarray, *, px: int, epochs: int, seed: int):
    """LeNet + a linear logit trained with BCE on (N, px * px) grey tiles; returns the model."""
    import torch

    from wsimil.mil import LeNetEncoder

    torch.manual_seed(seed)
    net = torch.nn.Sequential(LeNetEncoder(500, side=px), torch.nn.Linear(500, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(x)), max(1, len(x) // 64)):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx])[:, 0], yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def cohort_mnist_rows(run: Path, cohort: dict, labels: np.ndarray) -> set[int]:
    """The MNIST rows the cohort's slides use (``boxes.csv``, or its plan recomputed)."""
    boxes = pd.read_csv(run / "boxes.csv")
    if "mnist_index" in boxes:
        return set(boxes["mnist_index"].astype(int).tolist())
    from wsimil.synth.cohort import _cohort_labels
    from wsimil.synth.digits import plan_digits

    y = _cohort_labels(cohort["n_slides"], cohort["positive_fraction"], cohort["seed"])
    plan = plan_digits(labels, y, key_digit=cohort["key_digit"], n_digits=tuple(cohort["n_digits"]),
                       n_key=tuple(cohort["n_key"]), seed=cohort["seed"])  # fmt: skip
    return {i for slide in plan for i, _ in slide}


def pixel_probe(
    run: Path, tiles: pd.DataFrame, cohort: dict, *, n_train: int, epochs: int, seed: int
) -> dict:
    """Train LeNet on fresh tiles, test on the cohort's digit tiles (read from the slides)."""
    import openslide
    import torch
    from sklearn.metrics import roc_auc_score

    from wsimil.manifest import read_manifest
    from wsimil.synth.digits import load_background

    px = int(cohort["tile_px"])
    with np.load(cohort["mnist"]) as z:
        images, labels = z["images"], np.asarray(z["labels"]).astype(np.int64)
    used = cohort_mnist_rows(run, cohort, labels)
    pool = np.array(
        [i for i in np.random.default_rng(seed).permutation(len(labels)) if i not in used]
    )
    source = load_background(cohort["background"], mpp=cohort["mpp"])
    t0 = time.perf_counter()
    xtr, ytr = training_tiles(
        source, images, labels, pool, n=n_train, px=px, key=cohort["key_digit"], seed=seed
    )
    net = train_lenet(grey(xtr), ytr, px=px, epochs=epochs, seed=seed)
    paths = dict(read_manifest(run / "manifest.csv")[["slide_id", "path"]].itertuples(index=False))
    test = []
    for r in tiles.itertuples():
        with openslide.OpenSlide(paths[r.slide_id]) as s:
            test.append(np.asarray(s.read_region((int(r.x), int(r.y)), 0, (px, px)).convert("RGB")))
    with torch.inference_mode():
        p = net(torch.from_numpy(grey(np.stack(test))))[:, 0].numpy()
    return {"pixel_auc": float(roc_auc_score(tiles.is_key, p)), "n_train": n_train, "epochs": epochs,
            "mnist_rows_excluded": len(used), "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cohort = json.loads((args.run / "cohort.json").read_text())
    boxes = pd.read_csv(args.run / "boxes.csv")
    tiles, feats, other = digit_tiles(args.run, boxes, args.encoder)
    y = tiles.is_key.to_numpy()
    out = {"n_key_tiles": int(y.sum()), "n_distractor_tiles": int((1 - y).sum()),
           "frozen_key_vs_distractor_auc": cv_auc(feats, y, args.seed),
           "frozen_digit_vs_other_auc": cv_auc(np.concatenate([feats, other]),
                                               np.r_[np.ones(len(feats)), np.zeros(len(other))], args.seed)}  # fmt: skip
    if cohort.get("background"):
        out.update(
            pixel_probe(
                args.run, tiles, cohort, n_train=args.n_train, epochs=args.epochs, seed=args.seed
            )
        )
    (args.run / "shape_probe.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
