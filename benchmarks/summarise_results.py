"""Markdown table of the metrics.csv files under result folders (OUT_DIR/<dataset>/<model>/).

Usage::

    python benchmarks/summarise_results.py OUT_DIR [OUT_DIR ...]

Per dataset x model: folds run, mean ± std over folds of accuracy, precision, recall, F1, AUC,
the std of the per-repeat mean accuracy (the spread the paper's ± most likely denotes), the
paper's accuracy and the difference where the paper has one, and the training seconds summed
over folds (from each fold's history.csv).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from reproduce_table1 import PAPER  # noqa: E402

COLS = ["accuracy", "precision", "recall", "f1", "auc"]


def main() -> None:
    print("| data set | model | repeats x folds | " + " | ".join(COLS) + " | acc. std over repeats | paper acc. | diff. | train s |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in COLS) + " | --- | --- | --- | --- |")
    for root in map(Path, sys.argv[1:]):
        for f in sorted(root.glob("*/*/metrics.csv")):
            m = pd.read_csv(f)
            cells = [f"{m[c].mean():.3f} ± {m[c].std(ddof=0):.3f}" for c in COLS]
            rep = m.groupby("repeat").accuracy.mean()
            rs = f"{rep.std(ddof=0):.3f}" if len(rep) > 1 else "n/a"
            paper = PAPER.get(f.parent.parent.name, {}).get(f.parent.name)
            ref = f"{paper:.3f} | {m.accuracy.mean() - paper:+.3f}" if paper else " | "
            sec = sum(pd.read_csv(h).seconds.sum() for h in f.parent.glob("folds/*/history.csv"))
            cells += [rs, ref, f"{sec:.0f}"]
            print(f"| {f.parent.parent.name} | {f.parent.name} | {m.repeat.nunique()} x {m.fold.nunique()} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
