"""``wsimil check``: a pre-flight check of a cohort before any stage runs.

It reads the config and the manifest with the same checks every stage does (columns, slide
ids, labels), then checks every row without taking a lock or writing anything: the slide
path is given and exists, a plausible mpp in the manifest, and, by ``depth``:

- ``"exists"``: nothing more (10,000 rows in well under a second);
- ``"identify"`` (default): the file is a slide format wsimil reads (OpenSlide's format detection, or a
  TIFF/PNG/JPEG header), so empty, truncated-to-nothing and non-slide files are caught
  (about 0.1-0.5 ms per file);
- ``"open"``: the slide opens with the reader the stages use, and an mpp is known
  from the manifest or the slide. OpenSlide's own open costs about 10 ms of CPU per file
  (it hashes the smallest level), so 10,000 slides take about 100 s per core here; files
  are opened on ``workers`` threads, each distinct file once.

It ends with one line per problem (the first ``max_lines``), counts per kind and the time taken.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .manifest import MPP_RANGE, mpp_override


@dataclass
class CheckReport:
    """What :func:`check_cohort` found: one entry per problem row, and counts."""

    n_rows: int
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (slide_id, kind, line)
    n_unlabelled: int = 0
    class_counts: dict = field(default_factory=dict)  # label -> slides
    seconds: float = 0.0
    free_gb: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, kind, _ in self.problems:
            out[kind] = out.get(kind, 0) + 1
        return out


def _open_info(path: str) -> tuple[str, float | None, str]:
    """``("ok"|"unreadable", slide mpp, message)`` for one slide file."""
    from .slide import open_slide

    try:
        with open_slide(path) as slide:
            w, h = slide.dimensions
            return "ok", slide.mpp, f"{w}x{h}"
    except Exception as exc:  # every reader error is this slide's problem, reported in one line
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return "unreadable", None, text if str(path) in text else f"{path}: {text}"


def _identify(path: str) -> tuple[str, float | None, str]:
    """``("ok"|"unreadable", None, message)``: is the file a slide format wsimil reads?"""
    from .slide import IMAGE_SUFFIXES, TIFF_SUFFIXES

    try:
        if os.path.getsize(path) == 0:
            return "unreadable", None, f"{path}: 0 bytes; the copy of this slide is empty"
        import openslide

        if openslide.OpenSlide.detect_format(path):
            return "ok", None, ""
        suffix = "".join(Path(path).suffixes[-2:]).lower()
        if suffix in TIFF_SUFFIXES or Path(path).suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                tf.pages[0].shape  # noqa: B018 - parsing the first page is the check
            return "ok", None, ""
        if Path(path).suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                im.size  # noqa: B018
            return "ok", None, ""
    except Exception as exc:  # a header that does not parse: this slide's problem
        return "unreadable", None, f"{path}: not a readable slide ({type(exc).__name__}: {exc})"
    return "unreadable", None, f"{path}: not a slide format wsimil reads"


def _check_row(row: dict, opened: dict[str, tuple], opened_fully: bool) -> tuple[str, str] | None:
    """(kind, line) of a row's first problem, or None."""
    sid, path = row["slide_id"], row.get("path")
    try:
        mpp = mpp_override(row)
    except ValueError as exc:
        return "bad mpp", str(exc)
    if path is None or (isinstance(path, float) and math.isnan(path)):
        return "no path", f"{sid}: empty 'path'; give the slide file"
    if path not in opened:  # not opened (--no-open): existence only
        return None if os.path.exists(path) else ("missing file", f"{path}: no such file ({sid})")
    status, slide_mpp, text = opened[path]
    if status != "ok":
        return ("missing file" if not os.path.exists(path) else "unreadable"), text
    if mpp is None and opened_fully:
        lo, hi = MPP_RANGE
        if slide_mpp is None:
            return (
                "no mpp",
                f"{path}: no microns-per-pixel in the slide; fill its 'mpp' cell ({sid})",
            )
        if not lo <= slide_mpp <= hi:
            return "bad mpp", (
                f"{path}: the slide's own mpp {slide_mpp:g} is outside {lo}-{hi}; "
                f"fill its 'mpp' cell ({sid})"
            )
    return None


def check_cohort(
    manifest: pd.DataFrame,
    run_dir: str | Path,
    *,
    label_column: str = "label",
    depth: str = "identify",
    workers: int = 8,
) -> CheckReport:
    """Check every row of a validated manifest (:func:`wsimil.manifest.read_manifest`).

    Parameters
    ----------
    depth : {"exists", "identify", "open"}
        How far each distinct slide file is checked (see the module docstring).
    workers : int
        Threads opening slides.

    Returns
    -------
    CheckReport
    """
    t0 = time.perf_counter()
    rows = manifest.to_dict("records")
    opened: dict[str, tuple] = {}
    if depth not in ("exists", "identify", "open"):
        raise ValueError(f"depth {depth!r}: use exists, identify or open")
    if depth != "exists":
        paths = sorted({r["path"] for r in rows if isinstance(r.get("path"), str)})
        paths = [p for p in paths if os.path.exists(p)]
        how = _open_info if depth == "open" else _identify
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            opened = dict(zip(paths, pool.map(how, paths), strict=True))
    report = CheckReport(n_rows=len(rows))
    for row in rows:
        problem = _check_row(row, opened, depth == "open")
        if problem is not None:
            report.problems.append((str(row["slide_id"]), *problem))
        if label_column in row and row[label_column] is None:
            report.n_unlabelled += 1
        elif label_column in row:
            label = str(row[label_column])
            report.class_counts[label] = report.class_counts.get(label, 0) + 1
    run_dir = Path(run_dir)
    probe = run_dir if run_dir.exists() else run_dir.parent
    if probe.exists():
        report.free_gb = shutil.disk_usage(probe).free / 2**30
    report.seconds = time.perf_counter() - t0
    return report


def print_report(echo, report: CheckReport, *, max_lines: int = 20) -> None:
    """Print a report: problem lines (at most ``max_lines``), then one summary line."""
    for _, _, line in report.problems[:max_lines]:
        echo(f"error {line}")
    more = len(report.problems) - max_lines
    if more > 0:
        echo(f"... and {more} more problem row(s) (--max-lines to see more)")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.counts().items()))
    good = report.n_rows - len(report.problems)
    parts = [f"{report.n_rows} slide(s): {good} ready"]
    if kinds:
        parts.append(kinds)
    if report.class_counts:
        classes = ", ".join(f"{c} {n}" for c, n in sorted(report.class_counts.items()))
        thin = [c for c, n in report.class_counts.items() if n < 2]
        parts.append(
            f"labels {classes}"
            + (f" (train refuses a class of one slide: {', '.join(sorted(thin))})" if thin else "")
        )
    if report.n_unlabelled:
        parts.append(f"{report.n_unlabelled} without a label (train will refuse them)")
    if report.free_gb is not None:
        parts.append(f"{report.free_gb:,.1f} GiB free in the run folder")
    echo(f"{'; '.join(parts)}; checked in {report.seconds:.1f} s")
