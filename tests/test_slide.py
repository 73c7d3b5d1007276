"""open_slide(): tifffile layouts, Pillow images, metadata mpp and bad files."""

import numpy as np
import pytest
import tifffile

from wsimil.slide import SlideError, open_slide


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_ome_subifds(path, img, mpp):
    """OME-TIFF with the reduced levels in SubIFDs (a layout OpenSlide refuses)."""
    levels = [img, img[::2, ::2], img[::4, ::4]]
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(
            levels[0],
            subifds=2,
            tile=(64, 64),
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
        )
        for lvl in levels[1:]:
            tif.write(lvl, subfiletype=1, tile=(64, 64), photometric="rgb")
    return levels


def test_ome_tiff_pyramid_in_subifds_reads_the_written_pixels(tmp_path):
    img = _image(300, 500)
    path = tmp_path / "a.ome.tif"
    levels = _write_ome_subifds(path, img, 0.25)
    with open_slide(path) as s:
        assert s.reader_name == "tifffile"
        assert s.dimensions == (500, 300) and s.level_count == 3
        assert s.level_downsamples[1] == pytest.approx(2.0) and s.level_downsamples[
            2
        ] == pytest.approx(4.0)
        assert s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region((100, 50), 0, (120, 70)), img[50:120, 100:220])
        np.testing.assert_array_equal(s.read_region((40, 80), 1, (30, 20)), levels[1][40:60, 20:50])
        # Partly outside: the outside is white, the inside is the slide.
        r = s.read_region((450, 280), 0, (100, 40))
        assert r.shape == (40, 100, 3) and r.dtype == np.uint8
        np.testing.assert_array_equal(r[:20, :50], img[280:300, 450:500])
        assert (r[20:] == 255).all() and (r[:, 50:] == 255).all()
        assert (s.read_region((-500, -500), 0, (10, 10)) == 255).all()
        thumb, ds = s.thumbnail(125)
        assert thumb.shape == (75, 125, 3) and ds == pytest.approx(4.0)


def test_plain_stripped_tiff_with_resolution_tags(tmp_path):
    img = _image(200, 150, seed=1)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(
        path,
        img,
        photometric="rgb",
        rowsperstrip=16,
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as s:
        assert s.dimensions == (150, 200) and s.level_count == 1
        assert s.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (50, 60)), img[20:80, 10:60])
        r = s.read_region((-10, 190), 0, (20, 20))
        np.testing.assert_array_equal(r[:10, 10:], img[190:200, 0:10])
        assert (r[10:] == 255).all() and (r[:, :10] == 255).all()


def test_rgba_tiff_transparent_areas_read_white_and_rgb(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:32, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(32, 32))
    with open_slide(path, mpp=1.0) as s:
        r = s.read_region((0, 0), 0, (64, 64))
    assert r.shape == (64, 64, 3)
    assert (r[:32, :, 0] == 200).all() and (r[:32, :, 1] == 0).all()
    assert (r[40:] == 255).all()


def test_png_image_and_manifest_mpp_override(tmp_path):
    from PIL import Image

    img = _image(40, 60, seed=2)
    path = tmp_path / "small.png"
    Image.fromarray(img).save(path)
    with open_slide(path, mpp=0.75) as s:
        assert s.reader_name == "pillow" and s.mpp == 0.75
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (60, 40)), img)
        assert (s.read_region((55, 35), 0, (10, 10))[5:] == 255).all()
    with open_slide(path) as s:
        assert s.mpp is None


def test_synthetic_pyramid_opens_with_openslide_and_its_mpp(tmp_path):
    from wsimil.synth import write_synthetic_slide

    path = tmp_path / "s.tiff"
    write_synthetic_slide(path, width_px=1024, height_px=768, mpp=0.5, positive=False, seed=0)
    with open_slide(path) as s:
        assert s.reader_name == "openslide" and s.dimensions == (1024, 768)
        assert s.mpp == pytest.approx(0.5) and s.level_count >= 2
        r = s.read_region((1000, 700), 0, (64, 100))
        assert r.shape == (100, 64, 3) and (r[68:] == 255).all() and (r[:, 24:] == 255).all()
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.svs", b"", "empty"),
        ("notes.svs", b"this is a text file, not a slide\n" * 10, "cannot open slide"),
        ("broken.tif", b"II*\x00" + b"\x00" * 20, "cannot open slide"),
        ("what.xyz", b"\x01\x02\x03" * 100, "cannot open slide"),
        ("fake.png", b"not a png", "cannot open as an image"),
    ],
)
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert name in msg and reason in msg and "\n" not in msg


def test_missing_file_says_fix_the_manifest(tmp_path):
    with pytest.raises(SlideError, match="not found.*manifest"):
        open_slide(tmp_path / "nope.svs")


def test_truncated_tiff_fails_on_open_or_read_with_the_file_name(tmp_path):
    img = _image(512, 512, seed=3)
    path = tmp_path / "trunc.ome.tif"
    _write_ome_subifds(path, img, 0.5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="trunc.ome.tif"):
        with open_slide(path) as s:
            s.read_region((0, 0), 0, (512, 512))
