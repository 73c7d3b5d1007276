"""Two-level tissue masks (coarse segmentation, edges at the fine level) and gap tiles."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsimil.config import TileConfig
from wsimil.grid import tissue_grid
from wsimil.mask import coarse_mask_um, edge_runs, mask_grid, two_level_mask
from wsimil.slide import open_slide

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu_small_region.svs"
MPP = 2.0  # µm per level-0 px of the test slide: 32 µm coarse = level 2, 8 µm fine = level 1
PINK = (215, 140, 190)


def _reduce(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f, img.shape[1] // f
    return img[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


@pytest.fixture(scope="module")
def strand_slide(tmp_path_factory):
    """A 4 x 4 mm pyramid (2 µm/px; levels 1, 4, 16): a tissue piece, a 30 µm x 1.6 mm strand
    (48,000 µm², kept by the default 20,000 µm² minimum) and an 80 µm speck (dropped)."""
    rng = np.random.default_rng(3)
    img = (242 + rng.integers(0, 6, (2048, 2048, 3))).astype(np.uint8)
    yy, xx = np.mgrid[:2048, :2048]
    piece = ((yy - 700) / 380.0) ** 2 + ((xx - 650) / 320.0) ** 2 < 1
    img[piece] = PINK
    img[300:1100, 1400:1415] = PINK  # the strand: 15 px = 30 µm wide
    img[1700:1740, 1700:1740] = PINK  # the speck: 6,400 µm²
    path = tmp_path_factory.mktemp("mask") / "strand.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(img, subifds=2, tile=(128, 128), photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeY": MPP})  # fmt: skip
        for f in (4, 16):
            tif.write(_reduce(img, f), subfiletype=1, tile=(64, 64), photometric="rgb")
    return path, piece


def _cfg(**kw):
    return TileConfig(target_mpp=MPP, tile_px=64, **kw)  # 128 µm tiles


def test_coarse_resolution_follows_tile_and_region_sizes():
    assert coarse_mask_um(TileConfig()) == 32.0  # 128 µm tiles, 141 µm regions: 4 px across
    assert coarse_mask_um(TileConfig(tile_px=64)) == 8.0  # 32 µm tiles: never under mask_mpp
    assert coarse_mask_um(TileConfig(min_tissue_um2=0, max_hole_um2=0, tile_px=512)) == 32.0
    assert coarse_mask_um(TileConfig(min_tissue_um2=1600)) == 10.0  # 40 µm regions
    assert coarse_mask_um(TileConfig(mask_coarse_mpp=16)) == 16.0


def test_two_level_mask_keeps_a_thin_strand_the_coarse_mask_loses(strand_slide):
    path, piece = strand_slide
    with open_slide(path) as s:
        assert s.level_count == 3 and s.mpp == pytest.approx(MPP)
        grid = mask_grid(s, _cfg())
        assert grid.factor == 4 and grid.downsample == pytest.approx(4.0)
        fine, ds, _ = two_level_mask(s, _cfg())
        one_level, ds1, _ = two_level_mask(s, _cfg(mask_coarse_mpp=8))
        coarse, ds_c, _ = two_level_mask(s, _cfg(mask_mpp=32))
    assert ds == ds1 == pytest.approx(4.0) and ds_c == pytest.approx(16.0)
    strand = (slice(300 // 4 + 2, 1100 // 4 - 2), slice(1400 // 4, 1416 // 4))
    assert fine[strand].any(axis=1).mean() > 0.95  # kept along its whole length
    assert not coarse[300 // 16 : 1100 // 16, 1400 // 16 : 1416 // 16 + 1].any()  # lost
    assert not fine[1700 // 4 - 2 : 1740 // 4 + 2, 1700 // 4 - 2 : 1740 // 4 + 2].any()
    # The piece's edge is drawn at 8 µm: the same mask as segmenting at 8 µm throughout.
    truth = piece[::4, ::4]
    iou = (fine & one_level).sum() / (fine | one_level).sum()
    assert iou > 0.97
    assert (fine[: truth.shape[0], : truth.shape[1]] == truth).mean() > 0.99


def test_only_blocks_on_the_coarse_edge_are_read_again():
    edge = np.zeros((64, 96), bool)
    edge[10, 5:40] = True  # one edge row through three 16-px blocks
    edge[50, 90] = True  # one pixel in the last (partial) block
    runs = list(edge_runs(edge, block=16))
    assert runs == [((0, 16), (0, 48)), ((48, 64), (80, 96))]
    split = list(edge_runs(edge, block=16, max_px=32))  # runs are cut at max_px
    assert split == [((0, 16), (0, 32)), ((0, 16), (32, 48)), ((48, 64), (80, 96))]
    assert list(edge_runs(np.zeros((20, 20), bool))) == []


def test_gap_tiles_cover_a_fragment_the_grid_splits_below_the_threshold():
    mask = np.zeros((64, 64), bool)  # 16 level-0 px per mask px, tiles of 256 px = 16 mask px
    mask[10:22, 10:22] = True  # 12 x 12 mask px on a grid corner: 36 px (14%) in each of 4 cells
    mask[32:48, 32:48] = True  # one whole grid cell
    kw = dict(tile_px=256, stride_px=256, threshold=0.25)
    grid_only, frac0, n = tissue_grid(mask, 16.0, (1024, 1024), gaps=False, **kw)
    coords, frac, n2 = tissue_grid(mask, 16.0, (1024, 1024), **kw)
    assert n == n2 == 16 and grid_only.tolist() == [[512, 512]]
    assert len(coords) == 2 and coords[0].tolist() == [512, 512]  # grid tiles come first
    x, y = coords[1] // 16
    assert x <= 10 and y <= 10 and x + 16 >= 22 and y + 16 >= 22  # the fragment, whole
    assert frac[1] == pytest.approx(144 / 256) and (frac >= 0.25).all()
    # A fragment too small for a tile of its own at the threshold gets none.
    tiny = np.zeros((64, 64), bool)
    tiny[14:18, 14:18] = True
    assert len(tissue_grid(tiny, 16.0, (1024, 1024), **kw)[0]) == 0


@pytest.mark.skipif(not CMU.exists(), reason=f"real H&E slide not present at {CMU}")
def test_real_slide_tiles_cover_95_percent_of_its_tissue_none_under_a_quarter():
    from wsimil.tile import tile_slide

    with open_slide(CMU) as s:
        w0, h0 = s.dimensions
        rgb = s.read_region((0, 0), 0, (w0, h0)).astype(np.int16)
        res = tile_slide(s, TileConfig())
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    tissue = ((hi - lo) >= 0.1 * np.maximum(hi, 1)) & (lo < 230)  # neutral rule, level 0
    t = res["geometry"].tile_px_level0
    inside = np.zeros_like(tissue)
    for x, y in res["coords"]:
        inside[max(y, 0) : y + t, max(x, 0) : x + t] = True
        assert tissue[max(y, 0) : y + t, max(x, 0) : x + t].sum() >= 0.25 * t * t
    assert (tissue & inside).sum() >= 0.95 * tissue.sum()


def test_own_otsu_and_small_region_removal_match_scikit_image():
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    from wsimil.tissue import drop_small_regions, otsu_threshold

    rng = np.random.default_rng(0)
    signal = rng.beta(2, 5, (300, 400)).astype(np.float32)
    assert otsu_threshold(signal) == pytest.approx(threshold_otsu(signal), abs=1e-6)
    m = rng.random((3000, 500)) > 0.6  # more rows than one band of the banded counts
    expected = remove_small_objects(m, max_size=5)
    np.testing.assert_array_equal(drop_small_regions(m.copy(), max_size=5), expected)
    np.testing.assert_array_equal(~drop_small_regions(~m, max_size=5),
                                  remove_small_holes(m, max_size=5))  # fmt: skip


def test_tile_outlines_draw_what_pillow_draws():
    from PIL import Image, ImageDraw

    from wsimil.raster import tile_outlines

    rng = np.random.default_rng(1)
    coords = rng.integers(-300, 3000, (200, 2))  # some tiles run over every edge
    ds, t, shape = 7.3, 256, (400, 380)
    im = Image.new("1", (shape[1], shape[0]))
    draw = ImageDraw.Draw(im)
    side = round(t / ds)
    for x, y in coords:
        x0, y0 = np.floor(x / ds), np.floor(y / ds)
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], outline=1)
    got = tile_outlines(coords, shape, tile_px_level0=t, downsample=ds)
    np.testing.assert_array_equal(got, np.asarray(im))


def test_grid_fractions_from_block_sums_equal_the_integral_image():
    from wsimil.grid import block_sums, grid_coords, grid_fractions, tile_fractions

    bounds = [0, 3, 3, 7, 12, 15]  # an empty block, blocks past the end
    np.testing.assert_array_equal(block_sums(np.arange(10)[:, None], bounds, 0)[:, 0],
                                  [3, 0, 18, 24, 0])  # fmt: skip
    np.testing.assert_array_equal(block_sums(np.arange(10)[None, :], bounds, 1)[0],
                                  [3, 0, 18, 24, 0])  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(1, 120, 2)
        mask = rng.random((h, w)) > 0.5
        ds = rng.uniform(1, 20)
        t = int(rng.integers(int(2 * ds) + 1, 300))
        for edges in (True, False):
            c = grid_coords(int(w * ds) + 1, int(h * ds) + 1, tile_px=t, stride_px=t, edges=edges)
            np.testing.assert_allclose(grid_fractions(mask, c, tile_px=t, downsample=ds),
                                       tile_fractions(mask, c, tile_px=t, downsample=ds))  # fmt: skip


def test_clean_window_cleans_inside_and_leaves_what_goes_on_outside():
    from wsimil.mask import clean_window

    mask = np.zeros((120, 160), bool)
    mask[20:100, 10:90] = True  # a region crossing the window's left edge (x = 50)
    mask[50:55, 60:65] = False  # a 25-px hole inside the window
    mask[30:35, 120:125] = True  # a 25-px speck inside the window
    mask[5:11, 47:53] = True  # a 36-px speck across the window's left edge
    before = mask.copy()
    kw = dict(pixel_um=8.0, min_tissue_um2=50 * 64, max_hole_um2=50 * 64)  # 50 px
    clean_window(mask, (0, 120, 50, 160), **kw)
    assert mask[50:55, 60:65].all()  # hole filled
    assert not mask[30:35, 120:125].any()  # speck dropped
    assert mask[6:10, 50:53].all()  # kept: it goes on outside the window
    np.testing.assert_array_equal(mask[:, :47], before[:, :47])  # outside the margin: untouched
    assert mask[21:99, 50:89].all()  # (the opening by the cross cuts square corners)


def test_tifffile_twin_reads_the_same_mask_as_openslide(tmp_path, monkeypatch):
    import wsimil.mask as mask_mod
    from wsimil.slide import tiff_twin
    from wsimil.synth import write_synthetic_slide

    path = tmp_path / "pyr.tiff"
    write_synthetic_slide(path, width_px=4096, height_px=3072, mpp=0.5, positive=True, seed=2)
    with open_slide(path) as s:
        assert s.reader_name == "openslide"
        twin = tiff_twin(s)
        assert twin is not None and twin.level_dimensions == s.level_dimensions
        twin.close()
        fast, ds, rgb = two_level_mask(s, TileConfig())
        monkeypatch.setattr(mask_mod, "tiff_twin", lambda slide: None)  # OpenSlide reads only
        slow, ds2, _ = two_level_mask(s, TileConfig())
    assert ds == ds2 and fast.shape == slow.shape and fast.any()
    assert (fast & slow).sum() / (fast | slow).sum() > 0.99  # JPEG decoders round differently
    assert rgb.shape[:2] == fast.shape  # the whole fine image was read (for the QC image)
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(png)
    with open_slide(png) as s:
        assert tiff_twin(s) is None
