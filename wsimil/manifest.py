"""The cohort manifest: ``slide_id, path, label[, case_id, mpp, ...]`` (CSV, never globbed).

What is checked when a manifest is read, before any slide is touched (:func:`read_manifest`):

- the columns ``slide_id`` and ``path`` (and the label column where a stage needs labels);
- every slide id: non-empty, unique, at most 128 letters, digits, ``.``, ``_`` or ``-`` and
  not starting with ``.`` or ``-`` (:func:`wsimil.layout.check_slide_id`), so no id can name
  a path outside the run folder;
- every label: a class name, an integer (``0``, ``1``, ``2``; ``1.0`` is ``1``) or a name such
  as ``LUAD`` of 1-64 printable characters (:mod:`wsimil.classes`); empty only where the stage
  does not need labels. Which classes a cohort has is checked where a model meets the labels
  (train: at least two classes, each with two slides or more; predict: the model's classes).

A manifest that fails these is refused whole, with one line listing the offending CSV lines.
What concerns one slide only (its file, its ``mpp``) is that slide's error when a stage gets to
it, and the other slides go on (:func:`mpp_override`; ``wsimil check`` reports them all up front).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .classes import label_text
from .layout import check_slide_id

REQUIRED = ("slide_id", "path")
PATH_COLUMNS = ("path", "lesion_mask")  # resolved against the manifest's folder when relative
MPP_RANGE = (0.05, 20.0)  # plausible microns per level-0 pixel
MAX_LISTED = 5  # offending rows named in one message


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and what to fix."""


def read_manifest(
    path: str | Path, *, require_label: bool = False, label_column: str = "label"
) -> pd.DataFrame:
    """Read and validate a manifest (see the module docstring for what is checked).

    Every cell is read as text and stripped; empty cells become ``None``. Relative paths are
    resolved against the manifest's folder. Labels become class names (``str``; ``None`` when empty).
    ``mpp`` is a float when valid; an invalid value is kept as written so that its slide, and
    only it, fails with a message naming it (:func:`mpp_override`).

    Returns
    -------
    DataFrame, one row per slide, at least ``slide_id`` (str) and ``path`` (absolute str).

    Raises
    ------
    ManifestError
        One line naming the file, the offending CSV lines (at most 5) and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:
        raise ManifestError(f"{path}: cannot read manifest CSV: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda col: col.str.strip()).astype(object)
    df = df.where(df != "", None)
    require = (label_column,) if require_label else ()
    check_columns(df, source=str(path), require=require, ids=False)
    _check_rows(df, path, label_column=label_column, require_label=require_label)
    base = path.parent.resolve()
    for col in PATH_COLUMNS:
        if col in df.columns:
            df[col] = [
                p if p is None else str(p if Path(p).is_absolute() else (base / p)) for p in df[col]
            ]
    if label_column in df.columns:
        df[label_column] = pd.Series([label_text(v) for v in df[label_column]], dtype=object)
    if "mpp" in df.columns:
        df["mpp"] = pd.Series([_mpp_value(v) for v in df["mpp"]], dtype=object)
    return df.reset_index(drop=True)


def _line(i: int) -> str:
    return f"line {i + 2}"  # the header is line 1


def _listed(problems: list[str]) -> str:
    more = len(problems) - MAX_LISTED
    return "; ".join(problems[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _check_rows(df: pd.DataFrame, path: Path, *, label_column: str, require_label: bool) -> None:
    """Refuse bad slide ids and labels, naming the lines."""
    bad_ids, first_seen = [], {}
    for i, sid in enumerate(df["slide_id"]):
        try:
            check_slide_id(sid if sid is not None else "")
        except ValueError as exc:
            bad_ids.append(f"{_line(i)}: {exc}")
            continue
        if sid in first_seen:
            bad_ids.append(f"{_line(i)}: slide_id {sid!r} repeats {_line(first_seen[sid])}")
        first_seen.setdefault(sid, i)
    if bad_ids:
        raise ManifestError(
            f"{path}: {len(bad_ids)} bad slide_id(s): {_listed(bad_ids)}; every slide_id must be "
            "unique, 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )
    if label_column not in df.columns:
        return
    bad = []
    for i, value in enumerate(df[label_column]):
        if value is None and not require_label:
            continue
        try:
            ok = label_text(value) is not None
        except ValueError:
            ok = False
        if not ok:
            bad.append(f"{_line(i)} ({df['slide_id'][i]}): {value or ''!r}")
    if bad:
        empty = "" if require_label else " or empty"
        raise ManifestError(
            f"{path}: {len(bad)} bad {label_column!r} value(s): {_listed(bad)}; a label must be "
            f"a class: an integer (0, 1, 2...) or a name of 1-64 printable characters{empty}"
        )


def _mpp_value(value):
    """A valid mpp as float; None when empty; anything else kept as written."""
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        return value
    return v if math.isfinite(v) and MPP_RANGE[0] <= v <= MPP_RANGE[1] else value


def check_columns(
    df: pd.DataFrame, *, source: str = "manifest", require=(), ids: bool = True
) -> None:
    """The checks every manifest gets, wherever it comes from: columns, unique slide ids.

    Raises
    ------
    ManifestError
        Naming ``source`` and what to fix.
    """
    missing = [c for c in (*REQUIRED, *require) if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{source}: manifest lacks column(s) {', '.join(missing)}; it needs slide_id, path and label"
        )
    if not ids:
        return
    ids = df["slide_id"].astype(str)
    dups = ids[ids.duplicated()].unique().tolist()
    if dups:
        raise ManifestError(
            f"{source}: duplicate slide_id(s) {', '.join(dups[:5])}; slide_id must be unique"
        )


def mpp_override(row: dict) -> float | None:
    """The manifest's ``mpp`` for one row (a dict), or None if absent/empty.

    Raises
    ------
    ValueError
        The value is not a number or outside 0.05-20 µm/px; the message names the slide.
    """
    mpp = row.get("mpp")
    if mpp is None or (isinstance(mpp, float) and math.isnan(mpp)):
        return None
    if isinstance(mpp, float) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return mpp
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        v = None
    what = "is not a number" if v is None else "is outside the plausible range"
    raise ValueError(
        f"{row.get('path') or row.get('slide_id')}: manifest mpp {mpp!r} {what} "
        f"({MPP_RANGE[0]}-{MPP_RANGE[1]} µm per level-0 pixel); fix the 'mpp' cell of slide "
        f"{row.get('slide_id')} or leave it empty to use the slide's own"
    )


def select(df: pd.DataFrame, *, shard_spec: str | None = None, slides: str | None = None):
    """The rows a stage command works on: ``--slides ID,ID,...`` and/or ``--shard I/N``."""
    if slides:
        wanted = [s.strip() for s in str(slides).split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(df["slide_id"]))
        if unknown:
            raise ManifestError(
                f"--slides: {', '.join(unknown[:5])} not in the manifest; check the slide ids"
            )
        df = df[df["slide_id"].isin(wanted)].reset_index(drop=True)
    return shard(df, shard_spec)


def shard(df: pd.DataFrame, spec: str | None) -> pd.DataFrame:
    """Keep every N-th row for ``spec`` = ``"I/N"`` (I in 0..N-1, or 1..N from Slurm arrays are not mixed: 0-based)."""
    if not spec:
        return df
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError as exc:
        raise ManifestError(f"--shard {spec!r}: expected I/N with 0 <= I < N") from exc
    if not 0 <= i < n:
        raise ManifestError(f"--shard {spec!r}: expected I/N with 0 <= I < N")
    return df.iloc[i::n].reset_index(drop=True)
