"""Synthetic cohorts: slides with deterministic labels and seeds, lesion masks, a manifest."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .slide_writer import write_synthetic_slide


@dataclass(frozen=True)
class SynthSlide:
    """One slide of a synthetic cohort.

    Attributes
    ----------
    slide_id : str
        ``synth_000``, ``synth_001``, ...
    path : Path
        The pyramidal ``.tiff``.
    label : int
        1 if the slide has lesions, else 0.
    lesion_mask_path : Path
        8-bit PNG (0/255) of the lesion mask; always written (all zero for negative slides).
    """

    slide_id: str
    path: Path
    label: int
    lesion_mask_path: Path


def _write_mask_png(mask: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, format="PNG")


def load_lesion_mask(path: str | Path, *, slide_width_px: int) -> tuple[np.ndarray, float]:
    """Read a lesion-mask PNG.

    Parameters
    ----------
    path : str or Path
        8-bit PNG, lesion where the value is > 127.
    slide_width_px : int
        Level-0 width of the slide the mask belongs to.

    Returns
    -------
    mask : ndarray, shape (h, w), bool
    downsample : float
        Level-0 pixels per mask pixel, ``slide_width_px / w``.
    """
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return arr > 127, float(slide_width_px) / arr.shape[1]


def _slide_seed(seed: int, index: int) -> int:
    return int(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 0x51DE, int(index)]).generate_state(
            1
        )[0]
    )


def _cohort_labels(n_slides: int, positive_fraction: float, seed: int) -> np.ndarray:
    """Exactly ``round(n_slides * positive_fraction)`` ones, shuffled deterministically."""
    n_pos = int(math.floor(n_slides * positive_fraction + 0.5))
    labels = np.zeros(n_slides, np.int64)
    labels[:n_pos] = 1
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xC0]).permutation(labels)


def _write_slide_and_mask(tiff: Path, png: Path, **slide_kw) -> None:
    """Write one slide and its mask PNG under ``.tmp`` names, then rename both into place."""
    tmp_tiff = tiff.with_name(tiff.name + ".tmp")
    tmp_png = png.with_name(png.name + ".tmp")
    mask = write_synthetic_slide(tmp_tiff, **slide_kw)
    _write_mask_png(mask, tmp_png)
    os.replace(tmp_png, png)
    os.replace(tmp_tiff, tiff)


def _write_manifest(out_dir: Path, slides: list[SynthSlide]) -> Path:
    """``manifest.csv`` (paths relative to ``out_dir``), written under a temporary name."""
    manifest = out_dir / "manifest.csv"
    tmp = manifest.with_name(manifest.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path", "label", "lesion_mask"])
        for s in slides:
            w.writerow(
                [
                    s.slide_id,
                    s.path.relative_to(out_dir).as_posix(),
                    s.label,
                    s.lesion_mask_path.relative_to(out_dir).as_posix(),
                ]
            )
    os.replace(tmp, manifest)
    return manifest


def make_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 24,
    positive_fraction: float = 0.5,
    width_px: int = 10_000,
    height_px: int = 10_000,
    mpp: float = 0.5,
    seed: int = 0,
    n_lesions: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write a synthetic cohort and its manifest.

    Writes ``slides/<slide_id>.tiff``, ``truth/<slide_id>_lesion.png`` and ``manifest.csv``
    (columns ``slide_id,path,label,lesion_mask``; paths relative to ``out_dir``).

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created).
    n_slides : int
        Number of slides (ids ``synth_000``, ``synth_001``, ...).
    positive_fraction : float
        Exactly ``round(n_slides * positive_fraction)`` slides are positive, in an order
        shuffled deterministically from ``seed``.
    width_px, height_px, mpp, n_lesions
        Passed to :func:`write_synthetic_slide`.
    seed : int
        Cohort seed; slide ``i`` uses a seed derived from ``(seed, i)``, so any slide can be
        regenerated alone.
    progress : callable, optional
        ``progress(i, n_slides, slide_id)`` after each slide, ``i`` = slides done (1-based).

    Returns
    -------
    Path
        The manifest. Slides are written to ``<name>.tmp`` and renamed, and slides whose
        ``.tiff`` and mask already exist are skipped, so a killed run resumes where it stopped.
    """
    out_dir = Path(out_dir)
    n_slides = int(n_slides)
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if not 0 <= positive_fraction <= 1:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    slides_dir, truth_dir = out_dir / "slides", out_dir / "truth"
    slides_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    labels = _cohort_labels(n_slides, positive_fraction, seed)
    digits = max(3, len(str(n_slides - 1)))

    slides: list[SynthSlide] = []
    for i in range(n_slides):
        sid = f"synth_{i:0{digits}d}"
        tiff = slides_dir / f"{sid}.tiff"
        png = truth_dir / f"{sid}_lesion.png"
        if not (tiff.is_file() and png.is_file()):
            _write_slide_and_mask(
                tiff,
                png,
                width_px=width_px,
                height_px=height_px,
                mpp=mpp,
                positive=bool(labels[i]),
                seed=_slide_seed(seed, i),
                n_lesions=n_lesions,
            )
        slides.append(SynthSlide(sid, tiff, int(labels[i]), png))
        if progress is not None:
            progress(i + 1, n_slides, sid)
    return _write_manifest(out_dir, slides)
