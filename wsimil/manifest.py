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
    if "slide_id" in df.columns:
        df["slide_id"] = df["slide_id"].astype(str).str.strip()
    check_columns(df, source=str(path), require=(label_column,) if require_label else ())
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


def check_columns(df: pd.DataFrame, *, source: str = "manifest", require=()) -> None:
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
    ids = df["slide_id"].astype(str)
    dups = ids[ids.duplicated()].unique().tolist()
    if dups:
        raise ManifestError(
            f"{source}: duplicate slide_id(s) {', '.join(dups[:5])}; slide_id must be unique"
        )


def mpp_override(row: dict) -> float | None:
    """The manifest's ``mpp`` for one row (a dict), or None if absent/empty."""
    mpp = row.get("mpp")
    return None if mpp is None or pd.isna(mpp) else float(mpp)


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
