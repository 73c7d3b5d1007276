"""The static review page: offline, every slide listed by probability, loads in a real Chromium."""

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from wsimil.review import write_index, write_slide_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's chromium)"
)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v:
                self.refs.append(v)


@pytest.fixture()
def review(tmp_path):
    from wsimil.layout import RunLayout

    layout = RunLayout(tmp_path)
    rng = np.random.default_rng(0)
    records = []
    for i, (prob, label) in enumerate([(0.2, 0), (0.95, 1), (0.7, 0), (0.55, 1)]):
        sid = f"slide-{i}_x.1"
        files = layout.heatmap_slide("m", sid)
        files.top_dir.mkdir(parents=True)
        thumb = rng.integers(150, 255, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(thumb).save(files.thumbnail)
        over = thumb.copy()
        over[20:40, 20:40] = (200, 30, 30)
        Image.fromarray(over).save(files.overlay)
        files.table.write_text("x,y,attention\n0,0,1\n")
        Image.fromarray(thumb[:32, :32]).save(files.top_dir / "top01_x0_y0.jpg")
        top = {"file": "top01_x0_y0.jpg", "rank": 1, "x": 0, "y": 0, "attention": 0.3,
               "attention_scaled": 1.0}  # fmt: skip
        record = {
            "slide_id": sid, "status": "ok", "message": "", "probability": prob,
            "prediction": int(prob >= 0.5), "label": label, "n_tiles": 10 + i,
            "files": {"overlay": files.overlay.name, "thumbnail": files.thumbnail.name,
                      "table": files.table.name, "geojson": None, "tiff": None,
                      "page": files.page.name, "top": [top]},
        }  # fmt: skip
        write_slide_page(files, record)
        records.append(record)
    records.append(
        {"slide_id": "broken", "status": "error", "label": 1,
         "message": "broken: no features at x & <y>; run `wsimil embed` first"}
    )  # fmt: skip
    folder = layout.heatmaps("m").path
    (folder / "predictions.csv").write_text("slide_id\n")
    index = write_index(folder, records, model_name="m")
    return folder, index, pd.DataFrame(records)


def test_pages_are_offline_and_every_link_is_a_local_file(review):
    from urllib.parse import unquote

    folder, index, rows = review
    ok = rows.slide_id[rows.status == "ok"]
    pages = [index] + [folder / "slides" / sid / f"{sid}.html" for sid in ok]
    for page in pages:
        text = page.read_text()
        assert (
            "http://" not in text
            and "https://" not in text
            and "@import" not in text
            and "<script" not in text
        )
        p = _Links()
        p.feed(text)
        assert p.refs
        for ref in p.refs:
            if ref.startswith("data:"):
                continue
            assert (page.parent / unquote(ref)).exists(), (page.name, ref)


def test_index_sorts_by_probability_and_shows_correctness_and_failures(review):
    folder, index, rows = review
    text = index.read_text()
    order = [m for m in re.findall(r'<tr class="slide[^"]*" id="row-([^"]+)"', text)]
    assert order == ["slide-1_x.1", "slide-2_x.1", "slide-3_x.1", "slide-0_x.1", "broken"]
    assert text.count(">correct<") == 3 and text.count(">wrong<") == 1  # slide 2: p=0.7, label 0
    assert "no features at x &amp; &lt;y&gt;" in text and "3/4 held-out slides correct" in text


def _chromium(args, user_dir):
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={user_dir}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def _console_lines(stderr):
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_review_page_loads_in_headless_chromium_without_console_errors(review, tmp_path_factory):
    folder, index, rows = review
    ud = tmp_path_factory.mktemp("chromium-profile")
    # the check can fail: a page with a script error is caught
    bad = folder / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedFn();</script></body></html>")
    r = _chromium(["--dump-dom", bad.as_uri()], ud)
    assert any("undefinedFn" in line for line in _console_lines(r.stderr)), r.stderr[-2000:]
    bad.unlink()

    r = _chromium(["--dump-dom", index.as_uri()], ud)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _console_lines(r.stderr) == []
    dom = r.stdout
    for sid in rows.slide_id:
        assert f'id="row-{sid}"' in dom
    assert dom.count('class="pair"') == 2 * 4  # thumbnail + overlay for every scored slide
    sid = rows.slide_id[1]
    r = _chromium(["--dump-dom", (folder / "slides" / sid / f"{sid}.html").as_uri()], ud)
    assert r.returncode == 0 and _console_lines(r.stderr) == []
    assert "Top 1 attended tiles" in r.stdout

    shot = tmp_path_factory.mktemp("shot") / "index.png"
    r = _chromium(["--window-size=1000,800", f"--screenshot={shot}", index.as_uri()], ud)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (800, 1000)
    # the overlay's red square made it to the screen: images were loaded and drawn
    red = (img[..., 0] > 170) & (img[..., 1] < 70) & (img[..., 2] < 70)
    assert red.sum() > 50
    Path(shot).unlink()


def test_index_links_each_scored_slide_to_the_viewer_only_when_given_its_address(review):
    from wsimil.review import write_index

    folder, index, rows = review
    assert "open in viewer" not in index.read_text()  # no address: no links, page stays offline
    records = [{k: v for k, v in r.items() if not (isinstance(v, float) and np.isnan(v))}
               for r in rows.to_dict("records")]  # fmt: skip
    text = write_index(
        folder, records, model_name="m", viewer_url="http://localhost:8123/"
    ).read_text()
    p = _Links()
    p.feed(text)
    remote = sorted(r for r in p.refs if r.startswith("http"))
    ok = sorted(rows.slide_id[rows.status == "ok"])
    assert remote == sorted(f"http://localhost:8123/slide/{sid}" for sid in ok)
