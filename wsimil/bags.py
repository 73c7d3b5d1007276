"""Bags for MIL training: slide feature stores of the embed stage, and generic bag tables.

Both sources give a list of :class:`Bag` (features (N, D) float32, binary label, group), so
``wsimil train`` runs one code path on a slide cohort and on a MIL CSV table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Bag:
    """One bag: a slide's (or a table bag's) instance features and its label."""

    bag_id: str
    features: np.ndarray  # (N, D) float32
    label: int
    group: str  # case_id, or bag_id when there is none


def load_slide_bags(
    manifest: pd.DataFrame,
    features_dir: str | Path,
    *,
    label_column: str = "label",
    memory_budget_gb: float = 8.0,
    console=None,
) -> tuple[list[Bag], list[dict]]:
    """Load the feature bags of the manifest's slides.

    Slides without a feature store or with 0 tiles are skipped (and reported). The total size is
    checked against ``memory_budget_gb`` before anything is loaded. ``case_id`` (when present)
    becomes the bag's group, so splits keep a patient's slides together.

    Returns
    -------
    bags : list of Bag
    skipped : list of dict(slide_id, reason)
    """
    from .store import open_store

    features_dir = Path(features_dir)
    present, skipped = [], []
    total_bytes = 0
    for rec in manifest.itertuples(index=False):
        store = features_dir / f"{rec.slide_id}.zarr"
        if not store.exists():
            skipped.append({"slide_id": rec.slide_id, "reason": f"no feature store at {store}"})
            continue
        g = open_store(store)
        n, d = g["features"].shape
        if n == 0:
            skipped.append({"slide_id": rec.slide_id, "reason": "0 tiles"})
            continue
        total_bytes += n * d * 4
        present.append((rec, g))
    if total_bytes > memory_budget_gb * 2**30:
        raise MemoryError(
            f"{features_dir}: the cohort's features need {total_bytes / 2**30:.1f} GiB as float32, over the "
            f"{memory_budget_gb} GiB budget; raise --memory-budget-gb or train on fewer slides"
        )
    bags = []
    for rec, g in present:
        label = getattr(rec, label_column)
        case = getattr(rec, "case_id", None)
        group = str(case) if case is not None and not pd.isna(case) else str(rec.slide_id)
        bags.append(Bag(str(rec.slide_id), np.asarray(g["features"][...], dtype=np.float32), int(label), group))
    if console is not None:
        for s in skipped:
            console.print(f"[yellow]skip[/yellow] {s['slide_id']}: {s['reason']}")
    return bags, skipped


def read_mil_table(path: str | Path) -> list[Bag]:
    """Read a MIL bag table: CSV without header, column 0 bag label, column 1 bag id, then features.

    The layout of the Musk1/Musk2/Elephant/UCSB files (one row per instance; the label repeated
    on every row of its bag). Bags keep the order of first appearance.

    Returns
    -------
    list of Bag, features (N_i, D) float32, group = bag id.

    Raises
    ------
    ValueError
        A file that is not in this layout, or a bag whose rows disagree on the label.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, header=None)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: cannot read the bag table ({exc}); expected CSV: label, bag id, features...") from exc
    if df.shape[1] < 3:
        raise ValueError(f"{path}: {df.shape[1]} columns; a bag table has label, bag id, then at least one feature")
    feats = df.iloc[:, 2:]
    if not all(pd.api.types.is_numeric_dtype(t) for t in feats.dtypes):
        raise ValueError(f"{path}: non-numeric feature columns (a header row?); the file must have no header")
    x = feats.to_numpy(np.float32)
    labels = df.iloc[:, 0].to_numpy()
    ids = df.iloc[:, 1].astype(str).to_numpy()
    bags = []
    for bag_id in pd.unique(ids):
        rows = ids == bag_id
        lab = np.unique(labels[rows])
        if len(lab) != 1:
            raise ValueError(f"{path}: bag {bag_id} has rows with different labels {lab.tolist()}")
        bags.append(Bag(str(bag_id), x[rows], int(lab[0] > 0), str(bag_id)))
    return bags
