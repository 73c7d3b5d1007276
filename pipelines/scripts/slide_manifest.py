"""Write a manifest holding only some slides of a cohort manifest (used by the Snakemake jobs).

Usage: python3 slide_manifest.py MANIFEST OUT SLIDE_ID [SLIDE_ID ...]

Relative slide paths are made absolute (against MANIFEST's folder) so OUT can live anywhere.
Standard library only: it runs with any python3 on a compute node.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path


def write_subset(manifest: Path, out: Path, slide_ids: list[str]) -> None:
    """Copy the rows of ``slide_ids`` from ``manifest`` to ``out`` (written atomically)."""
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = {r["slide_id"]: r for r in reader}
    unknown = [s for s in slide_ids if s not in rows]
    if unknown:
        raise SystemExit(
            f"{manifest}: unknown slide_id(s) {', '.join(unknown)}; check the workflow's manifest"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for sid in slide_ids:
            row = dict(rows[sid])
            p = Path(row["path"])
            row["path"] = str(p if p.is_absolute() else (manifest.parent / p).resolve())
            writer.writerow(row)
    os.replace(tmp, out)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__.strip().splitlines()[2])
    write_subset(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
