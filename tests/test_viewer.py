"""``wsimil review``: the viewer app served for real and driven in headless Chromium.

A small real run (synthetic slides, real tiling, training and heatmaps; features written by
the test with a lesion signal, as in test_heatmap_run.py) is served by the app on a free port
in a thread; Playwright drives Debian's Chromium (no browser download). Without Chromium the
browser tests skip with the reason; the HTTP checks still run.
"""

import json
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from wsimil.config import HeatmapConfig, TileConfig, TrainConfig
from wsimil.demo import lesion_tile_labels
from wsimil.heatmap import run_heatmap
from wsimil.manifest import read_manifest
from wsimil.store import open_store, write_array
from wsimil.synth import load_lesion_mask, make_cohort
from wsimil.tile import run_tile
from wsimil.train import run_train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's chromium)"
)
ENC, DIM = "toyenc", 16


def _features(run, sid, labels, coords, tile_attrs, rng):
    import zarr

    feats = rng.normal(0, 1, (len(coords), DIM)).astype(np.float32)
    feats[:, :4] += 3.0 * labels[:, None]
    g = zarr.open_group(str(run / "features" / ENC / f"{sid}.zarr"), mode="w", zarr_format=3)
    write_array(g, "features", feats.astype(np.float16))
    write_array(g, "coords", coords.astype(np.int32))
    g.attrs.update({"encoder": {"name": ENC, "feature_dim": DIM}, "tiles": tile_attrs})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reviewrun")
    path = make_cohort(run, n_slides=4, width_px=3072, height_px=2048, mpp=0.5, seed=5)
    manifest = read_manifest(path, require_label=True)
    run_tile(manifest, run, TileConfig(target_mpp=1.0, tile_px=64, tissue_threshold=0.5, qc_px=128))
    rng = np.random.default_rng(0)
    for rec in manifest.itertuples(index=False):
        tg = open_store(run / "tiles" / f"{rec.slide_id}.zarr")
        ta, coords = dict(tg.attrs), np.asarray(tg["coords"][...])
        mask, ds = load_lesion_mask(rec.lesion_mask, slide_width_px=ta["width_px"])
        y = lesion_tile_labels(coords, tile_px_level0=ta["tile_px_level0"], mask=mask,
                               mask_downsample=ds)  # fmt: skip
        _features(run, rec.slide_id, y, coords, ta, rng)
    run_train(manifest, run, TrainConfig(epochs=10, hidden_dim=16, attention_dim=8, seed=0),
              encoder=ENC)  # fmt: skip
    run_heatmap(manifest, run, HeatmapConfig(thumbnail_px=256, top_k=4, geojson=False,
                                             pyramid_tiff=False), model_name="gated_attention")  # fmt: skip
    return run, manifest


@pytest.fixture(scope="module")
def server(run):
    from werkzeug.serving import make_server

    from wsimil.viewer.serve import open_review

    app, name = open_review(run[0])
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", run[1], app
    srv.shutdown()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, None, b""


def test_only_manifest_slides_are_served_and_tiles_come_from_the_slide(server, run):
    from PIL import Image

    from wsimil.slide import open_slide

    base, manifest, _ = server
    sid = manifest.slide_id[0]
    status, kind, body = _get(f"{base}/dzi/{sid}.dzi")
    assert status == 200 and b'Width="3072"' in body and b'Height="2048"' in body
    # a level-12 tile (full resolution) is the slide's own pixels there
    status, kind, body = _get(f"{base}/dzi/{sid}_files/12/2_3.jpeg")
    assert status == 200 and kind == "image/jpeg"
    import io

    tile = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float32)
    with open_slide(manifest.path[0]) as s:
        want = s.read_region((2 * 254 - 1, 3 * 254 - 1), 0, (256, 256)).astype(np.float32)
    assert tile.shape == (256, 256, 3) and np.abs(tile - want).mean() < 6
    refused = [
        "/dzi/not_a_slide.dzi", "/dzi/..%2Fmanifest.dzi", "/dzi/%2Fetc%2Fpasswd.dzi",
        f"/dzi/{sid}_files/13/0_0.jpeg", f"/dzi/{sid}_files/12/99_0.jpeg",
        "/slide/..%2F..%2Fetc%2Fpasswd", "/static/../manifest.csv", "/static/%2e%2e/cohort.py",
        f"/overlay/{sid}/attention/log.dzi", f"/overlay/{sid}/class7/rank.dzi",
        "/thumb/nope", "/manifest.csv",
    ]  # fmt: skip
    for path in refused:
        assert _get(base + path)[0] == 404, path
    assert _get(f"{base}/slide/{sid}")[0] == 200


def test_requests_naming_another_host_are_refused_on_loopback(server):
    base, manifest, app = server
    client = app.test_client()
    assert client.get("/", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        assert client.get("/", headers={"Host": host}).status_code == 400, host


def test_the_static_index_links_each_slide_to_the_running_viewer(server, run):
    import re

    from wsimil.layout import RunLayout
    from wsimil.report import write_report

    base, manifest, _ = server
    summary = write_report(RunLayout(run[0]), "gated_attention", manifest, viewer_url=base)
    index = [f for f in summary["files"] if f.endswith("index.html")][0]
    links = re.findall(r'href="(http[^"]+)"', open(index).read())
    assert sorted(links) == sorted(f"{base}/slide/{sid}" for sid in manifest.slide_id)
    for link in links:
        status, kind, body = _get(link)
        assert status == 200 and b"openseadragon.min.js" in body


def test_overlay_tiles_are_transparent_off_tissue_and_coloured_on_the_top_tile(server, run):
    import io

    from PIL import Image

    base, manifest, app = server
    sid = manifest.slide_id[0]
    rec = json.loads((run[0] / "heatmaps/gated_attention/slides" / sid / "slide.json").read_text())
    top = rec["files"]["top"][0]
    status, _, body = _get(f"{base}/overlay/{sid}/attention/rank.dzi")
    assert status == 200 and b'Format="png"' in body
    # level 12 = full size, 256 px tiles: the tile holding the top tile's centre
    cx, cy = top["x"] + 32, top["y"] + 32
    status, kind, body = _get(
        f"{base}/overlay/{sid}/attention/rank_files/12/{cx // 256}_{cy // 256}.png"
    )
    img = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))
    assert kind == "image/png" and img[cy % 256, cx % 256, 3] > 200  # the top tile: opaque
    # A 256-px overlay tile that no wsimil tile touches (glass) is fully transparent.
    tiles = open_store(run[0] / "tiles" / f"{sid}.zarr")
    t0 = int(tiles.attrs["tile_px_level0"])
    touched = {(c, r) for x, y in np.asarray(tiles["coords"][...])
               for c in range(max(x, 0) // 256, (x + t0 - 1) // 256 + 1)
               for r in range(max(y, 0) // 256, (y + t0 - 1) // 256 + 1)}  # fmt: skip
    glass = [
        (c, r) for r in range(2048 // 256) for c in range(3072 // 256) if (c, r) not in touched
    ]
    assert glass
    status, _, body = _get(
        f"{base}/overlay/{sid}/attention/rank_files/12/{glass[0][0]}_{glass[0][1]}.png"
    )
    assert np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))[..., 3].max() == 0


@needs_chromium
def test_viewer_in_chromium_zooms_toggles_and_goes_to_top_tiles(server):
    from playwright.sync_api import sync_playwright

    base, manifest, _ = server
    sid = manifest.slide_id[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        problems, tiles = [], []
        page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("response", lambda r: "_files/" in r.url and tiles.append((r.url, r.status)))
        page.goto(base + "/")
        assert page.locator("tr.slide").count() == len(manifest)
        page.click(f"a[href='/slide/{sid}']")
        page.wait_for_function(
            "document.body.dataset.ready === '1' && document.body.dataset.overlay"
        )
        page.wait_for_load_state("networkidle")
        start = {int(u.split("_files/")[1].split("/")[0]) for u, _ in tiles}
        assert "µm" in page.inner_text("#scalebar-text")
        scale0 = page.inner_text("#scalebar-text")
        # zoom in: deeper slide tiles are requested and answered
        page.evaluate(
            "wsimilViewer.viewport.zoomTo(wsimilViewer.viewport.getMaxZoom(), null, true)"
        )
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(300)
        deeper = {
            int(u.split("_files/")[1].split("/")[0]) for u, s in tiles if "/dzi/" in u and s == 200
        }
        assert max(deeper) > max(start) and max(deeper) == 12
        assert page.inner_text("#scalebar-text") != scale0
        # the overlay toggles
        assert page.evaluate("wsimilViewer.world.getItemAt(1).getOpacity()") > 0.5
        page.uncheck("#overlay-on")
        assert page.evaluate("wsimilViewer.world.getItemAt(1).getOpacity()") == 0
        page.check("#overlay-on")
        page.select_option("#scale", "minmax")
        page.wait_for_function("document.body.dataset.overlay === 'attention/minmax'")
        # a top tile's button pans and zooms there
        page.click("button.top[data-rank='2']")
        page.wait_for_timeout(1500)
        info = json.loads(page.inner_text("#slide-info"))
        t = [x for x in info["top"] if x["rank"] == 2][0]
        centre = page.evaluate(
            "(() => { const c = wsimilViewer.viewport.getCenter(true);"
            " const p = wsimilViewer.world.getItemAt(0).viewportToImageCoordinates(c); return [p.x, p.y]; })()"
        )
        assert abs(centre[0] - (t["x"] + t["size"] / 2)) < t["size"] / 2
        assert abs(centre[1] - (t["y"] + t["size"] / 2)) < t["size"] / 2
        assert page.locator(".top-outline").count() == len(info["top"]) == 4
        assert problems == []  # no console error or warning while viewing
        # the page's own requests outside the cohort are refused too
        for path in ("/dzi/..%2F..%2Fetc%2Fpasswd.dzi", "/dzi/nope.dzi", "/static/../../x"):
            assert page.evaluate(f"fetch('{path}').then(r => r.status)") == 404, path
        browser.close()
    assert all(s == 200 for _, s in tiles)


def test_slides_openslide_refuses_get_the_same_deep_zoom_tiles_through_wsimil_readers(run):
    """ReaderTiles (tifffile, Pillow) and OpenSlide's DeepZoomGenerator give the same tiles, at
    full resolution, at middle levels and at the levels cut from the kept coarsest level."""
    import io

    from PIL import Image

    from wsimil.slide import OpenSlideReader, TiffReader
    from wsimil.viewer.deepzoom import OpenSlideTiles, ReaderTiles, TileNotFound

    path = run[1].path[0]
    with OpenSlideReader(path) as a, TiffReader(path) as b:
        ours, theirs = ReaderTiles(b), OpenSlideTiles(a)
        assert _dzi(ours.dzi()) == _dzi(theirs.dzi())
        for level, col, row in [(12, 3, 2), (11, 1, 1), (10, 0, 0), (8, 0, 0), (3, 0, 0)]:
            x = np.asarray(Image.open(io.BytesIO(ours.tile(level, col, row))), np.float32)
            y = np.asarray(Image.open(io.BytesIO(theirs.tile(level, col, row))), np.float32)
            assert x.shape == y.shape and np.abs(x - y).mean() < 8, (level, x.shape)
        with pytest.raises(TileNotFound):
            ours.tile(12, 20, 0)
    png = run[0] / "plain.png"  # a plain image: read by Pillow, never by OpenSlide
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (300, 2, 3))).save(png)
    from wsimil.slide import open_slide

    with open_slide(png) as s:
        tiles = ReaderTiles(s)
        assert _dzi(tiles.dzi())["Size"] == {"Width": "512", "Height": "300"}
        x = np.asarray(Image.open(io.BytesIO(tiles.tile(9, 1, 0))), np.float32)
        assert x.shape == (255, 256, 3)  # columns 253-508 (1 px overlap), rows 0-254
        assert np.abs(x[:, :, 0].mean(0) - np.arange(253, 509) % 256).mean() < 8


def _dzi(text):
    import xml.etree.ElementTree as ET

    root = ET.fromstring(text)
    return {**root.attrib, "Size": root[0].attrib}


def test_review_refuses_a_run_without_heatmaps_or_with_an_unknown_model_in_one_line(run, tmp_path):
    from click.testing import CliRunner

    from wsimil.cli import main

    (tmp_path / "manifest.csv").write_text((run[0] / "manifest.csv").read_text())
    r = CliRunner().invoke(main, ["review", str(tmp_path)])
    assert r.exit_code == 1 and "no heatmaps yet" in r.output and "wsimil heatmap" in r.output
    r = CliRunner().invoke(main, ["review", str(run[0]), "--model", "other"])
    assert r.exit_code == 1 and "no heatmaps of model 'other'" in r.output
    assert "gated_attention" in r.output  # what there is
