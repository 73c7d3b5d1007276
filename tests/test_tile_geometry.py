"""Tile geometry, tissue masks and the real H&E slide."""

from pathlib import Path

import numpy as np
import pytest

from wsimil.config import TileConfig
from wsimil.tile import grid_coords, tile_fractions
from wsimil.tissue import tissue_mask

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu_small_region.svs"


def test_grid_covers_the_slide_with_whole_tiles_only():
    c = grid_coords(1000, 700, tile_px=256, stride_px=256)
    assert c.dtype == np.int32 and c.shape == (3 * 2, 2)
    assert c[:, 0].max() + 256 <= 1000 and c[:, 1].max() + 256 <= 700
    assert set(map(tuple, c.tolist())) == {(x, y) for y in (0, 256) for x in (0, 256, 512)}
    overlapping = grid_coords(1000, 700, tile_px=256, stride_px=128)
    assert len(overlapping) == 6 * 4
    assert grid_coords(100, 100, tile_px=256, stride_px=256).shape == (0, 2)


def test_edge_tiles_cover_the_right_and_bottom_edges_and_count_their_padding_as_glass():
    c = grid_coords(1000, 700, tile_px=256, stride_px=256, edges=True)
    assert set(map(tuple, c.tolist())) == {
        (x, y) for y in (0, 256, 512) for x in (0, 256, 512, 768)
    }
    assert grid_coords(100, 100, tile_px=256, stride_px=256, edges=True).tolist() == [[0, 0]]
    # A bottom-edge tile half outside a fully-tissue image: half of its area is tissue.
    mask = np.ones((10, 10), bool)  # 160 x 160 level-0 px at downsample 16
    frac = tile_fractions(mask, np.array([[0, 80], [0, 0]]), tile_px=160, downsample=16)
    np.testing.assert_allclose(frac, [0.5, 1.0], atol=1e-6)


@pytest.mark.skipif(not CMU.exists(), reason=f"real H&E slide not present at {CMU}")
def test_tissue_at_the_bottom_edge_of_a_real_slide_gets_tiles():
    from wsimil.config import TileConfig
    from wsimil.slide import open_slide
    from wsimil.tile import tile_slide

    with open_slide(str(CMU)) as s:
        h0 = s.dimensions[1]  # 2967 px: 151 px below the last whole 256-px row
        whole = tile_slide(s, TileConfig(edge_tiles=False))
        edges = tile_slide(s, TileConfig())
    t = edges["geometry"].tile_px_level0
    assert (whole["coords"][:, 1] + t <= h0).all()
    over = edges["coords"][edges["coords"][:, 1] + t > h0]
    assert len(over) >= 1 and (edges["tissue_fraction"] >= TileConfig().tissue_threshold).all()


def test_tile_fractions_from_an_integral_image():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True  # top-left quarter, mask px = 16 level-0 px
    coords = np.array([[0, 0], [80, 0], [40, 40], [0, 80]])
    frac = tile_fractions(mask, coords, tile_px=80, downsample=16)
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.25, 0.0], atol=1e-6)


def test_tissue_mask_finds_pink_tissue_on_white_and_ignores_small_specks():
    rng = np.random.default_rng(0)
    img = np.full((200, 200, 3), 240, np.uint8) + rng.integers(0, 6, (200, 200, 3)).astype(np.uint8)
    img[50:150, 40:160] = (220, 140, 190)  # tissue: 100 x 120 px
    img[10:12, 10:12] = (120, 40, 120)  # 4 px speck
    mask = tissue_mask(img, pixel_um=8.0, min_tissue_um2=2_000, max_hole_um2=2_000)
    assert mask[60:140, 50:150].all()
    assert not mask[:40].any() and not mask[160:].any()
    assert not mask[5:20, 5:20].any()


def test_blank_slide_has_no_tissue():
    img = np.full((100, 100, 3), 245, np.uint8)
    assert not tissue_mask(img, pixel_um=8.0).any()


@pytest.mark.skipif(not CMU.exists(), reason=f"real H&E slide not present at {CMU}")
def test_real_he_slide_mask_covers_tissue_not_background():
    from wsimil.slide import open_slide
    from wsimil.tile import tile_slide

    with open_slide(CMU) as slide:
        assert slide.mpp == pytest.approx(0.499)
        res = tile_slide(slide, TileConfig())
        thumb, ds = slide.thumbnail(512)
    mask = res["mask"]
    # Tissue is a vertical band in the middle of this region; the left and right edges are glass.
    frac = mask.mean()
    assert 0.2 < frac < 0.5
    cols = mask.mean(axis=0)
    w = mask.shape[1]
    assert cols[: w // 5].mean() < 0.1 and cols[-w // 8 :].mean() < 0.1
    assert cols[w // 2 - 5 : w // 2 + 5].mean() > 0.8
    # Background (masked-out) pixels are bright; tissue pixels are saturated.
    from skimage.transform import resize

    m = resize(mask.astype(float), thumb.shape[:2], order=0) > 0.5
    grey = thumb.mean(axis=2)
    assert grey[~m].mean() > 200 and grey[m].mean() < grey[~m].mean() - 30
    assert 20 <= len(res["coords"]) <= res["n_candidates"]


def test_mask_areas_are_in_um2_so_settings_work_at_any_scan_resolution():
    # The same 400 x 400 µm tissue piece and a 60 x 60 µm speck, imaged at 8 and at 16 µm/px.
    def image(um_per_px):
        n = int(1600 / um_per_px)
        img = np.full((n, n, 3), 242, np.uint8)
        a, b = int(400 / um_per_px), int(800 / um_per_px)
        img[a:b, a:b] = (210, 130, 185)
        s = int(60 / um_per_px)
        img[20 : 20 + s, 20 : 20 + s] = (210, 130, 185)
        return img

    for um in (8.0, 16.0):
        m = tissue_mask(image(um), pixel_um=um, min_tissue_um2=10_000, max_hole_um2=0, blur_um=0)
        area_um2 = m.sum() * um * um
        assert abs(area_um2 - 400 * 400) < 0.15 * 400 * 400
        assert not m[: int(300 / um), : int(300 / um)].any()  # the 3,600 µm² speck is gone


def test_pen_marks_and_near_black_are_removed_when_asked():
    from wsimil.tissue import pen_mask

    img = np.full((120, 120, 3), 242, np.uint8)
    img[10:50, 10:50] = (215, 140, 190)  # eosin pink tissue
    img[10:50, 60:100] = (120, 70, 160)  # hematoxylin purple tissue
    img[70:110, 10:40] = (30, 60, 180)  # blue pen
    img[70:110, 45:75] = (40, 150, 70)  # green pen
    img[70:110, 80:110] = (25, 25, 30)  # black pen / dark debris
    pen = pen_mask(img)
    assert not pen[10:50, 10:100].any()
    assert pen[72:108, 12:38].all() and pen[72:108, 47:73].all() and pen[72:108, 82:108].all()
    kw = dict(pixel_um=8.0, min_tissue_um2=0, max_hole_um2=0, blur_um=0)
    with_pen = tissue_mask(img, **kw)
    assert with_pen[72:108, 12:38].all()  # saturated blue ink looks like tissue by default
    clean = tissue_mask(img, remove_pen=True, **kw)
    assert clean[12:48, 12:48].all() and clean[12:48, 62:98].all()
    assert not clean[70:110].any()


def test_big_level_without_pyramid_is_read_in_bounded_strips(tmp_path):
    import tifffile

    from wsimil.slide import open_slide

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1000, 1200, 3), dtype=np.uint8)
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, img, photometric="rgb", rowsperstrip=50)
    with open_slide(p, mpp=0.5) as s:
        whole = s.read_downsampled((150, 125))
        strips = s.read_downsampled((150, 125), band_bytes=3 * 1200 * 40)  # 25 bands
    expect = img.reshape(125, 8, 150, 8, 3).mean(axis=(1, 3))
    assert strips.shape == whole.shape == (125, 150, 3)
    assert np.abs(strips.astype(float) - expect).max() <= 1.0
    assert np.abs(whole.astype(float) - expect).max() <= 1.5


def test_cross_morphology_from_slices_equals_scipy_closing_then_opening():
    from scipy.ndimage import binary_closing, binary_opening
    from skimage.morphology import disk

    from wsimil.tissue import dilate_cross, erode_cross

    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((37, 53)) > rng.uniform(0.2, 0.8)
        want = binary_opening(
            binary_closing(m, structure=disk(1), border_value=0), structure=disk(1)
        )
        np.testing.assert_array_equal(dilate_cross(erode_cross(erode_cross(dilate_cross(m)))), want)
