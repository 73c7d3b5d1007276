"""``wsimil predict``: score a cohort with a trained model from anywhere; external validation.

``wsimil predict RUN --model MODEL`` scores every slide of RUN's manifest from RUN's features
with the deployable model of ``MODEL`` (a name under ``RUN/models`` or a model folder anywhere;
:mod:`wsimil.deploy`), refusing per slide features that are not what the model was trained on.
Labels are optional. It writes, under ``RUN/predictions/<model>/`` (never into the model folder):

- ``slides/<slide_id>/tiles.csv`` (per tile: x, y, attention or instance score, scaled, rank)
  and ``slide.json`` (probability, prediction, label), one folder per slide, renamed into place;
- ``predictions.csv``: slide_id, probability, prediction, label, split (``external``);
- with labels of both classes: ``metrics.json`` (AUC, balanced accuracy, F1, sensitivity,
  specificity with stratified bootstrap 95% intervals over cases, ECE), ``roc.png`` and
  ``calibration.png`` (:mod:`wsimil.evaluate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .bags import read_rows
from .classes import check_manifest_labels
from .config import HeatmapConfig
from .deploy import SEEN_SPLITS
from .heatmap import HeatmapStage, _label, predict_settings, slide_scores
from .layout import RunLayout
from .runner import SlideOutcome, SlideStage, run_slides
from .store import atomic_output, open_store, write_text_atomic


class PredictStage(HeatmapStage):
    """Scores without drawing: :class:`HeatmapStage`'s model and checks, its own outputs."""

    name = "predict"
    changed = "another model or other features"

    def __init__(self, layout: RunLayout, model: str, *, device: str = "cpu"):
        super().__init__(layout, HeatmapConfig(device=device), model)
        SlideStage.__init__(self, layout.predicted(self.model_name))
        self.settings = predict_settings(self.settings["model_sha256"])

    def outputs(self, row):
        return [self.layout.predicted_slide(self.model_name, row["slide_id"])]

    def _record(self, row) -> Path:
        return self.outputs(row)[0] / "slide.json"

    def run_one(self, job) -> SlideOutcome:
        row, sid = job["row"], job["row"]["slide_id"]
        g = open_store(job["store"])
        feats = read_rows(g[self.array])  # features, or tiles for an end-to-end model
        label = _label(row.get(self.label_column))
        record = {"slide_id": sid, "label": label, "config_hash": self._hash(job["attrs"]),
                  "split": self.split_of(sid)}  # fmt: skip
        with atomic_output(self.outputs(row)[0], folder=True) as partial:
            if len(feats) == 0:
                record.update(status="empty", message=f"{sid}: 0 tiles", probability=None,
                              prediction=-1)  # fmt: skip
            else:
                decision, per_tile = slide_scores(self.predictor, feats)
                coords = np.asarray(g["coords"][...])
                table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], **per_tile})
                table.to_csv(partial / "tiles.csv", index=False)
                record.update(status="ok", message="", **decision)
            (partial / "slide.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        return SlideOutcome(record["status"], record["message"],
                            {k: record.get(k) for k in self.columns})  # fmt: skip


def run_predict(manifest: pd.DataFrame, out_dir: str | Path, model: str, *, overwrite=False,
                console=None, cohort=True, n_boot: int = 1000, device: str = "cpu",
                threads: int = 0) -> pd.DataFrame:  # fmt: skip
    """Score every slide of ``manifest`` (see the module docstring); then the cohort files.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, message, seconds, probability, prediction, label.
    """
    import torch

    layout = RunLayout(out_dir)
    stage = PredictStage(layout, model, device=device)
    if threads:
        torch.set_num_threads(threads)
    check_manifest_labels(manifest, stage.label_column, stage.predictor.classes, stage.model_name)
    stage.cache_tiles(manifest, console=console)
    result = run_slides(stage, manifest, overwrite=overwrite, console=console)
    if cohort:
        write_cohort(layout, stage, manifest, n_boot=n_boot)
    return result


def write_cohort(layout: RunLayout, stage: PredictStage, manifest: pd.DataFrame, *,
                 n_boot: int = 1000) -> dict | None:  # fmt: skip
    """``predictions.csv`` of the scored slides; with labels, ``metrics.json`` and the plots."""
    from .classes import label_text
    from .evaluate import evaluate, plot_roc_and_calibration

    folder, classes = stage.folder.path, stage.predictor.classes
    rows = []
    for rec in manifest.to_dict("records"):
        path = layout.predicted_slide(stage.model_name, str(rec["slide_id"])) / "slide.json"
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if r.get("status") == "ok":
            case = rec.get("case_id")
            rows.append({**{k: r.get(k) for k in ("slide_id", "probability", "prediction", "label")},
                         **{f"p_{c}": (r.get("probabilities") or {}).get(c) for c in classes if len(classes) > 2},
                         "split": r.get("split", "external"), "case": case if case is not None else r["slide_id"]})  # fmt: skip
    columns = ["slide_id", "probability", "prediction", "label"]
    columns += [f"p_{c}" for c in classes] if len(classes) > 2 else []
    table = pd.DataFrame(rows, columns=[*columns, "split", "case"])
    write_text_atomic(folder / "predictions.csv", table.drop(columns="case").to_csv(index=False))
    labelled = table[table.label.notna() & ~table.split.isin(SEEN_SPLITS)]  # held-out slides only
    if labelled.empty or labelled.label.nunique() < 2:
        return None
    y = np.array([classes.index(label_text(v)) for v in labelled.label])
    if len(classes) > 2:
        p = labelled[[f"p_{c}" for c in classes]].astype(float).to_numpy()
    else:
        p = labelled.probability.astype(float).to_numpy()
    report = evaluate(y, p, labelled.case.astype(str).to_numpy(), classes=classes,
                      threshold=stage.predictor.threshold, n_boot=n_boot)  # fmt: skip
    report["model"] = str(stage.predictor.folder)
    write_text_atomic(folder / "metrics.json", json.dumps(report, indent=1) + "\n")
    plot_roc_and_calibration(y, p, folder, title=stage.model_name, classes=classes)
    return report
