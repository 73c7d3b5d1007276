"""The review web app (Flask): routes over a :class:`~.cohort.Cohort`.

    GET /                                       the cohort's slides (probability, label, split)
    GET /slide/<id>                             the slide's deep-zoom viewer
    GET /dzi/<id>.dzi, /dzi/<id>_files/<level>/<col>_<row>.jpeg     slide tiles, from the slide
    GET /overlay/<id>/<map>/<scaling>.dzi, ..._files/<level>/<col>_<row>.png   overlay tiles
    GET /thumb/<id>                             the heatmap's thumbnail
    GET /legend/<scaling>.png                   the colour bar (colours and opacity)
    GET /static/...                             viewer.js, viewer.css, OpenSeadragon

Every ``<id>`` is looked up in the manifest; levels and tile addresses are integers checked
against the image; maps and scalings are names from fixed lists. An unknown id, map, scaling
or address is 404; no part of a URL is joined to a file path (``/static/`` is Flask's, which
refuses paths outside the package's static folder).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from ..slide import SlideError
from .cohort import Cohort, UnknownSlide
from .deepzoom import TileNotFound
from .pages import index_page, slide_page

STATIC = Path(__file__).parent / "static"


def _legend_png(cmap: str, scale: str) -> bytes:
    from PIL import Image

    from ..overlay import blend, overlay_rgba

    ramp = np.linspace(0, 1, 160, dtype=np.float32)[None, :].repeat(14, 0)
    rgba = overlay_rgba(ramp, np.ones_like(ramp, bool), cmap=cmap, alpha=1.0, scale=scale)
    buf = io.BytesIO()
    Image.fromarray(blend(np.full((*ramp.shape, 3), 235, np.uint8), rgba)).save(buf, "PNG")
    return buf.getvalue()


def _tile_response(tiles, level: int, col: int, row: int, log):
    """One Deep Zoom tile as a response (404 outside the image)."""
    from flask import Response, abort

    t0 = time.perf_counter()
    try:
        data = tiles.tile(level, col, row)
    except TileNotFound:
        abort(404)
    if log is not None:
        log(f"tile {level}/{col}_{row} {1000 * (time.perf_counter() - t0):.1f} ms")
    return Response(data, mimetype=tiles.media_type,
                    headers={"Cache-Control": "private, max-age=3600"})  # fmt: skip


def create_app(cohort: Cohort, *, title: str = "wsimil review", log=None, trusted_hosts=None):
    """The Flask app serving ``cohort``; ``log(message)`` receives one line per tile timing
    when given (for benchmarks). With ``trusted_hosts`` (host names), a request whose ``Host``
    header names another host is refused (400): a web page the reviewer visits cannot read the
    slides through DNS rebinding."""
    from flask import Flask, Response, abort

    app = Flask("wsimil.viewer", static_folder=str(STATIC), static_url_path="/static")
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 3600
    app.config["TRUSTED_HOSTS"] = list(trusted_hosts) if trusted_hosts else None
    from ..overlay import SCALINGS

    legends = {s: _legend_png(cohort.cmap, s) for s in SCALINGS}

    def slide_tiles(sid: str):
        try:
            return cohort.slide_tiles(sid)
        except UnknownSlide:
            abort(404)
        except (SlideError, ValueError) as exc:  # a manifest slide that cannot be opened
            abort(Response(f"{exc}\n", status=500, mimetype="text/plain"))

    @app.get("/")
    def index():
        return index_page(cohort, title=title)

    @app.get("/slide/<sid>")
    def slide(sid: str):
        slide_tiles(sid)  # 404 / 500 first
        return slide_page(cohort.slide_info(sid))

    @app.get("/dzi/<sid>.dzi")
    def slide_dzi(sid: str):
        return Response(slide_tiles(sid).dzi(), mimetype="application/xml")

    @app.get("/dzi/<sid>_files/<int:level>/<int:col>_<int:row>.jpeg")
    def slide_tile(sid: str, level: int, col: int, row: int):
        return _tile_response(slide_tiles(sid), level, col, row, log)

    def overlay(sid: str, key: str, scale: str):
        try:
            return cohort.overlay_tiles(sid, key, scale)
        except UnknownSlide:
            abort(404)

    @app.get("/overlay/<sid>/<key>/<scale>.dzi")
    def overlay_dzi(sid: str, key: str, scale: str):
        return Response(overlay(sid, key, scale).dzi(), mimetype="application/xml")

    @app.get("/overlay/<sid>/<key>/<scale>_files/<int:level>/<int:col>_<int:row>.png")
    def overlay_tile(sid: str, key: str, scale: str, level: int, col: int, row: int):
        return _tile_response(overlay(sid, key, scale), level, col, row, log)

    @app.get("/thumb/<sid>")
    def thumb(sid: str):
        try:
            entry = cohort.entry(sid)
        except UnknownSlide:
            abort(404)
        name = (entry.record.get("files") or {}).get("thumbnail")
        path = cohort.layout.heatmap_slide(cohort.model, sid).thumbnail
        if not name or not path.is_file():
            abort(404)
        return Response(path.read_bytes(), mimetype="image/jpeg")

    @app.get("/legend/<scale>.png")
    def legend_png(scale: str):
        if scale not in legends:
            abort(404)
        return Response(legends[scale], mimetype="image/png")

    return app


def serve(app, *, host: str, port: int) -> None:
    """Serve with Werkzeug's threaded server (one reviewer or a few: no production server)."""
    from werkzeug.serving import run_simple

    run_simple(host, port, app, threaded=True, use_reloader=False, use_debugger=False)
