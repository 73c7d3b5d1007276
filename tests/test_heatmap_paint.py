"""Heatmap arithmetic: min-max rescaling, ranks, painting tiles onto a thumbnail."""

import numpy as np

from wsimil.heatmap import minmax, percentile_rank, render_overlay
from wsimil.overlay import wrap_text
from wsimil.raster import paint_tiles


def test_minmax_rescales_per_slide():
    np.testing.assert_allclose(minmax(np.array([0.1, 0.3, 0.2])), [0.0, 1.0, 0.5], atol=1e-6)
    assert (minmax(np.array([0.5, 0.5])) == 0).all()


def test_percentile_rank_orders_tiles():
    r = percentile_rank(np.array([0.2, 0.9, 0.1, 0.5]))
    np.testing.assert_allclose(r, [1 / 3, 1.0, 0.0, 2 / 3], atol=1e-6)


def test_paint_tiles_places_and_averages_overlapping_tiles():
    coords = np.array([[0, 0], [100, 0], [50, 0]])
    values = np.array([1.0, 0.0, 0.5])
    mean, covered = paint_tiles(values, coords, tile_px_level0=100, downsample=10, shape=(20, 30))
    assert covered[:10, :20].all() and not covered[10:].any() and not covered[:, 20:].any()
    np.testing.assert_allclose(mean[5, 0:5], 1.0)  # only tile 0
    np.testing.assert_allclose(mean[5, 5:10], 0.75)  # tiles 0 and 2
    np.testing.assert_allclose(mean[5, 10:15], 0.25)  # tiles 1 and 2
    np.testing.assert_allclose(mean[5, 15:20], 0.0)  # only tile 1


def test_overlay_blends_only_covered_pixels_and_puts_the_legend_below():
    thumb = np.full((50, 60, 3), 200, np.uint8)
    heat = np.zeros((50, 60), np.float32)
    covered = np.zeros((50, 60), bool)
    covered[10:20, 10:20] = True
    heat[10:20, 10:20] = 1.0
    covered[30:40, 10:20] = True  # covered, lowest value: see-through
    img = render_overlay(thumb, heat, covered, cmap="turbo", alpha=0.5)
    # same width as the thumbnail (same scale side by side), legend strip below
    assert img.shape[1] == 60 and img.shape[0] > 50
    assert (img[:10, :60] == 200).all()
    assert not (img[15, 15] == 200).all()
    assert (img[30:40, 10:20] == 200).all()


def test_wrap_text_breaks_at_spaces_within_the_width():
    assert wrap_text("a  b", 10, len) == ["a  b"]  # fits: kept, spacing and all
    assert wrap_text("aaa bb cc ddddd", 5, len) == ["aaa", "bb cc", "ddddd"]
    assert wrap_text("a bcdefghijkl", 5, len) == ["a", "bcdef", "ghijk", "l"]  # a long id: cut
    assert wrap_text("", 5, len) == [""]


def _overlay(w: int, h: int) -> np.ndarray:
    thumb = np.full((h, w, 3), 200, np.uint8)
    return render_overlay(thumb, np.ones((h, w), np.float32), np.ones((h, w), bool),
                          cmap="autumn_r", alpha=0.7, um_per_px=4.0,
                          title="slide_with_a_long_identifier  p=0.912  label=1  pred=1",
                          legend="attention, min-max within the slide")  # fmt: skip


def test_a_narrow_overlay_wraps_its_legend_instead_of_cutting_it_off():
    wide, narrow = _overlay(800, 100), _overlay(160, 100)
    assert narrow.shape[1] == 160 and wide.shape[1] == 800  # the thumbnail's width, always
    # wide: everything on one title line and one bar row; narrow: more rows, nothing cut off
    assert narrow.shape[0] - 100 > wide.shape[0] - 100
    for img in (wide, narrow):
        strip = img[100:]
        assert (strip[:, -3:] == 255).all() and (strip[-3:] == 255).all()
        assert (strip < 128).any(axis=2).any()  # text and scale bar drawn
