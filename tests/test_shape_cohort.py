"""The shape cohort (issue 19): slides, labels and digit boxes; localisation AUC; the benchmark."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsimil.localise import (
    key_vs_other_auc,
    localisation_auc,
    mean_slide_localisation_auc,
    tile_truth,
)
from wsimil.synth.digits import draw_digits, make_shape_cohort, plan_digits

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MNIST = DATA / "mnist" / "mnist10k.npz"
SVS = DATA / "slides" / "cmu_small_region.svs"
T = 32


def _mnist(tmp_path) -> Path:
    """The real MNIST file, or a stand-in of blobs (10 classes) when the shared data is absent."""
    if MNIST.is_file():
        return MNIST
    rng = np.random.default_rng(0)
    images = np.zeros((200, 28, 28), np.uint8)
    for i in range(200):
        y, x = rng.integers(6, 16, 2)
        images[i, y : y + 8, x : x + 4 + i % 10] = 255
    path = tmp_path / "mnist.npz"
    np.savez(path, images=images, labels=np.arange(200) % 10)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shape")
    background = SVS if SVS.is_file() else None
    manifest = make_shape_cohort(tmp / "c", n_slides=6, side_px=256, mnist=_mnist(tmp),
                                 background=background, tile_px=T, seed=3)  # fmt: skip
    return manifest.parent, background


def test_slides_open_with_their_mpp_and_labels_follow_the_key_digits(cohort):
    openslide = pytest.importorskip("openslide")
    out, _ = cohort
    man = pd.read_csv(out / "manifest.csv")
    boxes = pd.read_csv(out / "boxes.csv")
    assert list(man.columns[:3]) == ["slide_id", "path", "label"] and len(man) == 6
    assert sorted(man.label) == [0, 0, 0, 1, 1, 1]
    for r in man.itertuples():
        with openslide.OpenSlide(str(out / r.path)) as s:
            assert s.dimensions == (256, 256)
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(1.0)
        b = boxes[boxes.slide_id == r.slide_id]
        assert 5 <= len(b) <= 9  # the same count range for both classes
        assert int(b.is_key.sum() > 0) == r.label  # key digits only (and always) on positives
        assert ((b.digit == 9) == (b.is_key == 1)).all()


def test_every_digit_lies_inside_one_tissue_cell_of_the_tile_grid(cohort):
    out, background = cohort
    from wsimil.synth.digits import tissue_pixels

    openslide = pytest.importorskip("openslide")
    boxes = pd.read_csv(out / "boxes.csv")
    assert ((boxes.x0 // T) == ((boxes.x1 - 1) // T)).all()
    assert ((boxes.y0 // T) == ((boxes.y1 - 1) // T)).all()
    assert (boxes.x1 <= 256).all() and (boxes.y1 <= 256).all() and (boxes.x0 >= 0).all()
    for sid, b in boxes.groupby("slide_id"):
        cells = list(zip(b.x0 // T, b.y0 // T, strict=True))
        assert len(set(cells)) == len(cells)  # no two digits share a cell
        if background is None:
            continue
        with openslide.OpenSlide(str(out / "slides" / f"{sid}.tiff")) as s:
            rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
        tissue = tissue_pixels(rgb)
        for cx, cy in cells:  # the cell is tissue (the digit darkens it, so this holds after)
            assert tissue[cy * T : (cy + 1) * T, cx * T : (cx + 1) * T].mean() >= 0.9


def test_digits_are_stained_darker_and_purple_not_pasted(tmp_path):
    rgb = np.full((64, 64, 3), (230, 170, 200), np.uint8)  # pale eosin
    ink = np.zeros((28, 28))
    ink[4:24, 12:16] = 1.0
    ((x0, y0, x1, y1),) = draw_digits(rgb, [ink], np.random.default_rng(0), tile_px=T)
    assert (x1 - x0, y1 - y0) == (4, 20)
    inside = rgb[y0:y1, x0:x1].reshape(-1, 3).astype(int)
    assert (inside.sum(1) < 230 + 170 + 200 - 200).all()  # clearly darker
    assert (inside[:, 2] > inside[:, 1]).all()  # blue above green: haematoxylin purple


def test_stronger_stain_draws_darker_digits_and_a_bad_range_is_refused(tmp_path):
    ink = np.zeros((28, 28))
    ink[4:24, 12:16] = 1.0
    means = []
    for strength in ((1.2, 1.6), (2.2, 2.8)):
        rgb = np.full((64, 64, 3), (230, 170, 200), np.uint8)
        ((x0, y0, x1, y1),) = draw_digits(rgb, [ink], np.random.default_rng(0), tile_px=T,
                                          strength=strength)  # fmt: skip
        means.append(rgb[y0:y1, x0:x1].mean())
    assert means[1] < means[0] - 20  # the 2.2-2.8 digit is clearly darker
    with pytest.raises(ValueError, match="stain strength"):
        make_shape_cohort(tmp_path / "c", n_slides=2, mnist=_mnist(tmp_path), strength=(2.0, 1.0))


def test_the_digit_plan_uses_disjoint_instances_and_equal_counts():
    labels = np.repeat(np.arange(10), 50)
    plan = plan_digits(
        labels, np.array([0, 1] * 10), key_digit=9, n_digits=(5, 9), n_key=(1, 3), seed=0
    )
    used = [i for slide in plan for i, _ in slide]
    assert len(used) == len(set(used))  # 500 digits suffice here: no instance twice
    assert all(labels[i] == c for slide in plan for i, c in slide)
    for y, slide in zip([0, 1] * 10, plan, strict=True):
        k = sum(c == 9 for _, c in slide)
        assert 5 <= len(slide) <= 9 and (1 <= k <= 3 if y else k == 0)


def test_localisation_auc_on_hand_made_tiles():
    # four 10 px tiles in a row; a key box wholly inside tile 1
    tiles = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10]])
    key = np.array([[12, 2, 18, 8]])
    assert localisation_auc([0.1, 0.9, 0.2, 0.3], tiles, key) == 1.0
    assert localisation_auc([0.9, 0.1, 0.8, 0.7], tiles, key) == 0.0
    # a key box across tiles 1 and 2: 80 % in tile 1 (positive), 20 % in tile 2 (left out)
    key2 = np.array([[12, 0, 22, 10]])
    assert tile_truth(tiles, key2).tolist() == [0, 1, -1, 0]
    assert localisation_auc([0.1, 0.9, 5.0, 0.3], tiles, key2) == 1.0  # tile 2 does not count
    # half in each of two tiles: both positives
    assert tile_truth(tiles, np.array([[15, 0, 25, 10]])).tolist() == [0, 1, 1, 0]
    # no key box: no positives, no AUC
    assert np.isnan(localisation_auc([0.1, 0.2, 0.3, 0.4], tiles, np.zeros((0, 4))))


def test_pooled_and_per_slide_localisation_auc():
    tiles = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10]])
    key = np.array([[1, 1, 9, 9]])
    a, b = [0.9, 0.1, 0.2], [0.5, 0.6, 0.1]  # slide a perfect, slide b half right
    assert mean_slide_localisation_auc([a, b], [tiles, tiles], [key, key]) == pytest.approx(0.75)
    # positives 0.9, 0.5 against negatives 0.1, 0.2, 0.6, 0.1: 7 of 8 pairs ordered right
    pooled = localisation_auc([a, b], [tiles, tiles], [key, key])
    assert pooled == pytest.approx((4 + 3) / 8)
    with pytest.raises(ValueError):
        localisation_auc([0.1, 0.2], tiles, key)


def test_key_vs_other_auc_leaves_background_tiles_out():
    tiles = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10]])
    key, other = np.array([[1, 1, 9, 9]]), np.array([[11, 1, 19, 9]])
    # attention on both digits above the background, the distractor highest: any-object
    # localisation looks fine, the key-against-other-digits question does not
    s = [0.8, 0.9, 0.1, 0.0]
    assert localisation_auc(s, tiles, key) == pytest.approx(2 / 3)
    assert key_vs_other_auc([s], [tiles], [key], [other]) == pytest.approx(0.0)
    assert key_vs_other_auc([[0.9, 0.8, 0.1, 0.0]], [tiles], [key], [other]) == pytest.approx(1.0)
    assert np.isnan(key_vs_other_auc([s], [tiles], [key], [np.zeros((0, 4))]))
    with pytest.raises(ValueError):
        key_vs_other_auc([[0.1]], [tiles], [key], [other])


@pytest.mark.slow
def test_the_benchmark_runs_the_frozen_arm_end_to_end(tmp_path):
    if not (MNIST.is_file() and SVS.is_file()):
        pytest.skip(f"needs the shared data ({MNIST}, {SVS})")
    spec = importlib.util.spec_from_file_location(
        "shape_cohort", ROOT / "benchmarks" / "shape_cohort.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules["shape_cohort"] = bench
    spec.loader.exec_module(bench)
    res = bench.main([str(tmp_path / "run"), "--quick", "--arms", "frozen"])
    frozen = res["arms"]["frozen"]
    assert frozen["status"] == "done" and frozen["n_test"] == 6
    assert 0 <= frozen["slide_auc"] <= 1 and frozen["loc_slides"] == 3
    assert 0 <= frozen["loc_auc"] <= 1 and frozen["s_per_epoch"] > 0
    assert res["arms"]["e2e"]["status"] == "to be run"
    assert (tmp_path / "run" / "shape_results.json").is_file()
    folds = bench.fold_splits(tmp_path / "run" / "models" / "frozen")
    assert len(folds) == 3 and bench.same_folds(folds, folds)
