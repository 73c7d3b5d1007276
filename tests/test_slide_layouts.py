"""Slides with other sample layouts: gray, 16-bit, float, alpha, palette, planar -> uint8 RGB,
with one scaling per slide, tissue found on gray slides, and unsupported layouts refused."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from wsimil.config import TileConfig
from wsimil.slide import SlideError, open_slide
from wsimil.tile import slide_tissue_mask
from wsimil.tissue import tissue_mask, tissue_signal

N = 2048  # level-0 side, px
MPP = 0.5
YY, XX = np.mgrid[:N, :N]
BLOB = (XX - 1000) ** 2 + (YY - 1100) ** 2 < 500**2  # the "tissue": a dark disc
TISSUE, GLASS = 90, 235  # 8-bit brightfield gray levels
RGB_TISSUE, RGB_GLASS = (180, 80, 160), (240, 238, 242)


def _gray8():
    return np.where(BLOB, TISSUE, GLASS).astype(np.uint8)


def _rgb8():
    return np.where(BLOB[..., None], RGB_TISSUE, RGB_GLASS).astype(np.uint8)


def _write(path, img, *, pyramid=True, planar=False, **kw):
    """Tiled TIFF with reduced levels as separate pages (or one flat level)."""
    step = [1, 4, 16] if pyramid else [1]
    with tifffile.TiffWriter(path) as tif:
        for i, s in enumerate(step):
            lvl = img[::s, ::s]
            if planar:
                lvl = np.ascontiguousarray(np.moveaxis(lvl, 2, 0))
            tif.write(lvl, tile=(256, 256), subfiletype=1 if i else 0, **kw)
    return path


def _alpha(img, value):
    """Append an alpha sample: opaque, except a transparent band at the top."""
    a = np.full(img.shape[:2], value, img.dtype)
    a[:128] = 0
    return np.dstack([img.reshape(N, N, -1), a])


LAYOUTS = {
    "gray8": lambda p: _write(p, _gray8(), photometric="minisblack"),
    "gray16_12bit": lambda p: _write(p, _gray8().astype(np.uint16) * 16, photometric="minisblack"),
    "gray16_full": lambda p: _write(p, _gray8().astype(np.uint16) * 257, photometric="minisblack"),
    "gray8_flat": lambda p: _write(p, _gray8(), pyramid=False, photometric="minisblack"),
    "miniswhite": lambda p: _write(p, 255 - _gray8(), photometric="miniswhite"),
    "gray_alpha": lambda p: _write(
        p, _alpha(_gray8(), 255), photometric="minisblack", extrasamples=["unassalpha"]
    ),
    "float32": lambda p: _write(p, _gray8().astype(np.float32) / 255, photometric="minisblack"),
    "rgba": lambda p: _write(
        p, _alpha(_rgb8(), 255), photometric="rgb", extrasamples=["unassalpha"]
    ),
    "rgb16": lambda p: _write(p, _rgb8().astype(np.uint16) * 257, photometric="rgb"),
    "rgba16": lambda p: _write(
        p,
        _alpha(_rgb8().astype(np.uint16) * 257, 65535),
        photometric="rgb",
        extrasamples=["unassalpha"],
    ),
    "planar_rgb": lambda p: _write(p, _rgb8(), planar=True, photometric="rgb"),
    "palette": lambda p: _write(
        p,
        _gray8(),
        photometric="palette",
        colormap=np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1)),
    ),
}
TRANSPARENT_TOP = {"gray_alpha", "rgba", "rgba16"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("layouts")
    return {name: make(folder / f"{name}.tif") for name, make in LAYOUTS.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reads_as_uint8_rgb_and_its_tissue_is_found(slides, name):
    with open_slide(slides[name], mpp=MPP) as s:
        assert s.dimensions == (N, N)
        region = s.read_region((900, 1000), 0, (64, 48))  # inside the blob
        assert region.dtype == np.uint8 and region.shape == (48, 64, 3)
        glass = s.read_region((1900, 100 if name not in TRANSPARENT_TOP else 300), 0, (32, 32))
        # Tissue darker than glass, by a brightfield-like margin; glass bright.
        assert int(glass.min()) >= 230 and int(region.mean()) < int(glass.mean()) - 50
        if name in TRANSPARENT_TOP:
            assert (s.read_region((0, 0), 0, (N, 100)) == 255).all()
        thumb, ds = s.thumbnail(256)
        assert thumb.dtype == np.uint8 and thumb.shape == (256, 256, 3)
        assert ds == pytest.approx(N / 256)
        mask, mask_ds, _ = slide_tissue_mask(s, TileConfig())
    assert mask.mean() == pytest.approx(BLOB.mean(), abs=0.015)
    # The mask is the blob, not just as large as it.
    blob = BLOB[:: round(mask_ds), :: round(mask_ds)][: mask.shape[0], : mask.shape[1]]
    assert (mask & blob).sum() / (mask | blob).sum() > 0.9


def test_gray_slides_match_the_8bit_gray_and_are_not_sent_to_openslide(slides):
    with open_slide(slides["gray8"], mpp=MPP) as s8:
        ref = s8.read_region((700, 800), 0, (256, 256)).astype(int)
        assert s8.reader_name == "tifffile" and (ref[..., 0] == ref[..., 2]).all()
    for name in ("miniswhite", "float32", "palette", "gray8_flat", "gray_alpha"):
        with open_slide(slides[name], mpp=MPP) as s:
            np.testing.assert_array_equal(s.read_region((700, 800), 0, (256, 256)), ref)
    for name in ("gray16_12bit", "gray16_full"):
        with open_slide(slides[name], mpp=MPP) as s:
            got = s.read_region((700, 800), 0, (256, 256)).astype(int)
        # 16-bit: scaled by the slide's range, glass (the 99.9th percentile) at white.
        expect = np.round(ref * 255 / GLASS)
        assert np.abs(got - expect).max() <= 1


def test_16bit_scaling_is_the_same_for_every_tile(slides):
    """A tile of uniform tissue reads as the tissue parts of a mixed tile (no per-tile stretch)."""
    with open_slide(slides["gray16_12bit"], mpp=MPP) as s:
        assert s.layout.value_range == (0.0, pytest.approx(GLASS * 16, rel=0.01))
        inside = s.read_region((950, 1050), 0, (128, 128))
        edge = s.read_region((400, 1036), 0, (256, 128))  # straddles the blob's left edge
        outside = s.read_region((1800, 100), 0, (128, 128))
        level2 = s.read_region((950, 1050), 2, (8, 8))
    tissue_px = edge[BLOB[1036:1164, 400:656]]
    assert np.unique(inside).tolist() == np.unique(tissue_px).tolist() == [98]
    assert np.unique(outside).tolist() == [255] and np.unique(level2).tolist() == [98]


def test_rgb16_is_scaled_like_the_8bit_rgb(slides):
    with open_slide(slides["rgb16"], mpp=MPP) as s:
        assert s.reader_name == "tifffile"
        px = s.read_region((1000, 1100), 0, (1, 1))[0, 0]
        hi = s.layout.value_range[1] / 257
    np.testing.assert_allclose(px, np.round(np.array(RGB_TISSUE) * 255 / hi), atol=1)


def _refused(path, *words):
    with pytest.raises(SlideError) as err:
        with open_slide(path, mpp=MPP) as s:
            s.read_region((0, 0), 0, (16, 16))
    msg = str(err.value)
    assert "\n" not in msg and path.name in msg and "not supported" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_unsupported_layouts_are_refused_in_one_line_naming_the_file(tmp_path):
    small = _rgb8()[:512, :512]
    cmyk = np.dstack([255 - small, np.zeros((512, 512), np.uint8)])
    _refused(_write(tmp_path / "cmyk.tif", cmyk, photometric="separated"), "4-sample", "CMYK")
    five = np.dstack([cmyk, cmyk[..., :1]])
    path = _write(tmp_path / "ink5.tif", five, photometric="separated", extrasamples=[0])
    _refused(path, "5-sample")
    lab = tmp_path / "lab.tif"
    tifffile.imwrite(lab, small, photometric="cielab", tile=(256, 256))
    _refused(lab, "CIELab")
    two = np.dstack([small[..., 0], small[..., 1]])
    path = _write(tmp_path / "two.tif", two, photometric="minisblack", extrasamples=[0])
    _refused(path, "2-sample", "multichannel")
    fluo = tmp_path / "fluo.ome.tif"
    tifffile.imwrite(fluo, np.moveaxis(small, 2, 0).copy(), metadata={"axes": "CYX"})
    _refused(fluo, "3-channel", "CYX")


def test_pillow_images_gray16_palette_and_cmyk(tmp_path):
    from PIL import Image

    gray = _gray8()[1000:1256, 400:656]  # blob edge: tissue and glass
    Image.fromarray(gray.astype(np.uint16) * 16).save(tmp_path / "g16.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(gray).save(tmp_path / "g8.png")
    Image.fromarray(_rgb8()[:256, :256]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with open_slide(tmp_path / "g8.png") as s:
        ref = s.read_region((0, 0), 0, (256, 256))
    assert set(np.unique(ref)) == {TISSUE, GLASS}
    with open_slide(tmp_path / "pal.png") as s:
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (256, 256)), ref)
    with open_slide(tmp_path / "g16.png") as s:
        got = s.read_region((0, 0), 0, (256, 256)).astype(int)
    assert np.abs(got - np.round(ref.astype(int) * 255 / GLASS)).max() <= 1
    _refused(tmp_path / "cmyk.jpg", "CMYK")


def test_tissue_signal_on_gray_is_darkness_relative_to_the_glass():
    rgb = np.repeat(_gray8()[::16, ::16, None], 3, axis=2)
    sig = tissue_signal(rgb)
    assert sig[~BLOB[::16, ::16]].max() == pytest.approx(0.0)
    assert sig[BLOB[::16, ::16]].min() == pytest.approx(1 - TISSUE / GLASS)
    mask = tissue_mask(rgb, pixel_um=MPP * 16)
    assert abs(mask.mean() - BLOB.mean()) < 0.015
    # An all-glass gray slide has no tissue.
    assert not tissue_mask(np.full((128, 128, 3), 243, np.uint8), pixel_um=8.0).any()


def test_wsimil_tile_tiles_a_16bit_gray_slide(tmp_path, slides):
    manifest = tmp_path / "manifest.csv"
    rows = [
        {"slide_id": name, "path": str(slides[name]), "label": 0, "mpp": MPP}
        for name in ("gray16_12bit", "gray8")
    ]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "wsimil.cli", "tile", str(run), "--manifest", str(manifest)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = (run / "tiles" / "status.jsonl").read_text().splitlines()
    status = {d["slide_id"]: d for d in map(json.loads, lines)}
    from wsimil.store import open_store

    for name in ("gray16_12bit", "gray8"):
        assert status[name]["status"] == "ok", status[name]
        coords = np.asarray(open_store(run / "tiles" / f"{name}.zarr")["coords"])
        # 256 px tiles at 0.5 µm/px: those at least half in the 1000 px disc, about 12.
        assert 8 <= len(coords) <= 16
        centre = coords + 128
        assert (BLOB[centre[:, 1], centre[:, 0]]).mean() > 0.7
