"""The cohort manifest: ``slide_id, path, label[, case_id, mpp, ...]`` (CSV, never globbed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

REQUIRED = ("slide_id", "path")
PATH_COLUMNS = ("path", "lesion_mask")  # resolved against the manifest's folder when relative


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and what to fix."""


def read_manifest(
    path: str | Path, *, require_label: bool = False, label_column: str = "label"
) -> pd.DataFrame:
    """Read and validate a manifest.

    Relative slide paths are resolved against the manifest's folder. Returns a DataFrame with
    at least ``slide_id`` (str) and ``path`` (absolute str); ``mpp`` is float when present.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype={"slide_id": str, "case_id": str})
    except Exception as exc:
        raise ManifestError(f"{path}: cannot read manifest CSV: {exc}") from exc
    missing = [
        c for c in REQUIRED + ((label_column,) if require_label else ()) if c not in df.columns
    ]
    if missing:
        raise ManifestError(
            f"{path}: manifest lacks column(s) {', '.join(missing)}; it needs slide_id, path and label"
        )
    df["slide_id"] = df["slide_id"].astype(str).str.strip()
    dups = df["slide_id"][df["slide_id"].duplicated()].unique().tolist()
    if dups:
        raise ManifestError(
            f"{path}: duplicate slide_id(s) {', '.join(dups[:5])}; slide_id must be unique"
        )
    base = path.parent.resolve()
    for col in PATH_COLUMNS:
        if col in df.columns:
            df[col] = [
                p if pd.isna(p) else str(p if Path(p).is_absolute() else (base / p))
                for p in df[col]
            ]
    if "mpp" in df.columns:
        df["mpp"] = pd.to_numeric(df["mpp"], errors="coerce")
    if require_label:
        if df[label_column].isna().any():
            bad = df.loc[df[label_column].isna(), "slide_id"].tolist()[:5]
            raise ManifestError(f"{path}: empty {label_column!r} for slide(s) {', '.join(bad)}")
    return df.reset_index(drop=True)


def mpp_override(rec) -> float | None:
    """The manifest's ``mpp`` for one row (a ``DataFrame.itertuples`` record), or None if absent/empty."""
    mpp = getattr(rec, "mpp", None)
    return None if mpp is None or pd.isna(mpp) else float(mpp)


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
