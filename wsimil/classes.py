"""Slide classes: what a label cell means, the class set of a training cohort, and the
probabilities a model's logits give.

Two classes keep the paper's models exactly: one logit, a sigmoid, the probability of the
second class (``1``, the positive class) and a decision threshold. Three or more classes get a
softmax head and the most probable class is the prediction. Labels may be integers (``0``,
``1``, ``2``) or names (``LUAD``, ``LUSC``); the class set comes from the training labels
(integers in numeric order, names in alphabetical order) or from ``train.classes`` (that order).
"""

from __future__ import annotations

import math
import re

import numpy as np

#: the binary classes of a 0/1 label column
BINARY = ("0", "1")
MAX_NAME = 64
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")  # printable text, no control characters


def label_text(value) -> str | None:
    """A label cell as a class name: ``None`` when empty, ``"1"`` for ``1``, ``1.0`` or ``"1.0"``.

    Raises
    ------
    ValueError
        A value that cannot be a class name (control characters, over 64 characters, NaN).
    """
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and math.isfinite(number) and number.is_integer():
        text = str(int(number))
    if not _NAME.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not a class name (1-{MAX_NAME} printable characters)")
    return text


def class_value(name: str):
    """A class name as written to CSV/JSON: ``int`` for integer names (``"1"`` -> 1), else the name."""
    return int(name) if re.fullmatch(r"-?\d{1,18}", name) else name


def _order(name: str):
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def class_set(labels, *, configured=None, source: str = "labels") -> list[str]:
    """The classes, in order: ``configured`` (checked), or the distinct labels sorted.

    Raises
    ------
    ValueError
        Fewer than two classes, repeats, or labels outside ``configured`` (named).
    """
    names = sorted({n for n in (label_text(v) for v in labels) if n is not None}, key=_order)
    if configured:
        classes = [label_text(c) for c in configured]
        if len(set(classes)) != len(classes) or None in classes:
            raise ValueError(
                f"train.classes {list(configured)}: names must be unique and non-empty"
            )
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise ValueError(
                f"{source}: label(s) {', '.join(map(repr, unknown[:5]))} not in train.classes "
                f"{classes}; fix the labels or the classes"
            )
    else:
        classes = names
    if len(classes) < 2:
        raise ValueError(
            f"{source}: {len(classes)} class(es) {classes}; training needs labels of at least two classes"
        )
    return classes


def class_indices(labels, classes: list[str], *, ids, source: str) -> np.ndarray:
    """Each label's index in ``classes`` (int64); a label outside them is refused, naming its id."""
    where = {c: i for i, c in enumerate(classes)}
    out, bad = [], []
    for sid, value in zip(ids, labels, strict=True):
        name = label_text(value)
        if name not in where:
            bad.append(f"{sid}: {name!r}")
        else:
            out.append(where[name])
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"{source}: {len(bad)} label(s) not among the classes {classes}: "
            f"{'; '.join(bad[:5])}{more}"
        )
    return np.asarray(out, dtype=np.int64)


def n_outputs(n_classes: int) -> int:
    """Logits of a head: 1 for two classes (sigmoid), one per class otherwise (softmax)."""
    return 1 if n_classes <= 2 else n_classes


def probabilities(logits):
    """Class probabilities (B, C) from logits (B,) (binary: [1 - p, p]) or (B, C) (softmax)."""
    import torch

    if logits.dim() == 1:
        p = torch.sigmoid(logits.float())
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits.float(), dim=1)


def decide(probs: np.ndarray, classes: list[str], threshold: float | None) -> tuple[float, str]:
    """The slide's reported probability and predicted class from its class probabilities (C,).

    Binary: the probability of the positive (second) class, positive at ``threshold``.
    Otherwise: the most probable class and its probability.
    """
    probs = np.asarray(probs, dtype=float)
    if len(classes) == 2:
        p = float(probs[1])
        return p, classes[int(p >= (0.5 if threshold is None else threshold))]
    k = int(np.argmax(probs))
    return float(probs[k]), classes[k]


def check_manifest_labels(manifest, label_column: str, classes: list[str], model: str) -> None:
    """Refuse up front, naming the slides, manifest labels that are not among a model's classes."""
    if label_column not in manifest.columns:
        return
    known = manifest[manifest[label_column].notna()]
    class_indices(list(known[label_column]), classes, ids=list(known.slide_id),
                  source=f"manifest labels for model {model}")  # fmt: skip
