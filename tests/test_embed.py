"""Embed stage: readers agree, features do not depend on the batch, failures are contained."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from slide_damage import corrupt_one_tissue_tile

from wsimil.config import EmbedConfig, TileConfig
from wsimil.embed import SlideJob, read_tiles, row_runs, run_embed
from wsimil.manifest import read_manifest
from wsimil.slide import OpenSlideReader, TiffReader
from wsimil.store import open_store
from wsimil.synth import make_cohort, write_synthetic_slide
from wsimil.tile import run_tile

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "cmu_small_region.svs"
TILE = TileConfig(target_mpp=1.0, tile_px=128)  # ~40 tiles a slide: a CNN pass each


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    run = tmp_path_factory.mktemp("embed")
    manifest = make_cohort(run, n_slides=3, width_px=2048, height_px=2048, mpp=0.5, seed=11)
    df = read_manifest(manifest)
    run_tile(df, run, TILE)
    return run, df


def _job(run, sid, *, reader, group):
    g = open_store(run / "tiles" / f"{sid}.zarr")
    a = dict(g.attrs)
    return SlideJob(
        sid,
        str(run / "slides" / f"{sid}.tiff"),
        None,
        g["coords"][...],
        a["read_level"],
        a["read_px"],
        a,
        a["stride_px_level0"],
        group,
        reader,
    )


def test_row_runs_group_horizontal_neighbours_only():
    coords = np.array([[0, 0], [10, 0], [20, 0], [40, 0], [0, 10], [10, 10]])
    assert row_runs(coords, step_px=10, max_run=16) == [(0, 3), (3, 1), (4, 2)]
    assert row_runs(coords, step_px=10, max_run=2) == [(0, 2), (2, 1), (3, 1), (4, 2)]


def test_all_read_paths_give_the_same_pixels(cohort):
    run, df = cohort
    sid = df.slide_id[0]
    outs = []
    for reader, cls in (("openslide", OpenSlideReader), ("tifffile", TiffReader)):
        for group in (False, True):
            job = _job(run, sid, reader=reader, group=group)
            with cls(Path(job.path)) as slide:
                outs.append(read_tiles(slide, job.coords, job, size=96))
    assert outs[0].shape == (len(_job(run, sid, reader="openslide", group=False).coords), 96, 96, 3)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.skipif(not CMU.exists(), reason=f"real H&E slide not present at {CMU}")
def test_tifffile_reads_the_real_svs_like_openslide():
    with OpenSlideReader(CMU) as o, TiffReader(CMU) as t:
        assert o.level_dimensions == t.level_dimensions
        a = o.read_region((700, 900), 0, (512, 300)).astype(int)
        b = t.read_region((700, 900), 0, (512, 300)).astype(int)
    assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.1


def test_features_do_not_depend_on_batch_size_or_reader(cohort, tmp_path):
    run, df = cohort
    one = df.iloc[:1]
    results = {}
    for name, kw in {
        "b1": dict(batch_size=1, reader="openslide"),
        "b64": dict(batch_size=64, reader="tifffile"),
    }.items():
        out = tmp_path / name
        (out / "tiles").mkdir(parents=True)
        os.symlink(
            run / "tiles" / f"{one.slide_id[0]}.zarr", out / "tiles" / f"{one.slide_id[0]}.zarr"
        )
        res = run_embed(one, out, EmbedConfig(encoder="efficientnet_lite0", num_workers=0, **kw))
        assert res.status.tolist() == ["ok"]
        results[name] = open_store(
            out / "features" / "efficientnet_lite0" / f"{one.slide_id[0]}.zarr"
        )["features"][...].astype(np.float32)
    assert results["b1"].shape[0] > 10
    np.testing.assert_allclose(results["b1"], results["b64"], rtol=2e-2, atol=2e-2)


def test_corrupt_tile_fails_that_slide_only_and_leaves_no_store(tmp_path):
    run = tmp_path
    (run / "slides").mkdir()
    for i in range(2):
        write_synthetic_slide(
            run / "slides" / f"s{i}.tiff", width_px=2048, height_px=2048, mpp=0.5, seed=20 + i
        )
    pd.DataFrame(
        {"slide_id": ["s0", "s1"], "path": ["slides/s0.tiff", "slides/s1.tiff"], "label": [0, 1]}
    ).to_csv(run / "manifest.csv", index=False)
    df = read_manifest(run / "manifest.csv")
    run_tile(df, run, TILE)
    corrupt_one_tissue_tile(
        run / "slides" / "s0.tiff", open_store(run / "tiles" / "s0.zarr")["coords"][...]
    )
    res = run_embed(
        df, run, EmbedConfig(encoder="efficientnet_lite0", num_workers=1, batch_size=16)
    ).set_index("slide_id")
    assert (
        res.status["s0"] == "error"
        and "s0.tiff" in res.message["s0"]
        and "JPEG" in res.message["s0"]
    )
    assert "\n" not in res.message["s0"]
    assert res.status["s1"] == "ok"
    feat_dir = run / "features" / "efficientnet_lite0"
    assert not (feat_dir / "s0.zarr").exists() and (feat_dir / "s1.zarr").exists()
    assert not [p for p in feat_dir.iterdir() if ".tmp-" in p.name]


def _embed_cmd(run, out, *extra):
    """`wsimil embed` into a new run folder ``out`` that shares ``run``'s tiles."""
    out.mkdir()
    os.symlink(run / "tiles", out / "tiles")
    return [
        sys.executable, "-m", "wsimil.cli", "embed", str(out), "--manifest",
        str(run / "manifest.csv"), "--encoder", "efficientnet_lite0", "--num-workers", "0", *extra,
    ]  # fmt: skip


def test_killed_run_resumes_and_gives_the_same_features(cohort, tmp_path):
    run, df = cohort
    ref = tmp_path / "ref"
    ref.mkdir()
    os.symlink(run / "tiles", ref / "tiles")
    run_embed(df, ref, EmbedConfig(encoder="efficientnet_lite0", num_workers=0, batch_size=16))

    out = tmp_path / "killed"
    cmd = _embed_cmd(run, out, "--batch-size", "16")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    feat_dir = out / "features" / "efficientnet_lite0"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        feat_dir.exists()
        and any(p.suffix == ".zarr" and not p.name.startswith(".") for p in feat_dir.iterdir())
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(
        p.name for p in feat_dir.iterdir() if p.suffix == ".zarr" and not p.name.startswith(".")
    )
    assert 1 <= len(done_before) < len(df), "kill should land mid-cohort"

    first = _status_lines(feat_dir)
    # Logged as each slide ended, not at the end (a kill between a store's rename and its line
    # can lose that one line).
    assert first and {d["slide_id"] for d in first} <= set(done_before_ids(done_before))
    assert all(d["status"] == "ok" for d in first)

    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "skipped" in res.stderr
    second = _status_lines(feat_dir)[len(first) :]
    ends = [d for d in second if d["status"] != "interrupted"]
    assert sorted(d["slide_id"] for d in ends) == sorted(df.slide_id)  # one line per attempt
    assert {d["slide_id"] for d in ends if d["status"] == "skipped"} == set(
        done_before_ids(done_before)
    )
    assert all(d["status"] == "interrupted" for d in second if d not in ends)
    for sid in df.slide_id:
        a = open_store(feat_dir / f"{sid}.zarr")["features"][...]
        b = open_store(ref / "features" / "efficientnet_lite0" / f"{sid}.zarr")["features"][...]
        # Same tiles, same batches; CPU kernels may still round differently across processes
        # (about one float16 ulp on a few elements), so compare within that.
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=1e-3)
    assert not [p for p in feat_dir.iterdir() if p.name.endswith(".partial")], (
        "partial stores of the killed run are cleaned up"
    )


def _status_lines(feat_dir):
    import json

    return [json.loads(line) for line in (feat_dir / "status.jsonl").read_text().splitlines()]


def done_before_ids(names):
    return sorted(n.removesuffix(".zarr") for n in names)


def test_two_concurrent_embeds_do_each_slide_once(cohort, tmp_path):
    run, df = cohort
    out = tmp_path / "two"
    cmd = _embed_cmd(run, out)
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    lines = _status_lines(out / "features" / "efficientnet_lite0")
    assert sorted(d["slide_id"] for d in lines if d["status"] == "ok") == sorted(df.slide_id)
    assert len(lines) == 2 * len(df)  # the other process logged each slide as skipped
    assert {d["status"] for d in lines} == {"ok", "skipped"}
    assert len({d["worker"] for d in lines}) == 2


def test_devices_run_one_process_each_and_share_the_cohort(cohort, tmp_path):
    run, df = cohort
    out = tmp_path / "multi"
    cmd = _embed_cmd(run, out, "--devices", "cpu,cpu")
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [
        line
        for line in (out / "features" / "efficientnet_lite0" / "status.jsonl")
        .read_text()
        .splitlines()
    ]
    assert len(lines) == len(df)  # every slide embedded exactly once across the two processes
    for sid in df.slide_id:
        assert (out / "features" / "efficientnet_lite0" / f"{sid}.zarr").exists()
