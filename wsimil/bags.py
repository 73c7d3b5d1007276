"""Bags for MIL training: slide feature stores of the embed stage, and generic bag tables.

Both sources give a list of :class:`Bag` (features (N, D) float32, class index, group) and
the class names the indices refer to (:mod:`wsimil.classes`), so ``wsimil train`` runs one
code path on a slide cohort and on a MIL CSV table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Bag:
    """One bag: a slide's (or a table bag's) instance features and its label.

    ``features`` is an (N, D) float32 array in memory, or, for cohorts over the memory budget,
    the slide's Zarr array (read when the bag is used; see :class:`BagTensors`).
    """

    bag_id: str
    features: np.ndarray  # (N, D) float32, or a zarr.Array of shape (N, D)
    label: int  # index into the cohort's classes (binary: 0 negative, 1 positive)
    group: str  # case_id, or bag_id when there is none


def read_rows(features, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a bag's features as float32 (an in-memory array is not copied).

    Tiles (N, S, S, 3) stay uint8: the pixel networks normalise them per chunk
    (:mod:`wsimil.pixel_models`)."""
    if features.ndim == 4:
        return np.asarray(features[start:stop], dtype=np.uint8)
    if isinstance(features, np.ndarray) and features.dtype == np.float32:
        return features[start:stop]
    return np.asarray(features[start:stop], dtype=np.float32)


def bag_nbytes(features) -> int:
    """Bytes of a bag in memory: float32 features or uint8 tiles."""
    itemsize = 1 if features.ndim == 4 else 4
    return int(np.prod(features.shape)) * itemsize


class Standardiser:
    """Per-feature mean/std from the training bags only."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = mean.astype(np.float32)
        self.std = np.maximum(std, 1e-6).astype(np.float32)

    @classmethod
    def fit(cls, bags: list[Bag], *, block: int = 65536) -> Standardiser:
        """Two passes over the bags; bags kept in their stores are read ``block`` rows at a time."""

        def blocks(f):
            if isinstance(f, np.ndarray):
                yield f
            else:
                for start in range(0, f.shape[0], block):
                    yield read_rows(f, start, start + block)

        n = sum(b.features.shape[0] for b in bags)
        mean = sum(x.sum(0, dtype=np.float64) for b in bags for x in blocks(b.features)) / n
        ss = sum(
            ((x - mean) ** 2).sum(0, dtype=np.float64) for b in bags for x in blocks(b.features)
        )
        return cls(mean, np.sqrt(ss / max(n - 1, 1)))

    def __call__(self, features):
        """(N, D) features (array or Zarr array) -> standardised float32 tensor (N, D).

        (N, S, S, 3) uint8 tiles pass unchanged (as a uint8 tensor): an end-to-end model
        normalises pixels itself, and its standardiser is the identity on 3 channels."""
        import torch

        rows = read_rows(features)
        if rows.ndim == 4:
            return torch.from_numpy(rows)
        return torch.from_numpy((rows - self.mean) / self.std)


class BagTensors:
    """The bags' standardised float32 tensors: held in memory up to a byte budget, the rest
    read from their stores when needed, one bag ahead in a background thread.

    Parameters
    ----------
    bags : list of Bag
    transform : callable
        (N, D) float32 array -> tensor (the training standardiser).
    budget_bytes : int
        Bags are kept in memory in order while their float32 size fits; the others are read
        (and transformed) on each use.
    """

    def __init__(self, bags: list[Bag], transform, *, budget_bytes: float):
        self.bags, self.transform = bags, transform
        self.cached: dict[int, object] = {}
        used = 0
        for i, b in enumerate(bags):
            nbytes = bag_nbytes(b.features)
            if isinstance(b.features, np.ndarray) or used + nbytes <= budget_bytes:
                self.cached[i] = transform(read_rows(b.features))
                used += nbytes
        self.n_streamed = len(bags) - len(self.cached)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int):
        return (
            self.cached[i] if i in self.cached else self.transform(read_rows(self.bags[i].features))
        )

    def items(self, order):
        """Yield ``(i, tensor)`` for the indices in ``order``, reading the next streamed bag ahead."""
        from concurrent.futures import ThreadPoolExecutor

        order = list(order)
        if self.n_streamed == 0:
            yield from ((i, self.cached[i]) for i in order)
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = {}
            for k, i in enumerate(order):
                for j in order[k : k + 2]:  # this bag and the next
                    if j not in self.cached and j not in ahead:
                        ahead[j] = pool.submit(self.__getitem__, j)
                yield i, (ahead.pop(i).result() if i in ahead else self.cached[i])

    def __iter__(self):
        return (x for _, x in self.items(range(len(self))))


def load_slide_bags(
    manifest: pd.DataFrame,
    store_of,
    *,
    label_column: str = "label",
    classes: list[str] = ("0", "1"),
    memory_budget_gb: float = 8.0,
    console=None,
    array: str = "features",
) -> tuple[list[Bag], list[dict]]:
    """Load the feature bags of the manifest's slides (``array="tiles"``: tile caches, uint8).

    Slides without a feature store or with 0 tiles are skipped (and reported). The total size is
    checked against ``memory_budget_gb`` before anything is loaded: within it, features are read
    into memory; over it, each bag keeps its Zarr array and is read when used (training caches
    what fits the budget, see :class:`BagTensors`). ``case_id`` (when present)
    becomes the bag's group, so splits keep a patient's slides together. A label is the index
    of its class in ``classes`` (a label outside them is refused, naming the slides).

    Parameters
    ----------
    store_of : callable
        slide_id -> path of its feature store (:meth:`wsimil.layout.RunLayout.feature_store`).

    Returns
    -------
    bags : list of Bag
    skipped : list of dict(slide_id, reason)
    """
    from .store import open_store

    present, skipped = [], []
    total_bytes = 0
    for rec in manifest.to_dict("records"):
        sid = str(rec["slide_id"])
        store = Path(store_of(sid))
        if not store.exists():
            skipped.append({"slide_id": sid, "reason": f"no feature store at {store}"})
            continue
        g = open_store(store)
        if g[array].shape[0] == 0:
            skipped.append({"slide_id": sid, "reason": "0 tiles"})
            continue
        total_bytes += bag_nbytes(g[array])
        present.append((rec, g))
    stream = total_bytes > memory_budget_gb * 2**30
    if stream and console is not None:
        console.print(
            f"the {array} need {total_bytes / 2**30:.1f} GiB in memory, over the {memory_budget_gb} GiB budget: "
            "training keeps what fits in memory and reads the other slides from their stores at each use"
        )
    from .classes import class_indices

    labels = class_indices([rec[label_column] for rec, _ in present], list(classes),
                           ids=[rec["slide_id"] for rec, _ in present], source="manifest")  # fmt: skip
    bags = []
    for (rec, g), label in zip(present, labels, strict=True):
        sid = str(rec["slide_id"])
        case = rec.get("case_id")
        group = str(case) if case is not None and not pd.isna(case) else sid
        feats = g[array] if stream else read_rows(g[array])
        bags.append(Bag(sid, feats, int(label), group))
    if console is not None:
        for s in skipped:
            console.print(f"[yellow]skip[/yellow] {s['slide_id']}: {s['reason']}")
    return bags, skipped


def read_mil_table(path: str | Path) -> list[Bag]:
    """The bags of :func:`read_bag_table` (labels are indices into its classes)."""
    return read_bag_table(path)[0]


def read_bag_table(path: str | Path, *, classes=None) -> tuple[list[Bag], list[str]]:
    """Read a MIL bag table: CSV without header, column 0 bag label, column 1 bag id, then features.

    The layout of the Musk1/Musk2/Elephant/UCSB files (one row per instance; the label repeated
    on every row of its bag). Bags keep the order of first appearance. Labels with two numeric
    values are binary, positive when above 0 (Musk's -1/1 and 0/1 alike); other labels are
    class names (``LUAD``, ``2``...) in the order of ``classes`` or sorted
    (:func:`wsimil.classes.class_set`).

    Returns
    -------
    bags : list of Bag, features (N_i, D) float32, group = bag id, label = class index
    classes : list of str

    Raises
    ------
    ValueError
        A file that is not in this layout, or a bag whose rows disagree on the label.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, header=None)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(
            f"{path}: cannot read the bag table ({exc}); expected CSV: label, bag id, features..."
        ) from exc
    if df.shape[1] < 3:
        raise ValueError(
            f"{path}: {df.shape[1]} columns; a bag table has label, bag id, then at least one feature"
        )
    feats = df.iloc[:, 2:]
    if not all(pd.api.types.is_numeric_dtype(t) for t in feats.dtypes):
        raise ValueError(
            f"{path}: non-numeric feature columns (a header row?); the file must have no header"
        )
    x = feats.to_numpy(np.float32)
    labels = df.iloc[:, 0].to_numpy()
    ids = df.iloc[:, 1].astype(str).to_numpy()
    bag_ids, bag_labels = [], []
    for bag_id in pd.unique(ids):
        lab = pd.unique(labels[ids == bag_id])
        if len(lab) != 1:
            raise ValueError(f"{path}: bag {bag_id} has rows with different labels {lab.tolist()}")
        bag_ids.append(str(bag_id))
        bag_labels.append(lab[0])
    numeric = pd.api.types.is_numeric_dtype(df.iloc[:, 0])
    if numeric and not classes and len(set(bag_labels)) <= 2:  # binary: positive above 0
        bag_labels, classes = [int(v > 0) for v in bag_labels], ["0", "1"]
    else:
        from .classes import class_indices, class_set

        classes = class_set(bag_labels, configured=classes, source=str(path))
        bag_labels = class_indices(bag_labels, classes, ids=bag_ids, source=str(path))
    bags = [Bag(b, x[ids == b], int(lab), b) for b, lab in zip(bag_ids, bag_labels, strict=True)]
    return bags, classes
