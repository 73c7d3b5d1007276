"""Static review pages for a heatmap run: ``index.html`` and one ``<slide_id>.html`` per slide.

Plain HTML + inline CSS, no scripts, no CDN, no web fonts: the pages open from disk, offline,
and every link is relative to the heatmap folder, so the folder can be zipped and mailed.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from urllib.parse import quote

import pandas as pd

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


def _href(name: str) -> str:
    return quote(name)


def _verdict(label, prediction) -> tuple[str, str]:
    """(text, css class) of the prediction's correctness."""
    if label is None or pd.isna(label) or prediction is None or prediction < 0:
        return "n/a", "na"
    try:
        good = int(float(label)) == int(prediction)
    except (TypeError, ValueError):
        return "n/a", "na"
    return ("correct", "ok") if good else ("wrong", "bad")


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{escape(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n'
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_review_pages(
    out_dir: str | Path, results: pd.DataFrame, pages: dict[str, dict], *, model_name: str = ""
) -> Path:
    """Write ``index.html`` (all slides by probability) and a page per successful slide.

    Parameters
    ----------
    out_dir : Path
        The heatmap folder holding the overlays, thumbnails, crops and tables.
    results : DataFrame
        One row per slide: ``slide_id``, ``status``, ``probability``, ``prediction``, ``label``,
        ``message``.
    pages : dict
        slide_id -> the dict of :func:`wsimil.heatmap.export_slide` (+ ``n_tiles``).

    Returns
    -------
    Path of ``index.html``.
    """
    out_dir = Path(out_dir)
    df = results.copy()
    df["_p"] = df["probability"].fillna(-1.0)
    df = df.sort_values(["_p", "slide_id"], ascending=[False, True])
    ok = df[df.status == "ok"]
    n_lab = [
        (r.label, r.prediction)
        for r in ok.itertuples()
        if _verdict(r.label, r.prediction)[1] != "na"
    ]
    n_right = sum(_verdict(lab, p)[1] == "ok" for lab, p in n_lab)
    acc = f"{n_right}/{len(n_lab)} correct" if n_lab else "no labels"
    rows = []
    for r in df.itertuples():
        sid = str(r.slide_id)
        label = "" if r.label is None or pd.isna(r.label) else escape(str(r.label))
        if r.status == "ok":
            info = pages.get(sid, {})
            text, cls = _verdict(r.label, r.prediction)
            link = _href(f"{sid}.html")
            thumb = f'<img class="pair" loading="lazy" alt="thumbnail of {escape(sid)}" src="{_href(info.get("thumbnail", sid + ".thumb.jpg"))}">'
            over = f'<img class="pair" loading="lazy" alt="attention overlay of {escape(sid)}" src="{_href(info.get("overlay", sid + ".png"))}">'
            rows.append(
                f'<tr class="slide" id="row-{escape(sid)}"><td><a href="{link}">{escape(sid)}</a><br><small>{info.get("n_tiles", "")} tiles</small></td>'
                f'<td>{r.probability:.3f}</td><td>{int(r.prediction)}</td><td>{label}</td><td class="{cls}">{text}</td>'
                f"<td>{thumb}</td><td>{over}</td></tr>"
            )
        else:
            rows.append(
                f'<tr class="slide err" id="row-{escape(sid)}"><td>{escape(sid)}</td><td colspan="2">{escape(str(r.status))}</td>'
                f'<td>{label}</td><td class="na">n/a</td><td colspan="2">{escape(str(r.message))}</td></tr>'
            )
    body = (
        f"<h1>wsimil heatmaps{(': ' + escape(model_name)) if model_name else ''}</h1>"
        f"<p>{len(df)} slides, {len(ok)} scored, {acc}. Sorted by slide probability (highest first). "
        "Overlay: per-slide min-max rescaled attention (red = highest); click a slide for its top tiles. "
        '<a href="predictions.csv">predictions.csv</a></p>'
        "<table><thead><tr><th>slide</th><th>probability</th><th>prediction</th><th>label</th><th>result</th>"
        "<th>thumbnail</th><th>attention overlay</th></tr></thead><tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )
    index = out_dir / "index.html"
    _write(index, _page(f"wsimil heatmaps {model_name}", body))

    for r in ok.itertuples():
        sid = str(r.slide_id)
        info = pages.get(sid, {})
        text, cls = _verdict(r.label, r.prediction)
        label = "" if r.label is None or pd.isna(r.label) else escape(str(r.label))
        figs = []
        for t in info.get("top", []):
            src = _href(f"{sid}_top/{t['file']}")
            figs.append(
                f'<figure class="top"><img alt="tile rank {t["rank"]}" src="{src}"><figcaption>#{t["rank"]} '
                f"attention {t['attention']:.4g} (scaled {t.get('attention_scaled', float('nan')):.2f})<br>x={t['x']} y={t['y']}</figcaption></figure>"
            )
        exports = [f'<a href="{_href(sid + ".csv")}">tile scores (CSV)</a>']
        if info.get("geojson"):
            exports.append(f'<a href="{_href(info["geojson"])}">QuPath GeoJSON</a>')
        if info.get("tiff"):
            exports.append(f'<a href="{_href(info["tiff"])}">pyramidal heatmap TIFF</a>')
        body = (
            f'<p><a href="index.html">&larr; all slides</a></p><h1>{escape(sid)}</h1>'
            f"<p>probability <b>{r.probability:.3f}</b>, prediction {int(r.prediction)}, label {label or 'n/a'}, "
            f'<span class="{cls}">{text}</span>; {info.get("n_tiles", "")} tiles. '
            + " &middot; ".join(exports)
            + "</p>"
            f'<div class="side"><img alt="thumbnail" src="{_href(info.get("thumbnail", sid + ".thumb.jpg"))}">'
            f'<img alt="attention overlay" src="{_href(info.get("overlay", sid + ".png"))}"></div>'
            f'<h2>Top {len(figs)} attended tiles</h2><div class="tiles">{"".join(figs) or "<p>none saved</p>"}</div>'
        )
        _write(out_dir / f"{sid}.html", _page(f"{sid} - wsimil", body))
    return index
