"""What ``wsimil review`` may serve: the slides of one run's manifest and their heatmaps.

A request names a slide by its id; the id is looked up in the manifest (a dict), and only the
path the manifest gives for it is ever opened. Nothing from a request is joined to a path:
an id that is not in the manifest is unknown (404), whatever it contains.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..layout import RunLayout
from .deepzoom import OpenSlideTiles, OverlayTiles, ReaderTiles


class UnknownSlide(LookupError):
    """A slide id (or map, or scaling) the cohort does not have."""


@dataclass
class SlideEntry:
    slide_id: str
    path: Path
    mpp: float | None
    label: object = None
    record: dict = field(default_factory=dict)


class Cohort:
    """The manifest's slides, their heatmap records and the settings the overlays are drawn with.

    Parameters
    ----------
    layout : RunLayout
    manifest : DataFrame (``slide_id``, ``path`` resolved, optional ``mpp``)
    model : str
        The heatmap folder's name (``RUN/heatmaps/<model>/``).
    cmap, alpha : the overlay's colour map and top opacity (the heatmap run's settings).
    max_open : int
        Slides kept open at once (least recently used closed first).
    """

    def __init__(self, layout: RunLayout, manifest, model: str, *, cmap: str, alpha: float,
                 label_column: str = "label", max_open: int = 16):  # fmt: skip
        from ..heatmap import _label
        from ..manifest import mpp_override
        from ..report import slide_records

        self.layout, self.model, self.cmap, self.alpha = layout, model, cmap, alpha
        ids = [str(s) for s in manifest["slide_id"]]
        records = {r["slide_id"]: r for r in slide_records(layout, model, ids)}
        self.slides: dict[str, SlideEntry] = {}
        for row in manifest.to_dict("records"):
            sid = str(row["slide_id"])
            self.slides[sid] = SlideEntry(sid, Path(row["path"]), mpp_override(row),
                                          _label(row.get(label_column)), records.get(sid, {}))  # fmt: skip
        self._open: OrderedDict[str, tuple] = OrderedDict()
        self._overlays: OrderedDict[tuple, OverlayTiles] = OrderedDict()
        self._lock = threading.Lock()
        self.max_open = max_open

    def entry(self, sid: str) -> SlideEntry:
        try:
            return self.slides[sid]
        except (KeyError, TypeError):
            raise UnknownSlide(sid) from None

    # -- slide tiles --------------------------------------------------------------------------
    def _opened(self, sid: str) -> tuple:
        """(wsimil Slide, Deep Zoom tiles) of a slide, opened once and kept (LRU)."""
        entry = self.entry(sid)
        with self._lock:
            if sid in self._open:
                self._open.move_to_end(sid)
                return self._open[sid]
            from ..slide import OpenSlideReader, open_slide

            slide = open_slide(entry.path, mpp=entry.mpp)
            if isinstance(slide, OpenSlideReader):
                tiles = OpenSlideTiles(slide)
            else:  # tifffile or Pillow: the same Deep Zoom layout from wsimil's reader
                tiles = ReaderTiles(slide)
            self._open[sid] = (slide, tiles)
            while len(self._open) > self.max_open:
                _, (old, _) = self._open.popitem(last=False)
                old.close()
            return slide, tiles

    def slide_tiles(self, sid: str):
        return self._opened(sid)[1]

    def slide_info(self, sid: str) -> dict:
        """Geometry, mpp and the heatmap record of a slide, for its viewer page."""
        entry = self.entry(sid)
        slide = self._opened(sid)[0]
        w, h = slide.dimensions
        rec = entry.record
        return {
            "slide_id": sid, "width": w, "height": h, "mpp": slide.mpp,
            "status": rec.get("status", "missing"), "message": rec.get("message", ""),
            "probability": rec.get("probability"), "prediction": rec.get("prediction"),
            "probabilities": rec.get("probabilities"), "split": rec.get("split"),
            "label": rec.get("label", entry.label), "n_tiles": rec.get("n_tiles", 0),
            "maps": self.maps(sid), "top": self.top_tiles(sid),
            "cmap": self.cmap, "alpha": self.alpha,
        }  # fmt: skip

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._open.popitem()[1][0].close()

    # -- overlays -------------------------------------------------------------------------------
    def _table(self, sid: str):
        import pandas as pd

        rec = self.entry(sid).record
        if rec.get("status") != "ok":
            return None
        return pd.read_csv(self.layout.heatmap_slide(self.model, sid).table)

    def _tile_px_level0(self, sid: str) -> int:
        from ..store import store_attrs

        attrs = store_attrs(self.layout.tile_store(sid)) or {}
        return int(attrs.get("tile_px_level0", 0))

    def maps(self, sid: str) -> dict[str, str]:
        """Map key -> what it shows: ``attention`` and, for models with a map per class,
        ``class<k>`` (evidence for the k-th class). Empty when the slide has no heatmap."""
        rec = self.entry(sid).record
        if rec.get("status") != "ok":
            return {}
        out = {"attention": "attention"}
        for k, name in enumerate((rec.get("files") or {}).get("class_overlays") or {}):
            out[f"class{k}"] = f"evidence for {name}"
        return out

    def top_tiles(self, sid: str) -> list[dict]:
        """The heatmap's top tiles (rank, level-0 x, y, size, attention), best first."""
        rec = self.entry(sid).record
        top = (rec.get("files") or {}).get("top") or []
        if not top:
            return []
        t = self._tile_px_level0(sid)
        return [{"rank": c["rank"], "x": c["x"], "y": c["y"], "size": t,
                 "attention": c["attention"]} for c in top]  # fmt: skip

    def overlay_tiles(self, sid: str, key: str, scale: str) -> OverlayTiles:
        """The overlay of one map at one scaling, made once per (slide, map, scaling)."""
        from ..overlay import SCALINGS

        if key not in self.maps(sid) or scale not in SCALINGS:
            raise UnknownSlide(f"{sid}/{key}/{scale}")
        cache_key = (sid, key, scale)
        with self._lock:
            if cache_key in self._overlays:
                self._overlays.move_to_end(cache_key)
                return self._overlays[cache_key]
        tiles = self._make_overlay(sid, key, scale)
        with self._lock:
            self._overlays[cache_key] = tiles
            while len(self._overlays) > 4 * self.max_open:
                self._overlays.popitem(last=False)
        return tiles

    def _make_overlay(self, sid: str, key: str, scale: str) -> OverlayTiles:
        from ..export import grid_step
        from ..overlay import overlay_rgba, scale_values
        from ..raster import paint_tiles

        table = self._table(sid)
        column = "attention"
        if key != "attention":
            column = [c for c in table.columns if c.startswith("map_")][int(key[len("class") :])]
        slide = self._opened(sid)[0]
        w, h = slide.dimensions
        t = self._tile_px_level0(sid)
        coords = table[["x", "y"]].to_numpy(np.int64)
        step = grid_step(coords, t)
        values = scale_values(table[column].to_numpy(np.float64), scale)
        heat, covered = paint_tiles(values, coords, tile_px_level0=t, downsample=step,
                                    shape=(-(-h // step), -(-w // step)))  # fmt: skip
        rgba = overlay_rgba(heat, covered, cmap=self.cmap, alpha=1.0, scale=scale)
        return OverlayTiles(rgba, step=step, width=w, height=h)


def heatmap_settings(layout: RunLayout, model: str) -> dict:
    """The heatmap run's ``cmap`` and ``alpha`` (its ``config.yaml``), else the defaults."""
    import yaml

    from ..config import HeatmapConfig

    cfg = HeatmapConfig().model_dump()
    try:
        saved = yaml.safe_load(layout.heatmaps(model).config_file.read_text("utf-8")) or {}
        saved = saved.get("heatmap", saved)
    except (OSError, ValueError, AttributeError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    return {k: saved.get(k, cfg[k]) for k in ("cmap", "alpha")}


def model_names_with_heatmaps(layout: RunLayout) -> list[str]:
    """The models that have a heatmap folder in the run (each a ``heatmaps/<name>/`` with
    ``slides/``), sorted."""
    folder = layout.root / "heatmaps"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "slides").is_dir())


def records_json(info: dict) -> str:
    """JSON for embedding in a page's ``<script type="application/json">`` (no ``</``)."""
    return json.dumps(info, default=str).replace("</", "<\\/")
