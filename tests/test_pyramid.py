"""The shared pyramidal TIFF writer: OpenSlide sees one multi-level image with the right mpp."""

import numpy as np
import pytest
import tifffile

openslide = pytest.importorskip("openslide")

from wsimil.pyramid import (  # noqa: E402
    IndexedGridTiles,
    PyramidLevel,
    encode_jpeg_tile,
    level_sizes,
    tiles_of_rows,
    write_tiff_pyramid,
)
from wsimil.slide import open_slide  # noqa: E402

W, H, T = 300, 200, 64


def _image(w: int, h: int) -> np.ndarray:
    """Smooth RGB gradients (JPEG keeps them within a few grey levels)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 200 // w + 20, yy * 200 // h + 30, (xx + yy) * 100 // (w + h) + 90], -1)


def _array_levels(img: np.ndarray, sizes) -> list[PyramidLevel]:
    levels = []
    for w, h, d in sizes:
        lv = img[::d, ::d].astype(np.uint8)

        def tiles(lv=lv, w=w, h=h):
            for r in range(0, h, T):
                yield from tiles_of_rows(lv[r : r + T], w, T)

        levels.append(PyramidLevel(w, h, tiles))  # a factory, called when the level is written
    return levels


def test_level_sizes():
    assert level_sizes(W, H, factor=2, max_long_side=100) == [
        (300, 200, 1),
        (150, 100, 2),
        (75, 50, 4),
    ]
    assert level_sizes(1000, 700, factor=4, max_long_side=1000, min_levels=2) == [
        (1000, 700, 1),
        (250, 175, 4),
    ]
    assert level_sizes(3, 2, factor=4, max_long_side=0, min_levels=5)[-1] == (1, 1, 4)


def test_array_tiles_make_a_pyramid_openslide_reads_with_its_mpp(tmp_path):
    path = tmp_path / "p.tiff"
    img = _image(W, H)
    sizes = level_sizes(W, H, factor=2, max_long_side=100)
    out = write_tiff_pyramid(
        path, _array_levels(img, sizes), tile_px=T, mpp=0.25, jpeg_quality=95, software="test"
    )
    assert out == path and not list(tmp_path.glob(".*"))
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == 3
        assert s.level_dimensions == ((300, 200), (150, 100), (75, 50))
        np.testing.assert_allclose(s.level_downsamples, (1, 2, 4), rtol=1e-6)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        for k, (w, h) in enumerate(s.level_dimensions):
            got = np.asarray(s.read_region((0, 0), k, (w, h)).convert("RGB"), np.int16)
            d = 2**k
            assert np.abs(got - img[::d, ::d]).mean() < 2.0
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff
        assert [p.subfiletype for p in tf.pages] == [0, 1, 1]
        assert all(p.is_tiled and p.tile == (T, T) and p.compression == 7 for p in tf.pages)
        assert all(p.photometric == 6 for p in tf.pages)  # RGB stored as JPEG YCbCr
        assert tf.pages[0].software == "test"
        # each level's resolution gives its own mpp (10,000 / px per cm)
        for p, d in zip(tf.pages, (1, 2, 4), strict=True):
            assert p.get_resolution("CENTIMETER")[0] == pytest.approx(1e4 / (0.25 * d))


def test_encoded_tiles_atomic_write_and_open_slide(tmp_path):
    path = tmp_path / "grid.tiff"
    grid = np.array([[0, 1], [1, 2]])
    palette = np.array([[255, 255, 255], [200, 30, 30], [30, 30, 200]], np.uint8)
    tiles = IndexedGridTiles(grid, palette, step=128, tile_px=T, jpeg_quality=90)
    sizes = level_sizes(256, 192, factor=2, max_long_side=64)
    write_tiff_pyramid(
        path,
        [(w, h, tiles.level(w, h, d), d) for w, h, d in sizes],  # tuples work too
        tile_px=T,
        mpp=0.5,
        atomic=True,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["grid.tiff"]
    assert tiles.tiles_written == 12 + 4 + 1
    assert tiles.tiles_encoded < tiles.tiles_written  # one-colour tiles are encoded once
    with open_slide(path) as slide:
        assert slide.level_dimensions == ((256, 192), (128, 96), (64, 48))
        assert slide.mpp == pytest.approx(0.5)
        px = slide.read_region((150, 20), 0, (8, 8))
        assert np.abs(px.astype(int).mean((0, 1)) - (200, 30, 30)).max() < 12
    tile = np.full((T, T, 3), 7, np.uint8)
    assert encode_jpeg_tile(tile, 90)[:2] == b"\xff\xd8"


def test_failed_atomic_write_leaves_nothing(tmp_path):
    def broken():
        yield np.zeros((T, T, 3), np.uint8)
        raise RuntimeError("renderer failed")

    with pytest.raises(RuntimeError, match="renderer failed"):
        write_tiff_pyramid(
            tmp_path / "x.tiff",
            [PyramidLevel(2 * T, T, broken())],
            tile_px=T,
            mpp=None,
            atomic=True,
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="multiple of 16"):
        write_tiff_pyramid(tmp_path / "y.tiff", [(T, T, [])], tile_px=40, mpp=None)
