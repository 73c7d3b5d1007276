"""The run folder: every path a stage reads or writes, and nothing else.

Stages, ``train``, the demo and the Snakemake workflow ask :class:`RunLayout` for paths; none
assembles them by hand. Standard library only, so the workflow can import it cheaply::

    RUN/manifest.csv
    RUN/tiles/<slide_id>.zarr, <slide_id>.qc.png                 (wsimil tile)
    RUN/features/<encoder>/<slide_id>.zarr                       (wsimil embed)
    RUN/tile_cache/<px>px/<slide_id>.zarr                        (wsimil cache)
    RUN/models/<name>/                                           (wsimil train)
    RUN/heatmaps/<model>/slides/<slide_id>/                      (wsimil heatmap, per slide)
    RUN/heatmaps/<model>/predictions.csv, summary.json, index.html  (wsimil report)
    RUN/exports/<format>/features_<encoder>/<slide_id>.h5        (wsimil export-features)
    <stage folder>/config.yaml, status.jsonl, .locks/<slide_id>.lock

A per-slide output is written under :func:`partial_path` (``.<name>.partial``) while its
slide's lock is held, then renamed into place: an output that exists is complete. Because only
the lock holder writes these names, a leftover partial output means an earlier attempt died;
the next holder removes it (no globbing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SLIDE_ID_MAX_LEN = 128
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
CACHE_PX = (8, 1024)  # allowed side of cached tiles (wsimil cache --px)


def check_name(name: str, *, what: str) -> str:
    """Return ``name`` if it is safe as one path component, else raise ValueError naming it.

    Allowed: letters, digits, ``.``, ``_`` and ``-``, not starting with ``.`` or ``-`` (so no
    ``.``/``..``, hidden names or option-like names), at most :data:`SLIDE_ID_MAX_LEN` long.
    The rule of slide ids, model names and encoder folders.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} {name!r}: empty; give every {what} a value")
    if len(name) > SLIDE_ID_MAX_LEN:
        raise ValueError(
            f"{what} {name[:40]!r}...: {len(name)} characters; at most {SLIDE_ID_MAX_LEN}"
        )
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r}: use only letters, digits, '.', '_' and '-' (not first: '.' or '-')"
        )
    return name


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is safe as a file name (:func:`check_name`)."""
    return check_name(slide_id, what="slide_id")


def encoder_dir_name(encoder: str) -> str:
    """Folder name of an encoder's features (``hf-hub:org/model`` -> ``hf-hub_org_model``)."""
    return check_name(re.sub(r"[^A-Za-z0-9._-]", "_", encoder).lstrip(".-"), what="encoder")


def check_px(px: int) -> int:
    """Return ``px`` if it is a tile cache side (an int in 8..1024), else raise ValueError."""
    if isinstance(px, bool) or not isinstance(px, int) or not CACHE_PX[0] <= px <= CACHE_PX[1]:
        raise ValueError(
            f"px {px!r}: the side of cached tiles must be a whole number of pixels in "
            f"{CACHE_PX[0]}..{CACHE_PX[1]}"
        )
    return px


def partial_path(final: Path) -> Path:
    """Where ``final`` is written before it is complete (only while holding its slide's lock)."""
    return final.with_name(f".{final.name}.partial")


def replaced_path(final: Path) -> Path:
    """Where an older ``final`` is moved for the moment a new one takes its place."""
    return final.with_name(f".{final.name}.old")


@dataclass(frozen=True)
class StageFolder:
    """A stage's output folder and its bookkeeping files."""

    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def status_file(self) -> Path:
        return self.path / "status.jsonl"

    def lock_file(self, slide_id: str) -> Path:
        return self.path / ".locks" / f"{check_slide_id(slide_id)}.lock"


@dataclass(frozen=True)
class HeatmapFiles:
    """The per-slide outputs of ``wsimil heatmap``, all inside one folder written atomically."""

    folder: Path
    slide_id: str

    def _f(self, suffix: str) -> Path:
        return self.folder / f"{self.slide_id}{suffix}"

    @property
    def record(self) -> Path:
        """``slide.json``: status, probability, label, exports; written last."""
        return self.folder / "slide.json"

    overlay = property(lambda self: self._f(".png"))
    thumbnail = property(lambda self: self._f(".thumb.jpg"))
    table = property(lambda self: self._f(".csv"))
    geojson = property(lambda self: self._f(".geojson"))
    tiff = property(lambda self: self._f(".heatmap.tiff"))
    page = property(lambda self: self._f(".html"))
    top_dir = property(lambda self: self.folder / "top")

    def under(self, folder: Path) -> HeatmapFiles:
        """The same files inside another folder (the partial folder while writing)."""
        return HeatmapFiles(folder, self.slide_id)


class RunLayout:
    """All paths of one run folder.

    Every method that takes a slide id or a name checks it (:func:`check_slide_id`,
    :func:`check_name`), so no path built here leaves the run folder.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    # -- tile -------------------------------------------------------------------------------
    @property
    def tiles(self) -> StageFolder:
        return StageFolder(self.root / "tiles")

    def tile_store(self, slide_id: str) -> Path:
        return self.root / "tiles" / f"{check_slide_id(slide_id)}.zarr"

    def tile_qc(self, slide_id: str) -> Path:
        return self.root / "tiles" / f"{check_slide_id(slide_id)}.qc.png"

    # -- embed ------------------------------------------------------------------------------
    def features(self, encoder: str) -> StageFolder:
        return StageFolder(self.root / "features" / encoder_dir_name(encoder))

    def feature_store(self, encoder: str, slide_id: str) -> Path:
        return self.features(encoder).path / f"{check_slide_id(slide_id)}.zarr"

    # -- cache ------------------------------------------------------------------------------
    def tile_cache(self, px: int) -> StageFolder:
        """``wsimil cache --px <px>``'s folder: each slide's tiles as uint8 pixels."""
        return StageFolder(self.root / "tile_cache" / f"{check_px(px)}px")

    def tile_cache_store(self, px: int, slide_id: str) -> Path:
        return self.tile_cache(px).path / f"{check_slide_id(slide_id)}.zarr"

    # -- train ------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.root / "models" / check_name(name, what="model name")

    # -- heatmap and report -----------------------------------------------------------------
    def heatmaps(self, model: str) -> StageFolder:
        return StageFolder(self.root / "heatmaps" / check_name(model, what="model name"))

    def heatmap_slide(self, model: str, slide_id: str) -> HeatmapFiles:
        folder = self.heatmaps(model).path / "slides" / check_slide_id(slide_id)
        return HeatmapFiles(folder, slide_id)

    def predictions(self, model: str) -> Path:
        return self.heatmaps(model).path / "predictions.csv"

    def review_index(self, model: str) -> Path:
        return self.heatmaps(model).path / "index.html"

    def cohort_summary(self, model: str) -> Path:
        return self.heatmaps(model).path / "summary.json"

    # -- predict ----------------------------------------------------------------------------
    def predicted(self, model: str) -> StageFolder:
        """``wsimil predict``'s folder of a model: per-slide scores and the cohort's metrics."""
        return StageFolder(self.root / "predictions" / check_name(model, what="model name"))

    def predicted_slide(self, model: str, slide_id: str) -> Path:
        """One slide's folder: ``tiles.csv`` (per-tile maps) and ``slide.json`` (its record)."""
        return self.predicted(model).path / "slides" / check_slide_id(slide_id)

    # -- export-features --------------------------------------------------------------------
    def exports(self, fmt: str) -> Path:
        """Default folder of ``wsimil export-features --format <fmt>``."""
        return self.root / "exports" / check_name(fmt, what="format")

    # -- demo and workflow ------------------------------------------------------------------
    @property
    def demo_config(self) -> Path:
        return self.root / "demo_config.yaml"

    @property
    def demo_results(self) -> Path:
        return self.root / "demo_results.json"

    @property
    def jobs(self) -> Path:
        """Snakemake's per-job logs inside the run folder."""
        return self.root / ".snakemake_jobs"
