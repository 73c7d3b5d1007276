"""End to end vs frozen features on the shape cohort (issue 19): same folds, slide and localisation AUC.

Usage::

    nice .venv/bin/python benchmarks/shape_cohort.py OUT_DIR [--arms frozen,e2e] [--slides 64]
        [--side-px 448] [--tile-px 32] [--epochs 40] [--folds 5] [--seed 0] [--quick]

Stages (each is the ``wsimil`` command, run in a subprocess and timed; every stage skips what
an earlier run of the same settings left in OUT_DIR):

1. cohort: :func:`wsimil.synth.digits.make_shape_cohort` (real H&E crops of
   ``--background``, MNIST digits from ``--mnist``; a slide is positive iff it holds a
   ``--key-digit``), written into OUT_DIR (the run folder: ``manifest.csv``, ``boxes.csv``).
2. ``wsimil tile OUT_DIR --tile-px T --target-mpp MPP --no-gap-tiles``: the grid the digits were
   placed in (no off-grid gap tiles, which would cut digits).
3. frozen arm: ``wsimil embed --encoder efficientnet_lite0``, then ``wsimil train --model
   gated_attention --protocol cv --folds K --seed S`` -> ``models/frozen``.
4. e2e arm: ``wsimil cache --px T`` (where the CLI has it; train writes missing caches anyway),
   ``wsimil train --instance-encoder cnn --cache-px T --no-augment`` (same protocol, folds,
   seed; no turns and flips, which do not keep a digit's class) -> ``models/e2e``. Its folds are checked to be the frozen arm's (``split`` in each fold's
   ``model.json``).
5. Evaluation per arm, out of fold: slide AUC (with a 95 % case-bootstrap interval) from the
   pooled test predictions in ``predictions.csv``; localisation AUC: each fold model scores the
   tiles of its own test slides (attention, min-max rescaled per slide as the heatmaps show it)
   against the key-digit boxes (:func:`wsimil.localise.localisation_auc`; tiles of positive
   test slides pooled, and the mean of the per-slide AUCs).

Writes OUT_DIR/shape_results[TAG].json (models ``frozen[TAG]``, ``e2e[TAG]``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if (
    str(ROOT) not in sys.path
):  # this checkout's wsimil, in this process and (PYTHONPATH) in the stages
    sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
ARMS = ("frozen", "e2e")


# ------------------------------------------------------------------------------------------
# running the stages
def wsimil(*args: str, threads: int | None = None) -> float:
    """Run ``wsimil ARGS`` in a subprocess (this checkout's code); return its wall seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-c", "from wsimil.cli import main; main()", *map(str, args)]
    print("$ wsimil " + " ".join(map(str, args)), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return round(time.perf_counter() - t0, 1)


def make_cohort(args, run: Path) -> float:
    """The cohort in ``run`` (reused when ``cohort.json`` holds the same settings)."""
    from wsimil.synth.digits import make_shape_cohort

    kw = dict(n_slides=args.slides, key_digit=args.key_digit, background=args.background,
              mnist=args.mnist, side_px=args.side_px, mpp=args.mpp, tile_px=args.tile_px,
              n_digits=args.digits, n_key=args.key_count, min_tissue=args.min_tissue,
              strength=args.strength,
              seed=args.seed if args.cohort_seed is None else args.cohort_seed)  # fmt: skip
    saved = run / "cohort.json"

    def same(old, new) -> bool:
        return old == (str(new) if isinstance(new, Path) else list(new) if isinstance(new, tuple)
                       else new)  # fmt: skip

    if saved.is_file() and (run / "manifest.csv").is_file():
        old = json.loads(saved.read_text())
        if all(same(old.get(k), v) for k, v in kw.items()):
            print(f"cohort: reusing {run}")
            return 0.0
    t0 = time.perf_counter()
    make_shape_cohort(run, **kw)
    return round(time.perf_counter() - t0, 1)


def train_args(args, name: str) -> list[str]:
    """The ``wsimil train`` options both arms share (protocol, folds, seed, epochs, pooling)."""
    out = ["--name", name, "--model", args.pooling, "--protocol", "cv", "--folds",
           args.folds, "--seed", args.seed, "--epochs", args.epochs]  # fmt: skip
    if args.val_fraction is not None:
        out += ["--val-fraction", args.val_fraction]
    return [str(a) for a in out]


def has_command(name: str) -> bool:
    """Whether this checkout's ``wsimil`` has the command ``name``."""
    from wsimil.cli import main

    return name in main.commands


def e2e_missing() -> str | None:
    """Why this checkout's ``wsimil train`` cannot run the e2e arm (None when it can)."""
    from click.testing import CliRunner

    from wsimil.cli import main

    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    if "--cache-px" not in help_text or "cnn" not in help_text:
        return "not run: this wsimil train has no --instance-encoder cnn / --cache-px yet"
    return None


def e2e_train_args(args) -> list[str]:
    """The end-to-end arm's own options (issue 19's CLI): a CNN on the tile cache's pixels.

    ``--no-augment`` unless ``--e2e-augment``: train's augmentation turns and flips tiles, and a
    digit's class is not invariant to that (a 9 turned by 180 degrees is a 6, a distractor).
    """
    out = ["--instance-encoder", "cnn", "--cache-px", str(args.tile_px)]
    if not args.e2e_augment:
        out.append("--no-augment")
    if args.max_instances:
        out += ["--max-instances", str(args.max_instances)]
    return out + list(args.e2e_arg)


# ------------------------------------------------------------------------------------------
# evaluation
def fold_dirs(model_dir: Path) -> list[Path]:
    """The fold model folders (``folds/r<repeat>_f<fold>``), sorted."""
    return sorted(p.parent for p in (model_dir / "folds").glob("*/model.json"))


def fold_splits(model_dir: Path) -> dict[str, dict[str, str]]:
    """Fold name -> its ``split`` (slide_id -> train / val / test), from each ``model.json``."""
    return {
        d.name: json.loads((d / "model.json").read_text())["split"] for d in fold_dirs(model_dir)
    }


def same_folds(a: dict, b: dict) -> bool:
    """Whether two models have the same split (train, val and test slides) in every fold."""
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def slide_auc(model_dir: Path) -> dict:
    """Pooled out-of-fold slide AUC (each slide tested once) and its 95 % bootstrap interval."""
    from wsimil.evaluate import bootstrap_intervals
    from wsimil.localise import _auc

    pred = pd.read_csv(model_dir / "predictions.csv")
    test = pred[(pred["split"] == "test") & (pred["repeat"] == 0)]
    y, p = test["label"].astype(int).to_numpy(), test["probability"].to_numpy(float)
    ci = bootstrap_intervals(y, p, test["slide_id"].to_numpy(), n_boot=1000, seed=0)["auc"]
    return {"slide_auc": _auc(y, p), "slide_auc_ci": list(ci), "n_test": len(test)}


def tile_boxes(run: Path, slide_id: str) -> np.ndarray:
    """The slide's tiles as (x0, y0, x1, y1) level-0 boxes, in the tile store's row order."""
    from wsimil.layout import RunLayout
    from wsimil.store import open_store

    g = open_store(RunLayout(run).tile_store(slide_id))
    xy = np.asarray(g["coords"][...], dtype=np.int64)
    t = int(g.attrs["tile_px_level0"])
    return np.concatenate([xy, xy + t], axis=1)


def frozen_input(run: Path, encoder: str) -> Callable:
    """``input_of(std, slide_id)`` for the frozen arm: the standardised feature store."""
    from wsimil.layout import RunLayout
    from wsimil.store import open_store

    def input_of(std, slide_id):
        return std(open_store(RunLayout(run).feature_store(encoder, slide_id))["features"][...])

    return input_of


def e2e_input(run: Path, cache_px: int) -> Callable:
    """``input_of(std, slide_id)`` for the e2e arm: the slide's tiles from the tile cache,
    ``RUN/tile_cache/<px>px/<slide_id>.zarr`` array ``tiles`` uint8 (N, px, px, 3), tile-store
    row order, given as they are: the pixel models of ``wsimil train --instance-encoder``
    take uint8 (..., S, S, 3) and scale them themselves (checked against main's ``cnn``)."""
    import torch

    from wsimil.store import open_store

    def input_of(std, slide_id):
        g = open_store(run / "tile_cache" / f"{cache_px}px" / f"{slide_id}.zarr")
        return torch.from_numpy(np.asarray(g["tiles"][...]))

    return input_of


def localisation(run: Path, model_dir: Path, input_of: Callable, boxes: pd.DataFrame) -> dict:
    """Out-of-fold localisation AUC: each fold model's attention on its positive test slides.

    Parameters
    ----------
    input_of : callable
        ``(standardiser, slide_id) -> tensor`` the model takes for one bag (no batch axis).
    boxes : DataFrame
        ``boxes.csv`` of the cohort (key digits are the rows with ``is_key`` 1).
    """
    import torch

    from wsimil.checkpoint import load_checkpoint
    from wsimil.localise import key_vs_other_auc, localisation_auc, mean_slide_localisation_auc

    xyxy = ["x0", "y0", "x1", "y1"]
    by_slide = {sid: (g.loc[g["is_key"] == 1, xyxy].to_numpy(),  # key digits, other digits
                      g.loc[g["is_key"] == 0, xyxy].to_numpy())
                for sid, g in boxes.groupby("slide_id")}  # fmt: skip
    scores, tiles, key_boxes, other_boxes = [], [], [], []
    for d in fold_dirs(model_dir):
        model, std, meta = load_checkpoint(d)
        for sid in sorted(s for s, part in meta["split"].items() if part == "test"):
            k, other = by_slide.get(sid, (np.zeros((0, 4)), np.zeros((0, 4))))
            if len(k) == 0:
                continue
            with torch.inference_mode():
                out = model(input_of(std, sid).unsqueeze(0))
            # attention poolings: attention; instance poolings: the instance scores (the heatmap's)
            a = (out.attention if out.attention is not None else out.instance_scores)[0]
            a = a.double().numpy()
            scores.append((a - a.min()) / max(a.max() - a.min(), 1e-12))
            tiles.append(tile_boxes(run, sid))
            key_boxes.append(k)
            other_boxes.append(other)
    return {"loc_auc": localisation_auc(scores, tiles, key_boxes) if scores else float("nan"),
            "loc_auc_slide_mean": mean_slide_localisation_auc(scores, tiles, key_boxes),
            "loc_auc_key_vs_digits": key_vs_other_auc(scores, tiles, key_boxes, other_boxes),
            "loc_slides": len(scores)}  # fmt: skip


def epoch_seconds(model_dir: Path) -> float:
    """Mean seconds per epoch over every fold's ``history.csv``."""
    secs = [pd.read_csv(d / "history.csv")["seconds"] for d in fold_dirs(model_dir)
            if (d / "history.csv").is_file()]  # fmt: skip
    return float(pd.concat(secs).mean()) if secs else float("nan")


def evaluate_arm(run: Path, name: str, input_of: Callable, boxes: pd.DataFrame) -> dict:
    """Slide AUC, localisation AUC and seconds per epoch of one trained arm."""
    model_dir = run / "models" / name
    return {**slide_auc(model_dir), **localisation(run, model_dir, input_of, boxes),
            "s_per_epoch": epoch_seconds(model_dir)}  # fmt: skip


# ------------------------------------------------------------------------------------------
# the table and the command
def table(results: dict) -> str:
    """The results as a markdown table."""
    lines = ["| arm | slide AUC | 95 % interval | localisation AUC (pooled) | per-slide mean | 9s vs other digits | s / epoch | train s | embed / cache s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arm, r in results["arms"].items():
        if "slide_auc" not in r:
            lines.append(f"| {arm} | {r.get('status', 'to be run')} | | | | | | | |")
            continue
        lo, hi = r["slide_auc_ci"]
        lines.append(
            f"| {arm} | {r['slide_auc']:.3f} | {lo:.3f}-{hi:.3f} | {r['loc_auc']:.3f} | "
            f"{r['loc_auc_slide_mean']:.3f} | {r.get('loc_auc_key_vs_digits', float('nan')):.3f} | "
            f"{r['s_per_epoch']:.2f} | {r.get('train_s', '')} | "
            f"{r.get('embed_s', r.get('cache_s', ''))} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="run folder (the cohort is written into it)")
    p.add_argument("--arms", default="frozen,e2e", help="comma list of: frozen, e2e")
    p.add_argument("--mnist", type=Path, default=DATA / "mnist" / "mnist10k.npz")
    p.add_argument("--background", type=Path, default=DATA / "slides" / "cmu_small_region.svs")
    p.add_argument("--synthetic-background", action="store_true", help="synthetic tissue instead")
    p.add_argument("--slides", type=int, default=64)
    p.add_argument("--side-px", type=int, default=448, help="slide side in px")
    p.add_argument("--tile-px", type=int, default=32, help="tile (and digit cell) side in px")
    p.add_argument("--mpp", type=float, default=1.0)
    p.add_argument("--key-digit", type=int, default=9)
    pair = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    float_pair = lambda text: tuple(float(v) for v in text.split(","))  # noqa: E731
    p.add_argument("--digits", type=pair, default=(5, 9), help="digits per slide: MIN,MAX")
    p.add_argument(
        "--key-count", type=pair, default=(1, 3), help="key digits per positive: MIN,MAX"
    )
    p.add_argument("--min-tissue", type=float, default=0.5, help="tissue share of a slide's crop")
    p.add_argument(
        "--strength",
        type=float_pair,
        default=(1.2, 1.6),
        help="digit stain strength range LOW,HIGH (higher: darker shapes)",
    )
    p.add_argument("--cohort-seed", type=int, default=None, help="the cohort's seed [--seed]")
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--pooling", default="gated_attention", help="MIL pooling of both arms")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="embed and train on")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--val-fraction", type=float, default=None, help="default: wsimil train's")
    p.add_argument("--max-instances", type=int, default=None, help="e2e arm: tiles per step")
    p.add_argument("--e2e-arg", action="append", default=[], help="extra train option (e2e arm)")
    p.add_argument("--e2e-augment", action="store_true", help="keep train's tile augmentation")
    p.add_argument("--tile-arg", action="append", default=[], help="extra wsimil tile option")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the model names and the results file")
    p.add_argument("--quick", action="store_true", help="6 slides of 256 px, 3 folds, 3 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.slides, args.side_px, args.folds, args.epochs = 6, 256, 3, 3
        # a 256 px slide is a 32 x 32 px mask at the default 8 µm per px: too coarse to be sure
        # of every slide's tissue, so the quick run draws the mask at 4
        args.tile_arg = ["--mask-mpp", "4", *args.tile_arg]
    args.background = None if args.synthetic_background else args.background
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if bad := set(args.arms) - set(ARMS):
        p.error(f"unknown arms {sorted(bad)}; choose from {', '.join(ARMS)}")
    return args


def run_arms(args, run: Path, results: dict, boxes: pd.DataFrame) -> None:
    """Embed and train the chosen arms, then evaluate them (fills ``results['arms']``)."""
    for arm in ARMS:
        r = results["arms"][arm] = {"status": "to be run" if arm not in args.arms else "running"}
        if arm not in args.arms:
            continue
        if arm == "e2e" and (why := e2e_missing()):
            r["status"] = why
            print(f"e2e arm {why}")
            continue
        if arm == "frozen":
            r["embed_s"] = wsimil("embed", run, "--encoder", args.encoder, "--device", args.device)
            extra, input_of = ["--encoder", args.encoder], frozen_input(run, args.encoder)
        else:
            if has_command("cache"):  # the tile cache as a stage of its own (train would write it)
                r["cache_s"] = wsimil("cache", run, "--px", args.tile_px)
            extra, input_of = e2e_train_args(args), e2e_input(run, args.tile_px)
        r["train_s"] = wsimil(
            "train", run, *train_args(args, arm + args.tag), "--device", args.device, *extra
        )
        t0 = time.perf_counter()
        r.update(evaluate_arm(run, arm + args.tag, input_of, boxes), status="done")
        r["eval_s"] = round(time.perf_counter() - t0, 1)
    done = [a for a in args.arms if results["arms"][a].get("status") == "done"]
    if len(done) == 2:
        a, b = (fold_splits(run / "models" / (x + args.tag)) for x in done)
        results["same_folds"] = same_folds(a, b)
        assert results["same_folds"], "the two arms were not trained on the same folds"


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = args.out.resolve()
    run.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    stages = {"cohort_s": make_cohort(args, run)}
    stages["tile_s"] = wsimil("tile", run, "--tile-px", args.tile_px, "--target-mpp", args.mpp,
                              "--no-gap-tiles", *args.tile_arg)  # fmt: skip
    boxes = pd.read_csv(run / "boxes.csv")
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "stages": stages, "arms": {}}  # fmt: skip
    run_arms(args, run, results, boxes)
    stages["total_s"] = round(time.perf_counter() - t_all, 1)
    (run / f"shape_results{args.tag}.json").write_text(
        json.dumps(results, indent=2, default=float) + "\n"
    )
    print(table(results))
    print("stages (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in stages.items()))
    return results


if __name__ == "__main__":
    main()
