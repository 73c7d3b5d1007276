"""``wsimil heatmap``: slide predictions and attention heatmaps for pathologist review.

For each slide with features, runs the trained model and writes one folder,
``heatmaps/<model>/slides/<slide_id>/`` (renamed into place when complete):

- ``<slide_id>.csv``: per tile x, y (level 0), raw attention, per-slide min-max rescaled
  attention ``(a - min a) / (max a - min a)``, percentile rank, and the instance score for
  instance-level models;
- ``<slide_id>.png``: the rescaled attention painted on the tile grid (overlapping tiles
  averaged per pixel, optional Gaussian smoothing) over a thumbnail, with the tissue outline
  and a colour bar; ``<slide_id>.thumb.jpg`` the plain thumbnail;
- ``<slide_id>.geojson`` (QuPath tile objects with measurements), ``<slide_id>.heatmap.tiff``
  (pyramidal heatmap with the slide's geometry and mpp) and ``top/`` (crops of the
  highest-attention tiles): see :mod:`wsimil.export`;
- ``<slide_id>.html`` (the slide's review page) and ``slide.json`` (its record: status,
  probability, label, files), written last.

The cohort outputs (``predictions.csv``, ``summary.json``, ``index.html``) are assembled from
these records by :mod:`wsimil.report`, at the end of a whole-manifest run or by ``wsimil report``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .bags import read_rows
from .classes import check_manifest_labels
from .config import HeatmapConfig
from .deploy import check_features
from .earlier import before_heatmap
from .export import export_slide
from .layout import HeatmapFiles, RunLayout
from .manifest import mpp_override
from .overlay import percentile_rank, render_overlay
from .raster import minmax
from .review import write_slide_page
from .runner import SlideOutcome, SlideStage, run_slides
from .slide import SlideError, open_slide
from .store import atomic_output, config_hash, open_store, store_attrs


def slide_scores(predictor, features: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """Slide prediction and per-tile scores from a deployable model (:class:`wsimil.deploy.Predictor`).

    Returns
    -------
    decision : dict
        ``probability`` (binary: of the positive class; else of the predicted class),
        ``prediction`` (class name, an int for integer classes) and, unless the classes are
        ``0``/``1``, ``probabilities`` (class name -> probability).
    per_tile : dict of (N,) arrays: ``attention`` (raw weight; for instance models the instance
        score; for embedding poolings each tile's contribution, :class:`wsimil.mil.MILOutput`;
        with 3+ classes the predicted class's map), ``attention_scaled`` (min-max per slide),
        ``rank``, ``instance_score`` (NaN for attention models) and, where the model has a
        map per class, ``map_<class>`` for each. An ensemble averages each over its members.
    """
    from .classes import class_value

    probs, maps = predictor.score(features)
    prob, pred = predictor.decide(probs)
    decision = {"probability": prob, "prediction": class_value(pred)}
    if predictor.classes != ["0", "1"]:  # named or 3+ classes: every class's probability
        decision["probabilities"] = {
            c: float(v) for c, v in zip(predictor.classes, probs, strict=True)
        }
    nan = np.full(len(features), np.nan, np.float32)
    if maps["attention"] is not None:
        att, inst = maps["attention"], nan
    elif maps["instance_scores"] is not None:
        att = inst = maps["instance_scores"]
    else:  # embedding poolings: each tile's part in the pooled vector (see MILOutput)
        att, inst = maps["contributions"], nan
    per_tile = {
        "attention": att.astype(np.float32),
        "attention_scaled": minmax(att),
        "rank": percentile_rank(att),
        "instance_score": inst.astype(np.float32),
    }
    if maps["class_maps"] is not None:
        for c, m in zip(predictor.classes, maps["class_maps"], strict=True):
            per_tile[f"map_{c}"] = m.astype(np.float32)
    return decision, per_tile


def _label(value):
    """A manifest label as JSON-friendly class value (None when empty; 1.0 -> 1; names as text)."""
    from .classes import class_value, label_text

    name = label_text(value)
    return None if name is None else class_value(name)


def predict_settings(model_sha256: str) -> dict:
    """What ``wsimil predict``'s outputs depend on besides the features: the model files."""
    return {"stage": "predict", "model_sha256": model_sha256}


def model_location(layout: RunLayout, model: str) -> tuple[Path, str]:
    """The model folder and the output name of ``--model``: a name under ``RUN/models`` or a path.

    A path (anything with a ``/``) may be anywhere, e.g. another run's model folder; outputs go
    to ``RUN/heatmaps/<its folder name>/`` and nothing is written into the model folder.
    """
    from .layout import check_name

    if "/" in model or model in (".", ".."):
        folder = Path(model).expanduser().resolve()
        return folder, check_name(folder.name, what="model folder name")
    return layout.model_dir(model), model


class HeatmapStage(SlideStage):
    """``wsimil heatmap`` for :func:`wsimil.runner.run_slides`: one slide = one output folder."""

    name = "heatmap"
    columns = {"probability": np.nan, "prediction": -1, "label": None}
    changed = "other heatmap settings, model or features"

    def __init__(self, layout: RunLayout, cfg: HeatmapConfig, model: str):
        from .deploy import load_model

        folder, self.model_name = model_location(layout, model)
        super().__init__(layout.heatmaps(self.model_name))
        self.layout, self.cfg = layout, cfg
        self.predictor = load_model(folder).to(cfg.device)  # never unpickles
        # Slides of the model's own run folder may be ones it trained on; any other run's are external.
        self.own_run = folder.resolve().parent.parent == layout.root.resolve()
        self.meta = self.predictor.meta
        self.encoder = self.predictor.encoder_name
        self.pixel_px = self.predictor.pixel_side  # end-to-end models read the tile cache
        self.array = "tiles" if self.pixel_px else "features"
        self.label_column = self.meta["config"].get("label_column", "label")
        self.settings = {
            "stage": "heatmap",
            **cfg.model_dump(exclude={"review_page", "device", "viewer_url"}),  # no output changes
            # the card and every member's model.json, which holds its weights' SHA-256
            "model_sha256": config_hash({"card": self.predictor.card,
                                         "members": [m[2] for m in self.predictor.members]}),
        }  # fmt: skip

    def cache_tiles(self, manifest: pd.DataFrame, *, console=None) -> None:
        """End-to-end models: write the tile caches the slides lack (``wsimil cache``'s stage)."""
        if self.pixel_px:
            from .tile_cache import run_cache

            run_cache(manifest, self.layout.root, px=self.pixel_px, console=console)

    def split_of(self, sid: str) -> str:
        """The slide's split for this model (``external`` for another run's slides)."""
        return self.predictor.split_of(sid) if self.own_run else "external"

    def outputs(self, row):
        return [self.layout.heatmap_slide(self.model_name, row["slide_id"]).folder]

    def _feature_store(self, sid: str) -> Path:
        if self.pixel_px:
            return self.layout.tile_cache_store(self.pixel_px, sid)
        return self.layout.feature_store(self.encoder, sid)

    def _hash(self, feature_attrs: dict) -> str:
        return config_hash({**self.settings, "features": feature_attrs.get("config_hash")})

    def _record(self, row) -> Path:
        """The slide's record (``slide.json``), written last into its output folder."""
        return self.layout.heatmap_slide(self.model_name, row["slide_id"]).record

    def state(self, row):
        path = self._record(row)
        fattrs = store_attrs(self._feature_store(row["slide_id"]))
        if not path.is_file() or fattrs is None:
            return "missing", {}
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "changed", {}
        if record.get("config_hash") != self._hash(fattrs):
            return "changed", {}
        return "complete", {k: record.get(k) for k in self.columns}

    @cached_property
    def earlier(self):
        return before_heatmap(self.layout, self.encoder, pixel_px=self.pixel_px)

    def _no_features(self, sid: str) -> SlideError:
        if self.pixel_px:
            command = f"wsimil cache --px {self.pixel_px}"
            return SlideError(self.earlier.missing(sid, "tile cache", command))
        command = f"wsimil embed --encoder {self.encoder}"
        return SlideError(self.earlier.missing(sid, "features", command))

    def check(self, row) -> None:
        if not self._feature_store(row["slide_id"]).is_dir():
            raise self._no_features(row["slide_id"])
        mpp_override(row)

    def plan(self, row) -> dict:
        sid = row["slide_id"]
        store = self._feature_store(sid)
        attrs = store_attrs(store)
        if attrs is None:
            raise self._no_features(sid)
        if self.pixel_px:  # today's tiles, not the cache's record of them
            attrs = {**attrs, "tiles": store_attrs(self.layout.tile_store(sid)) or {}}
        check_features(self.predictor, attrs, sid)  # encoder weights, input, tile geometry
        if self.pixel_px:
            self._check_cache(sid, attrs["tiles"])
        name = attrs["encoder"]["name"]
        if name != self.encoder:
            raise SlideError(
                f"{sid}: features from encoder {name!r} but the model was trained on "
                f"{self.encoder!r}; re-embed with --encoder {self.encoder}"
            )
        shape = open_store(store)[self.array].shape
        if self.pixel_px and shape[0] and tuple(shape[1:]) != (self.pixel_px, self.pixel_px, 3):
            raise SlideError(f"{sid}: cached tiles of {shape[1:]} but the model reads "
                             f"({self.pixel_px}, {self.pixel_px}, 3); run wsimil cache --px {self.pixel_px}")  # fmt: skip
        if not self.pixel_px and shape[0] and shape[1] != self.meta["in_dim"]:
            raise SlideError(
                f"{sid}: feature dim {shape[1]} does not match the model's "
                f"{self.meta['in_dim']}; re-embed with --encoder {self.encoder}"
            )
        return {"row": row, "attrs": attrs, "store": store}

    def _check_cache(self, sid: str, tile_attrs: dict) -> None:
        """Refuse a tile cache made from other tiles than today's (one SlideError line)."""
        from .tile_cache import open_cache

        try:
            open_cache(self.layout, self.pixel_px, sid, tile_store_attrs=tile_attrs)
        except (ValueError, FileNotFoundError) as exc:
            raise SlideError(str(exc)) from exc

    def run_one(self, job) -> SlideOutcome:
        row, attrs = job["row"], job["attrs"]
        sid = row["slide_id"]
        label = _label(row.get(self.label_column))
        g = open_store(job["store"])
        feats = read_rows(g[self.array])  # (N, D) float32 features, or (N, S, S, 3) uint8 tiles
        files = self.layout.heatmap_slide(self.model_name, sid)
        with atomic_output(files.folder, folder=True) as partial:
            out = files.under(partial)
            if len(feats) == 0:
                record = self._empty_slide(row, out, label)
            else:
                coords = np.asarray(g["coords"][...])
                scored = self._predicted(sid, attrs, len(feats))
                if scored is None:  # not scored by `wsimil predict` with this model: score here
                    decision, per_tile = slide_scores(self.predictor, feats)
                    scored = (
                        decision,
                        pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], **per_tile}),
                    )
                record = self._scored_slide(row, out, label, *scored, attrs["tiles"])
            record.update(config_hash=self._hash(attrs), model=self.model_name,
                          split=self.split_of(sid))  # fmt: skip
            write_slide_page(out, record)
            out.record.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        values = {k: record.get(k) for k in self.columns}
        return SlideOutcome(record["status"], record["message"], values)

    def _predicted(self, sid: str, feature_attrs: dict, n_tiles: int):
        """The slide's decision and tile table from ``wsimil predict`` with this model on these
        features (``predictions/<model>/slides/<id>/``), or None when it has not scored them."""
        folder = self.layout.predicted_slide(self.model_name, sid)
        want = config_hash({**predict_settings(self.settings["model_sha256"]),
                            "features": feature_attrs.get("config_hash")})  # fmt: skip
        try:
            record = json.loads((folder / "slide.json").read_text(encoding="utf-8"))
            if record.get("status") != "ok" or record.get("config_hash") != want:
                return None
            table = pd.read_csv(folder / "tiles.csv")
        except (OSError, ValueError):
            return None
        if len(table) != n_tiles:
            return None
        keys = ("probability", "prediction", "probabilities")
        return {k: record[k] for k in keys if k in record}, table

    def _scored_slide(self, row, out: HeatmapFiles, label, decision, table, tiles: dict) -> dict:
        sid = row["slide_id"]
        table.to_csv(out.table, index=False)
        prob = decision["probability"]
        with open_slide(row["path"], mpp=mpp_override(row)) as slide:
            if slide.dimensions != (tiles["width_px"], tiles["height_px"]):
                raise SlideError(
                    f"{row['path']}: slide is {slide.dimensions} px but was tiled at "
                    f"{(tiles['width_px'], tiles['height_px'])}; re-run tile and embed"
                )
            called = f"{decision['prediction']} " if len(self.predictor.classes) > 2 else ""
            title = f"{sid}  {called}p={prob:.3f}" + (
                f"  label={label}" if label is not None else ""
            )
            files = export_slide(
                slide,
                table,
                slide_id=sid,
                tile_px_level0=int(tiles["tile_px_level0"]),
                out_dir=out.folder,
                cfg=self.cfg,
                title=title,
                tissue=_tissue_of(self.layout.tile_store(sid)),
            )
        return {
            "slide_id": sid, "status": "ok", "message": "", **decision, "label": label,
            "n_tiles": len(table),
            "files": {**files, "table": out.table.name, "page": out.page.name},
        }  # fmt: skip

    def _empty_slide(self, row, out: HeatmapFiles, label) -> dict:
        """Still show the reviewer the slide, marked as having no tissue tiles."""
        from PIL import Image

        sid = row["slide_id"]
        with open_slide(row["path"], mpp=mpp_override(row)) as slide:
            thumb, _ = slide.thumbnail(self.cfg.thumbnail_px)
        empty = np.zeros(thumb.shape[:2], np.float32)
        img = render_overlay(
            thumb, empty, empty > 0, cmap=self.cfg.cmap, alpha=self.cfg.alpha,
            title=f"{sid}  no tissue tiles", um_per_px=_um_per_px(slide, thumb),
        )  # fmt: skip
        Image.fromarray(img).save(out.overlay)
        Image.fromarray(thumb).save(out.thumbnail, quality=85)
        return {
            "slide_id": sid, "status": "empty", "message": f"{sid}: 0 tiles, thumbnail only",
            "probability": None, "prediction": -1, "label": label, "n_tiles": 0,
            "files": {"overlay": out.overlay.name, "thumbnail": out.thumbnail.name,
                      "page": out.page.name, "top": []},
        }  # fmt: skip


def _um_per_px(slide, thumb: np.ndarray) -> float | None:
    """Microns per thumbnail pixel (None when the slide has no mpp)."""
    return slide.mpp * slide.dimensions[0] / thumb.shape[1] if slide.mpp else None


def _tissue_of(tile_store: Path) -> tuple[np.ndarray, float] | None:
    """The tile store's tissue mask and its downsample, or None when absent."""
    attrs = store_attrs(tile_store)
    if attrs is None:
        return None
    try:
        g = open_store(tile_store)
        return np.asarray(g["tissue_mask"][...]), float(attrs.get("mask_downsample", 0) or 0)
    except (KeyError, OSError, ValueError):
        return None


def run_heatmap(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: HeatmapConfig,
    *,
    model_name: str,
    overwrite: bool = False,
    console=None,
    report: bool = True,
) -> pd.DataFrame:
    """Write scores, overlays and review-tool exports for every slide; then the cohort report.

    A slide that fails (no features, other encoder, slide moved or changed since tiling) gets
    one error line in ``status.jsonl`` and on the console; the other slides go on. With
    ``report`` (a run over the whole manifest) :func:`wsimil.report.write_report` assembles
    ``predictions.csv``, ``summary.json`` and, with ``cfg.review_page``, ``index.html``.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, message, seconds, probability, prediction, label.

    Raises
    ------
    FileNotFoundError
        No trained model at ``model_name``: a name under ``RUN/models`` or the path of a model
        folder anywhere (:func:`model_location`).
    ValueError
        The model files are refused (a legacy pickled ``checkpoint.pt``, or damaged files).
    """
    layout = RunLayout(out_dir)
    stage = HeatmapStage(layout, cfg, model_name)
    check_manifest_labels(manifest, stage.label_column, stage.predictor.classes, stage.model_name)
    stage.cache_tiles(manifest, console=console)
    result = run_slides(stage, manifest, overwrite=overwrite, console=console, settings=cfg)
    if report:
        from .report import write_report

        write_report(layout, stage.model_name, manifest, review_page=cfg.review_page,
                     viewer_url=cfg.viewer_url)  # fmt: skip
    return result
