"""Markdown table of the metrics.csv files under result folders (OUT_DIR/<dataset>/<model>/).

Usage::

    python benchmarks/summarise_results.py OUT_DIR [OUT_DIR ...]

Per dataset x model: folds run, mean ± std over folds of accuracy, precision, recall, F1, AUC,
and the std of the per-repeat mean accuracy (the spread the paper's ± most likely denotes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

COLS = ["accuracy", "precision", "recall", "f1", "auc"]


def main() -> None:
    print("| data set | model | repeats x folds | " + " | ".join(COLS) + " | acc. std over repeats |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in COLS) + " | --- |")
    for root in map(Path, sys.argv[1:]):
        for f in sorted(root.glob("*/*/metrics.csv")):
            m = pd.read_csv(f)
            cells = [f"{m[c].mean():.3f} ± {m[c].std(ddof=0):.3f}" for c in COLS]
            rep = m.groupby("repeat").accuracy.mean()
            rs = f"{rep.std(ddof=0):.3f}" if len(rep) > 1 else "n/a"
            print(f"| {f.parent.parent.name} | {f.parent.name} | {m.repeat.nunique()} x {m.fold.nunique()} | " + " | ".join(cells) + f" | {rs} |")


if __name__ == "__main__":
    main()
