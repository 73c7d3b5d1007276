"""The viewer's two pages: the cohort's slide list and one slide's deep-zoom viewer.

Plain HTML, every value escaped; the viewer page carries its slide's data as JSON in a
``<script type="application/json">`` block read by ``static/viewer.js``. Scripts and styles
come from the app's own ``/static/`` (OpenSeadragon vendored): nothing loads from elsewhere.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from .cohort import Cohort, records_json

_HEAD = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width,initial-scale=1">'
    '<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/viewer.css">'
    "<title>{title}</title></head>"
)


def _prob(rec: dict) -> str:
    p = rec.get("probability")
    if p is None:
        return escape(str(rec.get("status", "missing")))
    every = rec.get("probabilities")
    if every:
        return " &middot; ".join(f"{escape(str(c))} {float(v):.3f}" for c, v in every.items())
    return f"{float(p):.3f}"


def _text(value) -> str:
    return "" if value is None or value == -1 else escape(str(value))


def index_page(cohort: Cohort, *, title: str) -> str:
    """Every slide of the manifest by probability (highest first): id, probability,
    prediction, label, split, thumbnail; each id opens the slide's viewer."""

    def order(e):
        p = e.record.get("probability")
        return (-(p if p is not None else -1.0), e.slide_id)

    rows = []
    for e in sorted(cohort.slides.values(), key=order):
        rec, sid = e.record, e.slide_id
        href = f"/slide/{quote(sid)}"
        thumb = ""
        if (rec.get("files") or {}).get("thumbnail"):
            thumb = (
                f'<img loading="lazy" alt="thumbnail of {escape(sid)}" src="/thumb/{quote(sid)}">'
            )
        label = rec.get("label", e.label)
        rows.append(
            f'<tr class="slide" id="row-{escape(sid)}"><td><a href="{href}">{escape(sid)}</a>'
            f"<br><small>{rec.get('n_tiles', 0)} tiles</small></td><td>{_prob(rec)}</td>"
            f"<td>{_text(rec.get('prediction'))}</td><td>{_text(label)}</td>"
            f"<td>{_text(rec.get('split'))}</td><td>{thumb}</td></tr>"
        )
    body = (
        f"<h1>{escape(title)}</h1><p>{len(rows)} slides, by probability (highest first). "
        "Click a slide to open it with its attention overlay.</p>"
        "<table><thead><tr><th>slide</th><th>probability</th><th>prediction</th><th>label</th>"
        "<th>split</th><th>thumbnail</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    return _HEAD.format(title=escape(title)) + f'<body class="list">{body}</body></html>\n'


def slide_page(info: dict) -> str:
    """The viewer of one slide: the deep-zoom slide, the overlay controls, the top tiles."""
    sid = info["slide_id"]
    label = _text(info.get("label")) or "n/a"
    facts = (
        f'probability <b id="prob">{_prob(info)}</b> &middot; prediction '
        f"{_text(info.get('prediction')) or 'n/a'} &middot; label {label} &middot; split "
        f"{_text(info.get('split')) or 'n/a'} &middot; {info.get('n_tiles', 0)} tiles"
    )
    maps = "".join(
        f'<option value="{escape(k)}">{escape(v)}</option>' for k, v in info["maps"].items()
    )
    top = "".join(
        f'<li><button type="button" class="top" data-rank="{t["rank"]}">#{t["rank"]} '
        f"attention {t['attention']:.3g}</button></li>"
        for t in info["top"]
    )
    controls = (
        '<label><input type="checkbox" id="overlay-on" checked> overlay</label>'
        f'<label>map <select id="map">{maps}</select></label>'
        '<label>scaling <select id="scale"><option value="minmax">min-max in slide</option>'
        '<option value="rank">rank in slide</option></select></label>'
        '<label>opacity <input type="range" id="opacity" min="0" max="100" value="70"></label>'
        '<div id="legend"><img id="colourbar" alt="colour bar" src="/legend/minmax.png">'
        "<div><span>low</span><span>high</span></div></div>"
        if info["maps"]
        else f"<p>No overlay: {escape(str(info.get('message') or 'no heatmap for this slide'))}</p>"
    )
    body = (
        '<div id="side"><p><a href="/">&larr; all slides</a></p>'
        f"<h1>{escape(sid)}</h1><p>{facts}</p>{controls}"
        f'<h2>Top tiles</h2><ol id="top-list">{top or "<li>none</li>"}</ol>'
        "<p><small>Drag to pan, scroll to zoom; click a top tile to go there.</small></p></div>"
        '<div id="view"><div id="osd"></div><div id="scalebar"><div id="scalebar-bar"></div>'
        '<span id="scalebar-text"></span></div></div>'
        f'<script type="application/json" id="slide-info">{records_json(info)}</script>'
        '<script src="/static/openseadragon/openseadragon.min.js"></script>'
        '<script src="/static/viewer.js"></script>'
    )
    return (
        _HEAD.format(title=f"{escape(sid)} - wsimil review")
        + f'<body class="viewer">{body}</body></html>\n'
    )
