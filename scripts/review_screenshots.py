"""Screenshots of the review outputs for docs/heatmap.md, taken on a demo run.

    python scripts/review_screenshots.py demo_run docs/img [--slide ID]

Writes ``review_static.jpg`` (the slide's static page: thumbnail and overlay side by side),
``review_viewer.jpg`` (``wsimil review``'s viewer on the whole slide with the overlay) and
``review_viewer_zoom.jpg`` (after clicking the top tile), with headless Chromium through
Playwright. The slide is the labelled positive slide with the highest probability unless given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def pick_slide(run: Path, model: str) -> str:
    best = None
    for rec_path in sorted((run / "heatmaps" / model / "slides").glob("*/slide.json")):
        rec = json.loads(rec_path.read_text())
        if rec.get("status") == "ok" and str(rec.get("label")) == "1":
            if best is None or rec["probability"] > best["probability"]:
                best = rec
    return best["slide_id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="gated_attention")
    ap.add_argument("--slide", default=None)
    ap.add_argument("--port", type=int, default=8771)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    sid = a.slide or pick_slide(a.run, a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "wsimil.cli", "review", str(a.run), "--model",
                               a.model, "--port", str(a.port)], stdout=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{a.port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/", timeout=5).read()
                break
            except OSError:
                time.sleep(0.1)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = b.new_page(viewport={"width": 1400, "height": 800})
            static = a.run / "heatmaps" / a.model / "slides" / sid / f"{sid}.html"
            page.goto(static.resolve().as_uri())
            page.locator("div.side").screenshot(path=str(a.out / "review_static.jpg"), quality=85)
            page.goto(f"{base}/slide/{sid}")
            ready = (
                "wsimilViewer.world.getItemCount() === 2 && wsimilViewer.world.getItemAt(0)"
                ".getFullyLoaded() && wsimilViewer.world.getItemAt(1).getFullyLoaded()"
            )
            page.wait_for_function(ready, timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(a.out / "review_viewer.jpg"), quality=85)
            page.click("button.top[data-rank='1']")
            page.wait_for_timeout(1500)
            page.wait_for_function(ready, timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(a.out / "review_viewer_zoom.jpg"), quality=85)
            b.close()
    finally:
        server.terminate()
        server.wait()
    print(f"{sid}: wrote {a.out}/review_static.jpg, review_viewer.jpg, review_viewer_zoom.jpg")


if __name__ == "__main__":
    main()
