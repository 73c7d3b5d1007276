"""``wsimil report``: the cohort outputs of a heatmap run, assembled from its per-slide records.

Per-slide heatmap jobs write only their own folder (``heatmaps/<model>/slides/<slide_id>/``
with ``slide.json``); this one step reads those records for every slide of the manifest and
writes, atomically:

- ``predictions.csv``: slide_id, probability, prediction, label of every scored slide;
- ``summary.json``: slides per status, and accuracy and ROC AUC over the labelled slides;
- ``index.html``: the review page listing every slide, failures with their reason.

It runs at the end of ``wsimil heatmap`` over a whole manifest, and as the final rule of the
workflow after per-slide jobs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .deploy import SEEN_SPLITS
from .layout import RunLayout
from .store import StatusLog, write_text_atomic

PREDICTION_COLUMNS = ["slide_id", "probability", "prediction", "label", "split"]


def slide_records(layout: RunLayout, model_name: str, slide_ids: list[str]) -> list[dict]:
    """The record of each slide; for a slide without one, its last error at heatmap or at an
    earlier stage (the real cause), else 'missing'."""
    last: dict[str, dict] = {}
    for line in StatusLog(layout.heatmaps(model_name).status_file).read():
        if line.get("status") in ("error", "ok", "empty"):
            last[str(line.get("slide_id"))] = line
    earlier = _earlier(layout, model_name)
    records = []
    for sid in slide_ids:
        files = layout.heatmap_slide(model_name, sid)
        try:
            records.append(json.loads(files.record.read_text(encoding="utf-8")))
            continue
        except (OSError, ValueError):
            pass
        line = last.get(sid)
        if line is not None and line.get("status") == "error":
            records.append({"slide_id": sid, "status": "error", "message": line.get("message")})
        elif (cause := earlier and earlier.cause(sid)) is not None:  # failed before heatmap
            records.append({"slide_id": sid, "status": "error", "message": f"{sid}: {cause}"})
        else:
            records.append(
                {"slide_id": sid, "status": "missing",
                 "message": f"{sid}: no heatmap yet; run `wsimil heatmap --model {model_name}`"}
            )  # fmt: skip
    return records


def _earlier(layout: RunLayout, model_name: str):
    """The earlier stages of a model's slides (its encoder's features, the tiles), if known."""
    from .earlier import before_heatmap

    folder = layout.model_dir(model_name)
    try:
        card = json.loads((folder / "card.json").read_text("utf-8"))
        return before_heatmap(layout, str(card["features"]["encoder"]["name"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        meta = json.loads((folder / "model.json").read_text("utf-8"))
        return before_heatmap(layout, str(meta["encoder"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cohort_summary(records: list[dict], *, model_name: str) -> dict:
    """Slides per status; accuracy and ROC AUC (macro one-vs-rest for 3+ classes) of the
    held-out scored slides with a label."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    scored = [r for r in records if r["status"] == "ok"]
    splits: dict[str, int] = {}
    for r in scored:
        splits[str(r.get("split", "unknown"))] = splits.get(str(r.get("split", "unknown")), 0) + 1
    labelled = [
        r for r in scored if r.get("label") is not None and r.get("split") not in SEEN_SPLITS
    ]  # accuracy and AUC on held-out slides only
    out = {
        "model": model_name,
        "n_slides": len(records),
        "status": counts,
        "n_scored": len(scored),
        "n_labelled": len(labelled),
        "splits": splits,
        "metrics_on": "held-out slides (test and external); training and validation slides are not counted",
        "accuracy": None,
        "auc": None,
    }
    if labelled:
        out["accuracy"] = float(
            np.mean([str(r["prediction"]) == str(r["label"]) for r in labelled])
        )
        out["auc"] = _auc(labelled)
    return out


def _auc(labelled: list[dict]) -> float | None:
    """ROC AUC of labelled records: binary (0/1 labels), or macro one-vs-rest over the classes
    of ``probabilities`` (3+ classes) when every class is present; None otherwise."""
    from sklearn.metrics import roc_auc_score

    classes = list(labelled[0].get("probabilities") or {})
    if classes:
        y = [str(r["label"]) for r in labelled]
        if set(y) != set(classes):
            return None
        p = np.array([[r["probabilities"][c] for c in classes] for r in labelled])
        index = [classes.index(v) for v in y]
        if len(classes) == 2:
            return float(roc_auc_score(index, p[:, 1]))
        return float(roc_auc_score(index, p, multi_class="ovr"))
    y = [str(r["label"]) for r in labelled]
    if set(y) != {"0", "1"}:
        return None
    return float(roc_auc_score([int(v) for v in y], [float(r["probability"]) for r in labelled]))


def write_report(
    layout: RunLayout,
    model_name: str,
    manifest: pd.DataFrame,
    *,
    review_page: bool = True,
    viewer_url: str = "",
) -> dict:
    """Write ``predictions.csv``, ``summary.json`` and (``review_page``) ``index.html``.

    ``viewer_url``: where ``wsimil review`` runs (e.g. ``http://localhost:8000``); the index
    then links each slide to its viewer page there (none when empty).

    Returns
    -------
    dict: the cohort summary (see :func:`cohort_summary`) and ``files`` written.
    """
    from .locks import SlideLock

    folder = layout.heatmaps(model_name).path
    folder.mkdir(parents=True, exist_ok=True)
    # One writer at a time, each reading the records after taking the lock: the report written
    # last always saw every slide finished before it (no name of a slide starts with '.').
    lock = SlideLock(folder / ".locks" / ".report.lock")
    lock.acquire(wait=True)
    try:
        return _write_report(layout, model_name, manifest, folder, review_page=review_page,
                             viewer_url=viewer_url)  # fmt: skip
    finally:
        lock.release()


def _write_report(layout, model_name, manifest, folder: Path, *, review_page: bool,
                  viewer_url: str) -> dict:  # fmt: skip
    records = slide_records(layout, model_name, [str(s) for s in manifest["slide_id"]])
    ok = [r for r in records if r["status"] == "ok"]
    table = pd.DataFrame([{c: r.get(c) for c in PREDICTION_COLUMNS} for r in ok],
                         columns=PREDICTION_COLUMNS)  # fmt: skip
    predictions = layout.predictions(model_name)
    write_text_atomic(predictions, table.to_csv(index=False))
    summary = cohort_summary(records, model_name=model_name)
    write_text_atomic(layout.cohort_summary(model_name), json.dumps(summary, indent=1) + "\n")
    files = [predictions, layout.cohort_summary(model_name)]
    if review_page:
        from .review import write_index

        files.append(write_index(folder, records, model_name=model_name, viewer_url=viewer_url))
    return {**summary, "files": [str(Path(f)) for f in files]}
