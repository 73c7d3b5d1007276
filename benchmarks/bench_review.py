"""``wsimil review`` on a very large slide: first view in a browser, and each further tile.

Reuses ``bench_heatmap.py``'s cheap SIZE x SIZE pyramidal TIFF (generated once into
``--cache``) and makes a run folder around it by hand: manifest, a tile store holding the
tile size, and a heatmap record with a tile table of ~23,000 tiles (448 px) with hot spots.
Then starts ``wsimil review`` in a fresh process (nothing opened or cached) and measures:

- **first view**: headless Chromium (Playwright, the system's ``/usr/bin/chromium``) opens the
  slide's viewer page at 1600 x 1000; the time from navigation start until the slide and the
  overlay are fully drawn at the fit-to-window zoom (OpenSeadragon's ``getFullyLoaded()``);
  this includes opening the slide, the Deep Zoom descriptor, every tile of the view and
  building the overlay from the tile table;
- **further tiles**: ``--tiles`` random tiles never asked for before, fetched one at a time
  over HTTP at full resolution and at a middle level (client-side time per tile).

    python benchmarks/bench_review.py --cache /tmp/bench_cache --size 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_heatmap import _ellipse, write_cheap_slide  # noqa: E402

TILE_L0 = 448


def make_run(run: Path, slide: Path) -> str:
    """A run folder with one slide, its tile size and a heatmap of synthetic attention."""
    import pandas as pd
    import zarr

    from wsimil.layout import RunLayout
    from wsimil.slide import open_slide

    sid, layout = "big", RunLayout(run)
    run.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"slide_id": [sid], "path": [str(slide)], "label": ["1"]}).to_csv(
        layout.manifest, index=False
    )
    with open_slide(slide) as s:
        w, h = s.dimensions
    g = zarr.open_group(str(layout.tile_store(sid)), mode="w", zarr_format=3)
    g.attrs.update({"tile_px_level0": TILE_L0, "width_px": w, "height_px": h})
    gx, gy = np.meshgrid(
        np.arange(0, w - TILE_L0 + 1, TILE_L0), np.arange(0, h - TILE_L0 + 1, TILE_L0)
    )
    coords = np.stack([gx.ravel(), gy.ravel()], 1)
    coords = coords[_ellipse(coords[:, 0] + TILE_L0 / 2, coords[:, 1] + TILE_L0 / 2, w, h)]
    rng = np.random.default_rng(1)
    centres = rng.uniform(0.3, 0.7, (4, 2)) * (w, h)
    d2 = ((coords[:, None, :] - centres[None]) ** 2).sum(-1).min(1)
    att = np.exp(-d2 / (2 * (0.03 * w) ** 2) * 4 + rng.normal(0, 0.3, len(coords)))
    att /= att.sum()
    files = layout.heatmap_slide("m", sid)
    files.folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "attention": att}).to_csv(
        files.table, index=False
    )
    top = [{"rank": r + 1, "x": int(coords[i, 0]), "y": int(coords[i, 1]), "attention": float(att[i]), "file": ""}
           for r, i in enumerate(np.argsort(-att)[:8])]  # fmt: skip
    record = {"slide_id": sid, "status": "ok", "message": "", "probability": 0.9, "prediction": 1,
              "label": 1, "n_tiles": len(coords), "split": "external",
              "files": {"table": files.table.name, "top": top}}  # fmt: skip
    files.record.write_text(json.dumps(record))
    return sid


def _get_ms(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
    return 1000 * (time.perf_counter() - t0)


def first_view(base: str, sid: str) -> tuple[float, list[str]]:
    """Milliseconds from navigation start to the slide and overlay fully drawn; the URLs asked."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=["--no-sandbox"]
        )
        page = b.new_page(viewport={"width": 1600, "height": 1000})
        urls = []
        page.on("request", lambda r: urls.append(r.url))
        page.goto(f"{base}/slide/{sid}")
        page.wait_for_function(
            "window.wsimilViewer && wsimilViewer.world.getItemCount() === 2 &&"
            " wsimilViewer.world.getItemAt(0).getFullyLoaded() && wsimilViewer.world.getItemAt(1).getFullyLoaded()",
            polling=10, timeout=60_000,
        )  # fmt: skip
        ms = page.evaluate("performance.now()")
        b.close()
    return ms, urls


def replay(urls: list[str], workers: int = 6) -> float:
    """Milliseconds for a fresh server to answer the first view's requests, 6 at a time as a
    browser asks them (the server's part of the first view, without the browser's drawing)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    _get_ms(urls[0])  # the page first, then everything it asks for
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(_get_ms, urls[1:]))
    return 1000 * (time.perf_counter() - t0)


def _tile_size(url: str) -> int:
    import re

    with urllib.request.urlopen(url, timeout=60) as r:
        return int(re.search(rb'TileSize="(\d+)"', r.read()).group(1))


def further_tiles(base: str, sid: str, size: int, n: int) -> dict:
    """``n`` tiles never asked for before, near the centre (in tissue), one request at a time."""
    rng = np.random.default_rng(7)
    top = int(np.ceil(np.log2(size)))
    sources = {"slide": (f"{base}/dzi/{sid}", "jpeg"),
               "overlay": (f"{base}/overlay/{sid}/attention/rank", "png")}  # fmt: skip
    out = {}
    for name, level in (("full resolution", top), ("middle level", top - 4)):
        for kind, (url, ext) in sources.items():
            n_side = -(-(-(-size // 2 ** (top - level))) // _tile_size(url + ".dzi"))
            picks = {tuple(int(v) for v in rng.integers(n_side * 0.3, n_side * 0.7, 2)) for _ in range(4 * n)}
            out[f"{kind} tile, {name} (level {level})"] = [
                _get_ms(f"{url}_files/{level}/{c}_{r}.{ext}") for c, r in sorted(picks)[:n]
            ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--tiles", type=int, default=100, help="further tiles per kind")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--repeats", type=int, default=3, help="first views, each in a fresh server")
    a = ap.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    slide = a.cache / f"cheap_{a.size}.tiff"
    if not slide.exists():
        write_cheap_slide(slide, a.size)
    run = a.cache / f"review_run_{a.size}"
    sid = make_run(run, slide)
    base = f"http://127.0.0.1:{a.port}"
    print(f"slide {a.size:,} x {a.size:,} px; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    views, served = [], []
    for i in range(a.repeats):  # each time a fresh server: nothing opened, read or cached
        server = _start(run, a.port)
        try:
            ms, urls = first_view(base, sid)
            views.append(ms)
            if i == a.repeats - 1:
                tiles = further_tiles(base, sid, a.size, a.tiles)
        finally:
            server.terminate()
            server.wait()
        server = _start(run, a.port)
        try:
            served.append(replay(urls))
        finally:
            server.terminate()
            server.wait()
    print("first view in Chromium (navigation -> slide and overlay fully drawn), fresh server each: "
          + ", ".join(f"{v:.0f}" for v in views) + f" ms (median {np.median(views):.0f})")
    print(f"  the server's part ({len(urls)} requests replayed 6 at a time, fresh server each): "
          + ", ".join(f"{v:.0f}" for v in served) + f" ms (median {np.median(served):.0f})")
    for name, ms in tiles.items():
        ms = np.asarray(ms)
        print(f"{name}: median {np.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, max {ms.max():.1f} ms (n={len(ms)})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def _start(run: Path, port: int):
    server = subprocess.Popen([sys.executable, "-m", "wsimil.cli", "review", str(run), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            _get_ms(f"http://127.0.0.1:{port}/")
            return server
        except OSError:
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError("wsimil review did not start")


if __name__ == "__main__":
    main()
