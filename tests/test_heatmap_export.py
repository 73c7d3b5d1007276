"""Review-tool exports: QuPath GeoJSON, the pyramidal heatmap TIFF (read back by OpenSlide), crops."""

import json

import numpy as np
import pandas as pd
import pytest

from wsimil.export import grid_step, write_geojson, write_heatmap_tiff, write_top_crops
from wsimil.raster import colour_lut, mask_outline, smooth_heat


def _grid_table(nx=6, ny=4, t=448, x0=896, y0=448):
    xs, ys = np.meshgrid(np.arange(nx) * t + x0, np.arange(ny) * t + y0)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    att = np.linspace(0.01, 0.2, len(coords))
    return pd.DataFrame(
        {
            "x": coords[:, 0],
            "y": coords[:, 1],
            "attention": att,
            "attention_scaled": (att - att.min()) / (att.max() - att.min()),
            "rank": np.linspace(0, 1, len(coords)),
            "instance_score": np.full(len(coords), np.nan),
        }
    )


def test_geojson_is_a_feature_collection_of_tile_polygons_with_measurements(tmp_path):
    table = _grid_table()
    table.loc[3, "instance_score"] = 0.25
    n = write_geojson(tmp_path / "s.geojson", table, tile_px_level0=448, slide_id="s")
    doc = json.loads((tmp_path / "s.geojson").read_text())
    assert (
        n == len(table)
        and doc["type"] == "FeatureCollection"
        and len(doc["features"]) == len(table)
    )
    for i, f in enumerate(doc["features"]):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = f["geometry"]["coordinates"][0]
        x, y = int(table.x[i]), int(table.y[i])
        assert ring[0] == ring[-1] == [x, y] and len(ring) == 5
        assert [x + 448, y + 448] in ring
        props = f["properties"]
        assert props["objectType"] == "tile"
        m = props["measurements"]
        assert m["attention"] == pytest.approx(table.attention[i], abs=1e-6)
        assert m["attention_scaled"] == pytest.approx(table.attention_scaled[i], abs=1e-6)
        assert m["rank"] == pytest.approx(table["rank"][i], abs=1e-6)
        # NaN is not valid JSON for QuPath: absent instead
        assert ("instance_score" in m) == (i == 3)
    assert not list(tmp_path.glob(".*tmp"))


def test_heatmap_tiff_is_a_pyramid_openslide_reads_with_the_slide_geometry(tmp_path):
    openslide = pytest.importorskip("openslide")
    table = _grid_table()
    w, h = 5000, 3001
    info = write_heatmap_tiff(
        tmp_path / "h.tiff",
        table.attention_scaled.to_numpy(),
        table[["x", "y"]].to_numpy(),
        tile_px_level0=448,
        width_px=w,
        height_px=h,
        mpp=0.5,
        cmap="turbo",
        tile_px=256,
    )
    assert info["grid_step"] == 448
    assert info["tiles_encoded"] < info["tiles_written"]  # background tiles encoded once
    s = openslide.OpenSlide(tmp_path / "h.tiff")
    assert s.dimensions == (w, h)
    assert s.level_count == len(info["levels"]) >= 3
    assert s.level_dimensions[1] == (2500, 1501)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-3)
    lut = colour_lut("turbo").astype(int)
    for i in (
        0,
        len(table) // 2,
        len(table) - 1,
    ):  # each tile's centre has its colour at level 0 and 1
        cx, cy = int(table.x[i]) + 224, int(table.y[i]) + 224
        want = lut[int(round(table.attention_scaled[i] * 255))]
        for level in (0, 1):
            px = np.asarray(s.read_region((cx - 4, cy - 4), level, (8, 8)).convert("RGB"), int)
            assert np.abs(px.mean((0, 1)) - want).max() < 12, (i, level)
    bg = np.asarray(s.read_region((10, 10), 0, (32, 32)).convert("RGB"))
    assert (bg > 240).all()  # no tiles: white
    s.close()


def test_unaligned_tiles_use_a_finer_grid():
    coords = np.array([[0, 0], [333, 17]])
    assert grid_step(coords, 448) == 448 // 16
    assert grid_step(np.array([[448, 896]]), 448) == 448


def test_top_crops_are_the_highest_attention_tiles_read_from_the_slide(tmp_path):
    from wsimil.slide import open_slide

    table = _grid_table()
    write_heatmap_tiff(
        tmp_path / "h.tiff",
        table.attention_scaled.to_numpy(),
        table[["x", "y"]].to_numpy(),
        tile_px_level0=448,
        width_px=4096,
        height_px=2560,
        mpp=0.5,
    )
    with open_slide(tmp_path / "h.tiff") as slide:  # the heatmap TIFF doubles as a slide
        crops = write_top_crops(slide, table, tmp_path / "top", k=3, tile_px_level0=448, crop_px=64)
    assert [c["rank"] for c in crops] == [1, 2, 3]
    order = np.argsort(-table.attention.to_numpy())[:3]
    assert [(c["x"], c["y"]) for c in crops] == [(int(table.x[i]), int(table.y[i])) for i in order]
    from PIL import Image

    lut = colour_lut("turbo").astype(int)
    img = np.asarray(Image.open(tmp_path / "top" / crops[0]["file"]).convert("RGB"), int)
    assert img.shape == (64, 64, 3)
    assert np.abs(img[16:48, 16:48].mean((0, 1)) - lut[255]).max() < 12


def test_smoothing_keeps_background_out_and_outline_is_the_mask_boundary():
    heat = np.zeros((40, 40), np.float32)
    covered = np.zeros((40, 40), bool)
    covered[10:30, 10:30] = True
    heat[10:30, 10:20] = 1.0
    sm = smooth_heat(heat, covered, sigma_px=3)
    assert sm[20, 12] > 0.9 and sm[20, 28] < 0.1  # far from the edge: unchanged-ish
    assert 0.2 < sm[20, 19] < 0.8  # across the step: blended
    assert sm[20, 11] > 0.95  # no dilution from the uncovered border
    assert smooth_heat(heat, covered, sigma_px=0) is heat
    mask = np.zeros((10, 10), np.uint8)
    mask[2:8, 2:8] = 1
    out = mask_outline(mask, (20, 20))
    assert out[4, 4:16].all() and not out[8:12, 8:12].any() and not out[0].any()


def test_banded_thumbnail_matches_the_one_band_thumbnail(tmp_path):
    from wsimil.slide import open_slide

    table = _grid_table()
    write_heatmap_tiff(
        tmp_path / "h.tiff",
        table.attention_scaled.to_numpy(),
        table[["x", "y"]].to_numpy(),
        tile_px_level0=448,
        width_px=4000,
        height_px=2600,
        mpp=0.5,
    )
    with open_slide(tmp_path / "h.tiff") as slide:
        ref, ds_ref = slide.thumbnail(300, band_bytes=2**30)  # one band
        img, ds = slide.thumbnail(300, band_bytes=3 * 1000 * 40)  # many bands
    assert img.shape == ref.shape and ds == pytest.approx(ds_ref)
    assert np.abs(img.astype(int) - ref.astype(int)).mean() < 6
