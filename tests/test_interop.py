"""Features in from CLAM and TRIDENT and out to TRIDENT: files written with h5py exactly as those
tools write them, a round trip, bad files, and import -> train -> heatmap through the CLI."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from wsimil.cli import main
from wsimil.store import open_store
from wsimil.synth import make_cohort

SIZE, TILE = 1024, 128  # slide px at 0.5 µm/px; tiles of 128 px at level 0 (and at 0.5 µm/px)


def _save_h5(path, assets: dict, attributes: dict, chunk: int | None) -> None:
    """As CLAM's save_hdf5 (chunk 32) and TRIDENT's save_h5 (chunk 1) write a new file."""
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            d = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                 chunks=(chunk,) + val.shape[1:], dtype=val.dtype)  # fmt: skip
            d[:] = val
            for k, v in attributes.get(key, {}).items():
                d.attrs[k] = json.dumps(v) if isinstance(v, dict) else ("None" if v is None else v)


def _bag(sid: str, label: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles on the grid of a SIZE px slide; positive bags have a few tiles shifted in feature 0.
    Values are float16-exact, so every conversion on the way is exact."""
    rng = np.random.default_rng(seed)
    grid = np.array([(x, y) for y in range(0, SIZE, TILE) for x in range(0, SIZE, TILE)])
    coords = grid[rng.choice(len(grid), 24, replace=False)]
    feats = rng.normal(size=(24, dim))
    if label:
        feats[:4, 0] += 4.0
    return feats.astype(np.float16).astype(np.float32), coords


def write_trident(folder, sid, feats, coords, *, encoder="tiny", name=None, width=SIZE, **over):
    folder.mkdir(parents=True, exist_ok=True)
    name = sid if name is None else name
    cattrs = {"patch_size": TILE, "patch_size_level0": TILE, "level0_magnification": 20,
              "target_magnification": 20, "overlap": 0, "name": name, "savetodir": str(folder.parent),
              "level0_width": width, "level0_height": SIZE, **over}  # fmt: skip
    fattrs = {"name": name, "savetodir": str(folder), "encoder": encoder}
    _save_h5(folder / f"{sid}.h5", {"features": feats, "coords": coords.astype(np.int64)},
             {"features": fattrs, "coords": cattrs}, chunk=1)  # fmt: skip


def write_clam(root, sid, feats, coords):
    (root / "h5_files").mkdir(parents=True, exist_ok=True)
    (root / "pt_files").mkdir(parents=True, exist_ok=True)
    _save_h5(root / "h5_files" / f"{sid}.h5",
             {"features": feats, "coords": coords.astype(np.int32)}, {}, chunk=32)  # fmt: skip
    torch.save(torch.from_numpy(feats), root / "pt_files" / f"{sid}.pt")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    run = tmp_path_factory.mktemp("interop")
    manifest = make_cohort(run, n_slides=8, width_px=SIZE, height_px=SIZE, mpp=0.5, seed=3)
    df = pd.read_csv(manifest)
    bags = {r.slide_id: _bag(r.slide_id, int(r.label), 8, i) for i, r in enumerate(df.itertuples())}
    return run, df, bags


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _status(path):
    return {d["slide_id"]: d for d in map(json.loads, path.read_text().splitlines())}


def test_trident_import_then_export_round_trips_exactly(cohort, tmp_path):
    run, df, bags = cohort
    src = tmp_path / "trident" / "20x_128px_0px_overlap" / "features_tiny"
    for sid, (f, c) in bags.items():
        write_trident(src, sid, f, c)
    r = _invoke(["import-features", src.parent.parent, run, "--format", "trident"])
    assert r.exit_code == 0, r.output
    for sid, (f, c) in bags.items():  # TRIDENT's 'tiny' is not a wsimil name: trident-tiny
        g = open_store(run / "features" / "trident-tiny" / f"{sid}.zarr")
        np.testing.assert_array_equal(g["features"][...].astype(np.float32), f)
        np.testing.assert_array_equal(g["coords"][...], c)
        t = g.attrs["tiles"]
        assert (t["tile_px"], t["tile_px_level0"], t["target_mpp"]) == (TILE, TILE, 0.5)
        assert (t["width_px"], t["height_px"], t["slide_mpp"]) == (SIZE, SIZE, 0.5)
        assert g.attrs["encoder"]["feature_dim"] == 8
    out = tmp_path / "exported"
    r = _invoke(["export-features", run, "--encoder", "trident-tiny", "--out", out])
    assert r.exit_code == 0, r.output
    for sid, (f, c) in bags.items():
        with h5py.File(out / "features_trident-tiny" / f"{sid}.h5") as h:
            np.testing.assert_array_equal(h["features"][...], f)
            assert h["features"].dtype == np.float32 and h["coords"].dtype == np.int64
            np.testing.assert_array_equal(h["coords"][...], c)
            a = dict(h["coords"].attrs)
            assert (a["patch_size"], a["patch_size_level0"], a["target_magnification"]) == (
                TILE,
                TILE,
                20,
            )
            assert (a["level0_width"], a["name"], h["features"].attrs["name"]) == (SIZE, sid, sid)
    r = _invoke(["export-features", run, "--encoder", "trident-tiny", "--slides", sid])
    assert (run / "exports" / "trident" / "features_trident-tiny" / f"{sid}.h5").is_file()
    # the exported files come back as the same stores
    r = _invoke(["import-features", out / "features_trident-tiny", run, "--format", "trident",
                 "--encoder", "again"])  # fmt: skip
    assert r.exit_code == 0, r.output
    for sid in bags:
        a = open_store(run / "features" / "trident-tiny" / f"{sid}.zarr")
        b = open_store(run / "features" / "again" / f"{sid}.zarr")
        for k in ("features", "coords"):
            np.testing.assert_array_equal(a[k][...], b[k][...])
        keys = (
            "tile_px",
            "tile_px_level0",
            "stride_px_level0",
            "target_mpp",
            "width_px",
            "slide_mpp",
        )
        assert {k: a.attrs["tiles"][k] for k in keys} == {k: b.attrs["tiles"][k] for k in keys}


def test_bad_files_fail_their_slide_with_one_line_and_the_rest_go_on(cohort, tmp_path):
    run, df, bags = cohort
    src = tmp_path / "features_tiny"
    sids = list(bags)
    for sid, (f, c) in bags.items():
        write_trident(src, sid, f, c)
    f, c = bags[sids[0]]
    _save_h5(src / f"{sids[0]}.h5", {"features": f}, {}, chunk=1)  # no coords
    write_trident(src, sids[1], f, c[:10])  # 24 features, 10 coords
    write_trident(src, sids[2], f, c, name=sids[3])  # another slide's file
    write_trident(src, sids[3], f, c, width=4096)  # made on a bigger slide
    write_trident(src, sids[4], f.astype(np.int32), c)  # integer features
    (src / f"{sids[5]}.h5").write_text("not hdf5")
    write_trident(src, sids[6], f, c, target_magnification=None)  # save_h5 writes 'None'
    r = _invoke(["import-features", src, run, "--format", "trident", "--encoder", "bad"])
    assert r.exit_code == 1
    st = _status(run / "features" / "bad" / "status.jsonl")
    expect = {sids[0]: "no 'coords' dataset", sids[1]: "24 features but 10 coords",
              sids[2]: f"name={sids[3]!r}, a file of another slide", sids[3]: "4096 x 1024 px slide",
              sids[4]: "expected (N, D) floats", sids[5]: "not a readable HDF5 file",
              sids[6]: "coords attrs are not usable numbers"}  # fmt: skip
    for sid, text in expect.items():
        msg = st[sid]["message"]
        assert st[sid]["status"] == "error" and text in msg and "\n" not in msg, msg
        assert str(src / f"{sid}.h5") in msg
        assert not (run / "features" / "bad" / f"{sid}.zarr").exists()
    assert st[sids[7]]["status"] == "ok"


def test_a_trident_file_without_tiles_gives_an_empty_store(cohort, tmp_path):
    run, df, bags = cohort
    sids = list(bags)[:2]
    src = tmp_path / "features_tiny"
    write_trident(src, sids[0], np.empty((0,), np.float32), np.empty((0, 2), np.int64))
    write_trident(src, sids[1], *bags[sids[1]])
    r = _invoke(["import-features", src, run, "--format", "trident", "--encoder", "some",
                 "--slides", ",".join(sids)])  # fmt: skip
    assert r.exit_code == 0, r.output
    st = _status(run / "features" / "some" / "status.jsonl")
    assert (st[sids[0]]["status"], st[sids[1]]["status"]) == ("empty", "ok")
    g = open_store(run / "features" / "some" / f"{sids[0]}.zarr")
    assert g["features"].shape == (0, 8) and g["coords"].shape == (0, 2)


def test_clam_needs_geometry_flags_and_cross_checks_pt_files(cohort, tmp_path):
    run, df, bags = cohort
    sids = list(bags)[:2]
    root = tmp_path / "clam"
    for sid in sids:
        write_clam(root, sid, *bags[sid])
    args = ["import-features", root, run, "--format", "clam", "--encoder", "clam8",
            "--slides", ",".join(sids)]  # fmt: skip
    r = _invoke(args)
    assert r.exit_code == 1 and "pass --target-mpp and --tile-px" in r.output
    torch.save(torch.zeros(3, 8), root / "pt_files" / f"{sids[1]}.pt")
    r = _invoke([*args, "--target-mpp", 0.5, "--tile-px", TILE])
    assert r.exit_code == 1
    st = _status(run / "features" / "clam8" / "status.jsonl")
    assert st[sids[0]]["status"] == "ok" and "(3, 8) does not match" in st[sids[1]]["message"]
    g = open_store(run / "features" / "clam8" / f"{sids[0]}.zarr")
    assert g.attrs["tiles"]["tile_px_level0"] == TILE  # 128 px * 0.5 / 0.5
    np.testing.assert_array_equal(g["coords"][...], bags[sids[0]][1])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["clam", "trident"])
def test_import_then_train_and_heatmap(cohort, tmp_path, fmt):
    run, df, bags = cohort
    enc = f"e2e-{fmt}"
    for sid, (f, c) in bags.items():
        if fmt == "clam":
            write_clam(tmp_path / "clam", sid, f, c)
        else:
            write_trident(tmp_path / "features_tiny", sid, f, c)
    src = tmp_path / ("clam" if fmt == "clam" else "features_tiny")
    flags = ["--target-mpp", 0.5, "--tile-px", TILE] if fmt == "clam" else []
    r = _invoke(["import-features", src, run, "--format", fmt, "--encoder", enc, *flags])
    assert r.exit_code == 0, r.output
    r = _invoke(["train", run, "--encoder", enc, "--epochs", 3, "--name", enc, "--seed", 1])
    assert r.exit_code == 0, r.output
    card = json.loads((run / "models" / enc / "card.json").read_text())
    assert card["features"]["tiles"] == {"target_mpp": 0.5, "tile_px": TILE}
    r = _invoke(["heatmap", run, "--model", enc, "--thumbnail-px", 128, "--top-k", 2])
    assert r.exit_code == 0, r.output
    hm = run / "heatmaps" / enc
    for sid, (_, c) in bags.items():
        t = pd.read_csv(hm / "slides" / sid / f"{sid}.csv")
        np.testing.assert_array_equal(t[["x", "y"]].to_numpy(), c)
        assert t.attention.sum() == pytest.approx(1.0, abs=1e-3)
        assert (hm / "slides" / sid / f"{sid}.png").exists()
    assert len(pd.read_csv(hm / "predictions.csv")) == len(bags)
