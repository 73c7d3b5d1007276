"""Tile cache stage: the embed reader's pixels, self-describing stores, atomic and resumable."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner
from slide_damage import corrupt_one_tissue_tile

from wsimil import tile_cache
from wsimil.cli import main
from wsimil.config import TileConfig
from wsimil.embed import SlideJob, read_tiles, resize_tile
from wsimil.layout import RunLayout, partial_path
from wsimil.manifest import read_manifest
from wsimil.slide import OpenSlideReader
from wsimil.store import StatusLog, open_store, write_array
from wsimil.synth import make_cohort
from wsimil.tile import run_tile
from wsimil.tile_cache import open_cache, run_cache

PX = 32
TILE = TileConfig(target_mpp=1.0, tile_px=128)  # 35-44 tiles a slide, read at level 0 (256 px)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    run = tmp_path_factory.mktemp("cache")
    df = read_manifest(make_cohort(run, n_slides=2, width_px=2048, height_px=2048, seed=11))
    run_tile(df, run, TILE)
    res = run_cache(df, run, px=PX, batch_size=8)
    assert res.status.tolist() == ["ok", "ok"]
    return run, df


def _copy_run(run: Path, dst: Path) -> Path:
    """A new run folder with the cohort's manifest and tile stores (no cache)."""
    dst.mkdir(exist_ok=True)
    shutil.copy(run / "manifest.csv", dst / "manifest.csv")
    shutil.copytree(run / "tiles", dst / "tiles")
    text = (dst / "manifest.csv").read_text().replace("slides/", f"{run}/slides/")
    (dst / "manifest.csv").write_text(text)
    return dst


def _tiles(run: Path, sid: str):
    g = open_store(RunLayout(run).tile_store(sid))
    return dict(g.attrs), g["coords"][...]


def test_layout_paths_and_px_rule(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.tile_cache(64).path == tmp_path / "tile_cache" / "64px"
    assert layout.tile_cache_store(8, "s1") == tmp_path / "tile_cache" / "8px" / "s1.zarr"
    for bad in (4, 7, 1025, 64.0, True, "64"):
        with pytest.raises(ValueError, match="8..1024"):
            layout.tile_cache(bad)
    with pytest.raises(ValueError, match="slide_id"):
        layout.tile_cache_store(64, "../x")


def test_cached_pixels_are_the_readers_tiles_resized(cohort):
    run, df = cohort
    for sid, path in zip(df.slide_id, df.path, strict=True):
        attrs, coords = _tiles(run, sid)
        job = SlideJob(sid, str(path), None, coords, attrs["read_level"], attrs["read_px"], attrs)
        with OpenSlideReader(Path(path)) as slide:  # tile by tile, the other reader than auto's
            expected = read_tiles(slide, coords, job, size=PX)
            r = attrs["read_px"]
            one = slide.read_region(tuple(int(v) for v in coords[3]), attrs["read_level"], (r, r))
        cached = open_cache(RunLayout(run), PX, sid)[...]
        assert cached.shape == (len(coords), PX, PX, 3) and len(coords) > 8
        assert np.abs(cached.astype(int) - expected.astype(int)).max() <= 1
        np.testing.assert_array_equal(cached[3], resize_tile(one, PX))
        assert cached.std() > 5  # tissue, not blank tiles


def a_shards(array):
    return tuple(array.shards)


def test_store_attrs_and_one_chunk_per_tile(cohort):
    run, df = cohort
    sid = df.slide_id[0]
    tattrs, coords = _tiles(run, sid)
    g = zarr.open_group(str(RunLayout(run).tile_cache_store(PX, sid)), mode="r")
    tiles = g["tiles"]
    assert sorted(g.keys()) == ["coords", "tiles"]
    np.testing.assert_array_equal(g["coords"][...], coords)
    assert a_shards(tiles) == (min(256, len(coords)), PX, PX, 3)
    assert tiles.dtype == np.uint8 and tiles.shape == (len(coords), PX, PX, 3)
    assert tiles.chunks == (1, PX, PX, 3)
    a = dict(g.attrs)
    assert a["format"] == "wsimil-tile-cache" and a["format_version"] == 1
    assert a["slide_id"] == sid and a["source"] == str(df.path[0])
    assert a["n_tiles"] == len(coords) and a["px"] == PX
    assert a["tile_px"] == 128 and a["mpp"] == tattrs["target_mpp"] == 1.0
    assert a["cache_mpp"] == pytest.approx(1.0 * 128 / PX)
    assert a["coords_sha256"] == hashlib.sha256(coords.astype(np.int32).tobytes()).hexdigest()
    assert a["tile_config_hash"] == tattrs["config_hash"]
    assert (RunLayout(run).tile_cache(PX).path / "config.yaml").read_text().startswith("px: 32")
    layout = RunLayout(run)
    assert open_cache(layout, PX, sid, coords=coords, tile_store_attrs=tattrs).shape == tiles.shape
    with pytest.raises(ValueError, match="made from other tiles"):
        open_cache(layout, PX, sid, coords=coords, tile_store_attrs={"config_hash": "other"})


def test_resume_skips_complete_stores_and_redoes_a_killed_one(cohort, tmp_path):
    src, df = cohort
    run = _copy_run(src, tmp_path / "run")
    df = read_manifest(run / "manifest.csv")
    layout = RunLayout(run)
    assert run_cache(df, run, px=PX).status.tolist() == ["ok", "ok"]
    first, second = (layout.tile_cache_store(PX, s) for s in df.slide_id)
    stamp = (first / "zarr.json").stat().st_mtime_ns
    want = zarr.open_group(str(second), mode="r")["tiles"][...]
    shutil.rmtree(second)  # as a run killed while writing it leaves it: only the partial store
    (partial_path(second) / "tiles").mkdir(parents=True)
    (partial_path(second) / "zarr.json").write_text("{")
    res = run_cache(df, run, px=PX)
    assert res.status.tolist() == ["skipped", "ok"]
    assert (first / "zarr.json").stat().st_mtime_ns == stamp
    assert not partial_path(second).exists()
    np.testing.assert_array_equal(open_cache(layout, PX, df.slide_id[1])[...], want)
    lines = [
        (x["slide_id"], x["status"]) for x in StatusLog(layout.tile_cache(PX).status_file).read()
    ]
    assert lines[-3:] == [(df.slide_id[0], "skipped"), (df.slide_id[1], "interrupted"),
                          (df.slide_id[1], "ok")]  # fmt: skip


def test_a_cache_of_other_tiles_is_refused(cohort, tmp_path):
    src, df = cohort
    run = _copy_run(src, tmp_path / "run")
    df = read_manifest(run / "manifest.csv")
    layout, sid = RunLayout(run), df.slide_id[0]
    run_cache(df.iloc[:1], run, px=PX)
    coords = zarr.open_group(str(layout.tile_store(sid)), mode="r+")["coords"]
    coords[0] = coords[1]  # the tiles changed since the cache was made
    with pytest.raises(ValueError) as err:
        open_cache(layout, PX, sid)
    text = str(err.value)
    assert "\n" not in text and str(layout.tile_cache_store(PX, sid)) in text
    assert f"wsimil cache {run} --px {PX}" in text
    res = run_cache(df.iloc[:1], run, px=PX)
    assert res.status.tolist() == ["error"] and "--overwrite" in res.message[0]
    assert run_cache(df.iloc[:1], run, px=PX, overwrite=True).status.tolist() == ["ok"]
    assert open_cache(layout, PX, sid).shape[0] == coords.shape[0]
    with pytest.raises(FileNotFoundError, match="--px 64"):
        open_cache(layout, 64, sid)


def test_tiles_are_written_batch_by_batch(cohort, tmp_path):
    """A slide of more tiles than a batch: each batch is on disk before the next is read."""
    run, df = cohort
    sid = df.slide_id[0]
    layout = RunLayout(run)
    stage = tile_cache.CacheStage(layout, tile_cache.CacheConfig(px=PX, batch_size=8))
    job = stage.plan(dict(df.iloc[0]))
    out = tmp_path / f"{sid}.zarr"
    seen = []

    def watched():
        for block in stage._batches(job):
            chunks = partial_path(out) / "tiles" / "c"
            seen.append(sum(1 for p in chunks.rglob("*") if p.is_file()) if chunks.exists() else 0)
            yield block

    n = tile_cache.write_cache(out, job, watched(), shard_tiles=16)
    assert n == len(job.coords) > 32
    assert seen == [k // 2 for k in range(-(-n // 8))]  # a shard file per 2 batches, as they come
    tiles = zarr.open_group(str(out), mode="r")["tiles"]
    assert tiles.chunks == (1, PX, PX, 3)
    np.testing.assert_array_equal(tiles[...], open_cache(layout, PX, sid)[...])


def test_a_bad_slide_gets_one_line_and_leaves_nothing(cohort, tmp_path):
    src, df = cohort
    run = _copy_run(src, tmp_path / "run")
    bad = shutil.copy(df.path[0], tmp_path / "bad.tiff")
    corrupt_one_tissue_tile(Path(bad), _tiles(run, df.slide_id[0])[1])
    rows = {"slide_id": [df.slide_id[0], df.slide_id[1], "untiled"],
            "path": [bad, df.path[1], df.path[1]], "label": [0, 1, 1]}  # fmt: skip
    pd.DataFrame(rows).to_csv(run / "manifest.csv", index=False)
    res = run_cache(read_manifest(run / "manifest.csv"), run, px=PX, batch_size=8)
    assert res.status.tolist() == ["error", "ok", "error"]
    assert "bad.tiff" in res.message[0] and "\n" not in res.message[0]
    assert res.message[2] == "untiled: no tile store; run `wsimil tile` first"
    folder = RunLayout(run).tile_cache(PX).path
    assert sorted(
        p.name for p in folder.iterdir() if p.suffix == ".zarr" or "partial" in p.name
    ) == [f"{df.slide_id[1]}.zarr"]


def test_a_slide_without_tiles_is_empty(cohort, tmp_path):
    src, df = cohort
    run = _copy_run(src, tmp_path / "run")
    df = read_manifest(run / "manifest.csv").iloc[:1]
    layout, sid = RunLayout(run), df.slide_id[0]
    g = zarr.open_group(str(layout.tile_store(sid)), mode="r+")
    del g["coords"]
    write_array(g, "coords", np.zeros((0, 2), np.int32))
    res = run_cache(df, run, px=PX)
    assert res.status.tolist() == ["empty"] and res.n_tiles.tolist() == [0]
    assert open_cache(layout, PX, sid).shape == (0, PX, PX, 3)


def test_cli_runs_and_refuses_a_tiny_px(cohort, tmp_path):
    src, _ = cohort
    run = _copy_run(src, tmp_path / "run")
    r = CliRunner().invoke(main, ["cache", str(run), "--px", "16", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert open_cache(RunLayout(run), 16, "synth_000").shape[1:] == (16, 16, 3)
    r = CliRunner().invoke(main, ["cache", str(run), "--px", "4"])
    assert r.exit_code != 0
    errors = [x for x in r.output.splitlines() if x.startswith("Error")]
    assert errors == ["Error: --px = 4: input should be greater than or equal to 8"]
    with pytest.raises(ValueError, match="8..1024"):
        run_cache(read_manifest(run / "manifest.csv"), run, px=2000)
