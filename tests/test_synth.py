"""Synthetic cohort generator: OpenSlide-readable pyramids, determinism, lesions, cohort files."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile

openslide = pytest.importorskip("openslide")

from wsimil.synth import load_lesion_mask, make_cohort, write_synthetic_slide  # noqa: E402

W, H = 2048, 1536
DS = 16


def level0(path: Path) -> np.ndarray:
    """Decoded level-0 pixels, (H, W, 3) uint8."""
    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].asarray()


def read_level(slide, level: int) -> np.ndarray:
    return np.asarray(
        slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB")
    )


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    out = {}
    for name, kw in {
        "pos": dict(positive=True, seed=11),
        "pos_bands": dict(positive=True, seed=11, _band_rows=256),
        "neg": dict(positive=False, seed=12),
    }.items():
        path = d / f"{name}.tiff"
        mask = write_synthetic_slide(
            path, width_px=W, height_px=H, mpp=0.5, mask_downsample=DS, **kw
        )
        out[name] = (path, mask)
    return out


def test_openslide_opens_a_pyramid_with_mpp(slides):
    path, _ = slides["pos"]
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.dimensions == (W, H)
        assert s.level_count >= 2
        assert s.level_dimensions[1] == (W // 4, H // 4)
        np.testing.assert_allclose(s.level_downsamples[:2], (1.0, 4.0), rtol=1e-6)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        region = np.asarray(s.read_region((W // 2 - 128, H // 2 - 128), 0, (256, 256)))
        assert region.shape == (256, 256, 4) and (region[..., 3] == 255).all()
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff
        assert [p.subfiletype for p in tf.pages] == [0] + [1] * (len(tf.pages) - 1)
        assert all(p.is_tiled and p.tile == (256, 256) and p.compression == 7 for p in tf.pages)


def test_odd_size_and_other_mpp(tmp_path):
    path = tmp_path / "odd.tiff"
    mask = write_synthetic_slide(
        path,
        width_px=1000,
        height_px=700,
        mpp=0.25,
        positive=True,
        seed=3,
        n_lesions=1,
        mask_downsample=8,
    )
    assert mask.shape == (math.ceil(700 / 8), math.ceil(1000 / 8)) and mask.dtype == bool
    with openslide.OpenSlide(str(path)) as s:
        assert s.dimensions == (1000, 700)
        assert s.level_count == 2 and s.level_dimensions[1] == (250, 175)
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_same_seed_same_pixels_and_band_size_does_not_matter(slides, tmp_path):
    path, mask = slides["pos"]
    again = tmp_path / "again.tiff"
    mask2 = write_synthetic_slide(
        again, width_px=W, height_px=H, mpp=0.5, positive=True, seed=11, mask_downsample=DS
    )
    a = level0(path)
    assert a.shape == (H, W, 3)
    np.testing.assert_array_equal(a, level0(again))
    np.testing.assert_array_equal(mask, mask2)
    # Rendering in 256-row bands instead of one band gives the same pixels and pyramid.
    bands_path, bands_mask = slides["pos_bands"]
    np.testing.assert_array_equal(a, level0(bands_path))
    np.testing.assert_array_equal(mask, bands_mask)
    with tifffile.TiffFile(path) as t1, tifffile.TiffFile(bands_path) as t2:
        np.testing.assert_array_equal(t1.pages[1].asarray(), t2.pages[1].asarray())


def test_different_seed_differs(slides, tmp_path):
    other = tmp_path / "other.tiff"
    write_synthetic_slide(
        other, width_px=W, height_px=H, mpp=0.5, positive=True, seed=12, mask_downsample=DS
    )
    assert (level0(slides["pos"][0]) != level0(other)).mean() > 0.1


def test_reduced_level_is_the_area_average_of_level0(slides):
    path, _ = slides["pos"]
    with tifffile.TiffFile(path) as tf:
        l0 = tf.pages[0].asarray().astype(np.float32)
        l1 = tf.pages[1].asarray().astype(np.float32)
    mean = l0.reshape(H // 4, 4, W // 4, 4, 3).mean(axis=(1, 3))
    assert np.abs(mean - l1).mean() < 3.0  # JPEG differences only


def test_positive_slide_has_darker_purple_lesions_inside_tissue(slides):
    path, mask = slides["pos"]
    assert mask.shape == (math.ceil(H / DS), math.ceil(W / DS)) and mask.dtype == bool
    assert mask.any()
    img = level0(path).astype(np.float32)
    # Mask cells well inside the lesion vs tissue far from it.
    from scipy.ndimage import binary_dilation, binary_erosion

    inner = binary_erosion(mask, iterations=1)
    outside = ~binary_dilation(mask, iterations=3)
    cells = (
        img[: mask.shape[0] * DS, : mask.shape[1] * DS]
        .reshape(mask.shape[0], DS, mask.shape[1], DS, 3)
        .mean(axis=(1, 3))
    )
    tissue = cells.mean(-1) < 225
    lesion_px, normal_px = cells[inner & tissue], cells[outside & tissue]
    assert len(lesion_px) > 20 and len(normal_px) > 100
    assert inner[tissue].mean() < 0.25  # lesions are a small part of the tissue
    les, nor = lesion_px.mean(0), normal_px.mean(0)
    assert les.mean() < nor.mean() - 40  # darker
    assert les[2] / les[0] > nor[2] / nor[0] + 0.1  # bluer relative to red: purple, not pink
    # The lesion mask lies inside tissue.
    assert tissue[inner].mean() > 0.95


def test_negative_slide_has_no_lesion(slides):
    path, mask = slides["neg"]
    assert mask.shape == (math.ceil(H / DS), math.ceil(W / DS)) and not mask.any()
    with openslide.OpenSlide(str(path)) as s:
        l1 = read_level(s, 1).astype(np.float32)

    # Averaged over 32 x 32 level-0 px, dense dark lesions stay dark; sparse stroma nuclei do not.
    def dark_fraction(l1):
        h, w = l1.shape[0] // 8 * 8, l1.shape[1] // 8 * 8
        blocks = l1[:h, :w].reshape(h // 8, 8, w // 8, 8, 3).mean(axis=(1, 3, 4))
        return (blocks < 160).mean()

    assert dark_fraction(l1) == 0
    with openslide.OpenSlide(str(slides["pos"][0])) as s:
        assert dark_fraction(read_level(s, 1).astype(np.float32)) > 0.005


@pytest.mark.parametrize("name", ["pos", "neg"])
def test_tissue_covers_a_plausible_part_of_the_slide(slides, name):
    with openslide.OpenSlide(str(slides[name][0])) as s:
        low = read_level(s, s.level_count - 1).astype(np.float32)
    frac = (low.mean(-1) < 225).mean()
    assert 0.15 < frac < 0.70
    # Background is bright and near-neutral.
    corner = low[:8, :8].reshape(-1, 3).mean(0)
    np.testing.assert_allclose(corner, (240, 238, 242), atol=6)


def test_make_cohort_manifest_balance_paths_and_resume(tmp_path):
    calls = []
    out = tmp_path / "cohort"
    manifest = make_cohort(
        out,
        n_slides=4,
        positive_fraction=0.5,
        width_px=768,
        height_px=512,
        seed=7,
        n_lesions=1,
        progress=lambda i, n, sid: calls.append((i, n, sid)),
    )
    assert manifest == out / "manifest.csv"
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
        assert list(rows[0].keys()) == ["slide_id", "path", "label", "lesion_mask"]
    assert [r["slide_id"] for r in rows] == [f"synth_{i:03d}" for i in range(4)]
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1]
    assert calls == [(i + 1, 4, f"synth_{i:03d}") for i in range(4)]
    for r in rows:
        assert r["path"] == f"slides/{r['slide_id']}.tiff"
        assert r["lesion_mask"] == f"truth/{r['slide_id']}_lesion.png"
        assert (out / r["path"]).is_file()
        mask, ds = load_lesion_mask(out / r["lesion_mask"], slide_width_px=768)
        assert mask.shape == (512 // 16, 768 // 16) and ds == 16.0
        assert mask.any() == (r["label"] == "1")
    assert not list(out.rglob("*.tmp")) and not [p for p in out.rglob(".*")]

    # The project's manifest reader accepts it and resolves the relative paths.
    from wsimil.manifest import read_manifest

    df = read_manifest(manifest, require_label=True)
    assert all(Path(p).is_file() for p in df["path"]) and all(
        Path(p).is_file() for p in df["lesion_mask"]
    )

    # A re-run skips finished slides; a missing slide is regenerated alone, identically.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "slides").iterdir()}
    pixels = level0(out / rows[2]["path"])
    (out / rows[2]["path"]).unlink()
    (out / "slides" / "synth_001.tiff.tmp").write_bytes(b"partial file from a killed run")
    assert (
        make_cohort(out, n_slides=4, width_px=768, height_px=512, seed=7, n_lesions=1) == manifest
    )
    for p, t in mtimes.items():
        if p.name != "synth_002.tiff":
            assert p.stat().st_mtime_ns == t, p
    np.testing.assert_array_equal(level0(out / rows[2]["path"]), pixels)
    with open(manifest, newline="") as fh:
        assert list(csv.DictReader(fh)) == rows


def test_cohort_labels_follow_the_seed(tmp_path):
    def labels(seed, n=6, frac=1 / 3):
        m = make_cohort(
            tmp_path / f"c{seed}",
            n_slides=n,
            positive_fraction=frac,
            width_px=256,
            height_px=256,
            seed=seed,
            n_lesions=1,
        )
        with open(m, newline="") as fh:
            return [int(r["label"]) for r in csv.DictReader(fh)]

    a = labels(1)
    assert sum(a) == 2 and labels(1) == a
