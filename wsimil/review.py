"""Static review pages: one ``<slide_id>.html`` per slide folder and the cohort's ``index.html``.

Plain HTML + inline CSS, no scripts, no CDN, no web fonts: the pages open from disk, offline,
and every link is relative to the heatmap folder, so the folder can be zipped and mailed. A
slide's page is written by its heatmap job (:func:`write_slide_page`, inside the slide's
folder); the index by the cohort step (:func:`write_index`, :mod:`wsimil.report`).
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import quote

from .deploy import SEEN_SPLITS
from .layout import HeatmapFiles
from .store import write_text_atomic

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#eee;position:sticky;top:0}
img.pair{max-width:420px;width:100%;height:auto;border:1px solid #ccc;background:#fff}
.ok{color:#176b2c;font-weight:600}.bad{color:#b3261e;font-weight:600}.na{color:#777}
.err{background:#fdecea}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tiles figure{margin:0;background:#fff;border:1px solid #ccc;padding:4px;font-size:.85em}
.tiles img{width:200px;height:200px;display:block}
.side{display:grid;grid-template-columns:1fr 1fr;gap:12px}.side img{width:100%;height:auto;border:1px solid #ccc}
small{color:#555}
"""


def _href(*parts: str) -> str:
    return "/".join(quote(p) for p in parts)


def _verdict(label, prediction) -> tuple[str, str]:
    """(text, css class) of the prediction's correctness."""
    if label is None or not _called(prediction):
        return "n/a", "na"
    return ("correct", "ok") if str(label) == str(prediction) else ("wrong", "bad")


def _called(prediction) -> bool:
    """Whether a record has a prediction (``-1`` and None: not scored)."""
    return prediction is not None and prediction != -1


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{escape(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n'
    )


def _split_text(record: dict) -> str:
    split = record.get("split")
    return f"<br><small>{escape(str(split))}</small>" if split else ""


def _label_text(record: dict) -> str:
    label = record.get("label")
    return "" if label is None else escape(str(label))


def _probability(record: dict) -> str:
    p = record.get("probability")
    if p is None:
        return ""
    every = record.get("probabilities")
    if every:  # three or more classes: each class's probability, the predicted one in bold
        return " &middot; ".join(
            (f"<b>{escape(str(c))} {float(v):.3f}</b>" if str(c) == str(record.get("prediction"))
             else f"{escape(str(c))} {float(v):.3f}") for c, v in every.items()
        )  # fmt: skip
    return f"{float(p):.3f}"


def write_slide_page(files: HeatmapFiles, record: dict) -> Path:
    """Write the review page of one slide into its folder (links relative to that folder).

    Parameters
    ----------
    files : HeatmapFiles
        The slide's files (the partial folder while the heatmap job writes it).
    record : dict
        The slide's record: ``slide_id``, ``status``, ``probability``, ``prediction``, ``label``,
        ``n_tiles``, ``files`` (names of the overlay, thumbnail, table, geojson, tiff, ``top``).
    """
    sid = record["slide_id"]
    info = record.get("files", {})
    text, cls = _verdict(record.get("label"), record.get("prediction"))
    figs = []
    for t in info.get("top", []):
        figs.append(
            f'<figure class="top"><img alt="tile rank {t["rank"]}" src="{_href("top", t["file"])}">'
            f"<figcaption>#{t['rank']} attention {t['attention']:.4g} "
            f"(scaled {t.get('attention_scaled', float('nan')):.2f})<br>x={t['x']} y={t['y']}</figcaption></figure>"
        )
    exports = []
    for key, what in (("table", "tile scores (CSV)"), ("geojson", "QuPath GeoJSON"),
                      ("tiff", "pyramidal heatmap TIFF")):  # fmt: skip
        if info.get(key):
            exports.append(f'<a href="{_href(info[key])}">{what}</a>')
    state = (
        f"probability <b>{_probability(record)}</b>, prediction {escape(str(record.get('prediction')))}, "
        if record["status"] == "ok"
        else f"<b>{escape(str(record.get('message', '')))}</b>; "
    )
    body = (
        f'<p><a href="../../index.html">&larr; all slides</a></p><h1>{escape(sid)}</h1>'
        f"<p>{state}label {_label_text(record) or 'n/a'}, "
        f'<span class="{cls}">{text}</span>; {record.get("n_tiles", 0)} tiles. '
        + " &middot; ".join(exports)
        + "</p>"
        f'<div class="side"><img alt="thumbnail" src="{_href(info.get("thumbnail", ""))}">'
        f'<img alt="attention overlay" src="{_href(info.get("overlay", ""))}"></div>'
        + _class_figures(info.get("class_overlays") or {})
        + f'<h2>Top {len(figs)} attended tiles</h2><div class="tiles">{"".join(figs) or "<p>none saved</p>"}</div>'
    )
    files.page.write_text(_page(f"{sid} - wsimil", body), encoding="utf-8")
    return files.page


def _class_figures(overlays: dict) -> str:
    """The per-class evidence overlays (3+ classes with a map per class), side by side."""
    if not overlays:
        return ""
    figs = "".join(
        f'<figure><img alt="evidence for {escape(str(c))}" src="{_href(f)}">'
        f"<figcaption>{escape(str(c))}</figcaption></figure>"
        for c, f in overlays.items()
    )
    return f'<h2>Evidence for each class</h2><div class="side">{figs}</div>'


def _zoom_link(viewer_url: str, sid: str) -> str:
    """A link to the slide in ``wsimil review`` at ``viewer_url`` (nothing when empty)."""
    if not viewer_url:
        return ""
    href = f"{escape(viewer_url.rstrip('/'))}/slide/{quote(sid)}"
    return f'<br><a class="zoom" href="{href}">open in viewer</a>'


def _index_row(record: dict, viewer_url: str = "") -> str:
    sid = record["slide_id"]
    label = _label_text(record)
    if record["status"] not in ("ok", "empty"):
        return (
            f'<tr class="slide err" id="row-{escape(sid)}"><td>{escape(sid)}</td><td colspan="2">'
            f'{escape(str(record["status"]))}</td><td>{label}</td><td class="na">n/a</td>'
            f'<td colspan="2">{escape(str(record.get("message", "")))}</td></tr>'
        )
    info = record.get("files", {})
    text, cls = _verdict(record.get("label"), record.get("prediction"))
    folder = ("slides", sid)
    img = '<img class="pair" loading="lazy" alt="{what} of {sid}" src="{src}">'
    thumb = img.format(what="thumbnail", sid=escape(sid), src=_href(*folder, info["thumbnail"]))
    over = img.format(
        what="attention overlay", sid=escape(sid), src=_href(*folder, info["overlay"])
    )
    prediction = record.get("prediction")
    return (
        f'<tr class="slide" id="row-{escape(sid)}"><td><a href="{_href(*folder, info["page"])}">'
        f"{escape(sid)}</a><br><small>{record.get('n_tiles', 0)} tiles</small>{_split_text(record)}"
        f"{_zoom_link(viewer_url, sid)}</td>"
        f"<td>{_probability(record) or escape(record['status'])}</td>"
        f"<td>{escape(str(prediction)) if _called(prediction) else ''}</td>"
        f'<td>{label}</td><td class="{cls}">{text}</td><td>{thumb}</td><td>{over}</td></tr>'
    )


def write_index(
    folder: str | Path, records: list[dict], *, model_name: str = "", viewer_url: str = ""
) -> Path:
    """Write ``index.html``: every slide of the cohort by probability (highest first).

    Parameters
    ----------
    folder : path
        The model's heatmap folder (slides under ``slides/<slide_id>/``).
    records : list of dict
        One record per slide (see :func:`write_slide_page`); slides that failed or were not run
        carry ``status`` and ``message`` only.
    viewer_url : str
        Where ``wsimil review`` serves this cohort (e.g. ``http://localhost:8000``): each slide
        gets an "open in viewer" link there, which works while the viewer runs. Empty: none.
    """
    folder = Path(folder)
    ordered = sorted(
        records, key=lambda r: (-(r.get("probability") if r.get("probability") is not None
                                  else -1.0), r["slide_id"]),
    )  # fmt: skip
    scored = [r for r in records if r["status"] == "ok"]
    held_out = [r for r in scored if r.get("split") not in SEEN_SPLITS]
    verdicts = [_verdict(r.get("label"), r.get("prediction"))[1] for r in held_out]
    judged = [v for v in verdicts if v != "na"]
    seen = len(scored) - len(held_out)
    acc = (
        f"{judged.count('ok')}/{len(judged)} held-out slides correct"
        if judged
        else "no held-out labels"
    )
    if seen:
        acc += f" ({seen} slides the model was trained or tuned on are marked and not counted)"
    body = (
        f"<h1>wsimil heatmaps{(': ' + escape(model_name)) if model_name else ''}</h1>"
        f"<p>{len(records)} slides, {len(scored)} scored, {acc}. Sorted by slide probability (highest first). "
        "Overlay: attention scaled per slide (its colour bar names the scaling; dark red = highest, "
        "top tiles outlined and numbered); click a slide for its top tiles. "
        + (
            "<b>open in viewer</b> zooms into the slide in <code>wsimil review</code> (start it with "
            f"<code>wsimil review RUN</code>; the links go to {escape(viewer_url)}). "
            if viewer_url
            else ""
        )
        + '<a href="predictions.csv">predictions.csv</a></p>'
        "<table><thead><tr><th>slide</th><th>probability</th><th>prediction</th><th>label</th><th>result</th>"
        "<th>thumbnail</th><th>attention overlay</th></tr></thead><tbody>\n"
        + "\n".join(_index_row(r, viewer_url) for r in ordered)
        + "\n</tbody></table>"
    )
    index = folder / "index.html"
    write_text_atomic(index, _page(f"wsimil heatmaps {model_name}", body))
    return index
