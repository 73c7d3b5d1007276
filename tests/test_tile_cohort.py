"""``wsimil tile`` on cohorts: bad input, user masks, locks, kill + resume, two workers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from wsimil.config import TileConfig
from wsimil.store import open_store
from wsimil.synth import write_synthetic_slide
from wsimil.tile import run_tile

WSIMIL = [sys.executable, "-m", "wsimil.cli"]
SIZE = 1536


def _cohort(folder: Path, n: int, *, size: int = SIZE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        p = folder / f"s{i}.tiff"
        if not p.exists():
            write_synthetic_slide(
                p, width_px=size, height_px=size, mpp=0.5, positive=bool(i % 2), seed=i
            )
        rows.append({"slide_id": f"s{i}", "path": str(p), "label": i % 2})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return _cohort(tmp_path_factory.mktemp("cohort"), 6)


def _status(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "tiles" / "status.jsonl").read_text().splitlines()]


def _coords(run: Path) -> dict:
    out = {}
    for store in sorted((run / "tiles").glob("*.zarr")):
        g = open_store(store)
        out[store.stem] = (np.asarray(g["coords"]), np.asarray(g["tissue_fraction"]))
    return out


def test_bad_inputs_each_get_a_clear_status_and_the_rest_complete(tmp_path, cohort):
    good = pd.read_csv(cohort).iloc[:2]
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "text.svs").write_text("not a slide\n")
    data = Path(good.path[0]).read_bytes()
    (tmp_path / "trunc.tiff").write_bytes(data[: len(data) // 4])
    tifffile.imwrite(
        tmp_path / "blank.tif",
        np.full((1024, 1024, 3), 243, np.uint8),
        photometric="rgb",
        tile=(256, 256),
    )
    tifffile.imwrite(
        tmp_path / "tiny.tif", np.full((100, 100, 3), (200, 120, 180), np.uint8), photometric="rgb"
    )
    tifffile.imwrite(
        tmp_path / "nompp.tif",
        np.full((600, 600, 3), (200, 120, 180), np.uint8),
        photometric="rgb",
        tile=(256, 256),
    )
    bad = pd.DataFrame(
        {
            "slide_id": ["zero", "text", "trunc", "blank", "tiny", "nompp", "missing"],
            "path": [
                str(tmp_path / n)
                for n in (
                    "empty.svs",
                    "text.svs",
                    "trunc.tiff",
                    "blank.tif",
                    "tiny.tif",
                    "nompp.tif",
                    "nope.svs",
                )
            ],
            "mpp": [np.nan, np.nan, np.nan, 0.5, 0.5, np.nan, np.nan],
        }
    )
    df = pd.concat([good[["slide_id", "path"]], bad], ignore_index=True)
    res = run_tile(df, tmp_path / "run", TileConfig()).set_index("slide_id")
    st = res["status"].to_dict()
    assert st == {
        "s0": "ok",
        "s1": "ok",
        "zero": "error",
        "text": "error",
        "trunc": "error",
        "blank": "empty",
        "tiny": "empty",
        "nompp": "error",
        "missing": "error",
    }
    msg = res["message"].to_dict()
    assert "empty.svs" in msg["zero"] and "0 bytes" in msg["zero"]
    assert "text.svs" in msg["text"] and "cannot open slide" in msg["text"]
    assert "trunc.tiff" in msg["trunc"]
    assert "no tissue" in msg["blank"] and "smaller than one tile" in msg["tiny"]
    assert "'mpp' column" in msg["nompp"] and "nope.svs" in msg["missing"]
    assert all("\n" not in m for m in msg.values())
    # Complete outputs: stores for ok and empty slides (empty ones have zero tiles), none for errors.
    tiles = tmp_path / "run" / "tiles"
    assert {p.stem for p in tiles.glob("*.zarr")} == {"s0", "s1", "blank", "tiny"}
    assert open_store(tiles / "blank.zarr")["coords"].shape == (0, 2)
    assert not list(tiles.glob(".*tmp*"))
    assert {r["slide_id"]: r["status"] for r in _status(tmp_path / "run")} == st


def test_manifest_problems_are_refused_with_a_clear_message(tmp_path, cohort):
    good = pd.read_csv(cohort)
    with pytest.raises(ValueError, match="lacks column.*path"):
        run_tile(good[["slide_id"]], tmp_path, TileConfig())
    dup = pd.concat([good.iloc[:2], good.iloc[:1]])
    with pytest.raises(ValueError, match="duplicate slide_id.*s0"):
        run_tile(dup, tmp_path, TileConfig())
    # Through the CLI: exit status 1 and one line naming the manifest.
    bad = tmp_path / "bad.csv"
    good[["slide_id"]].to_csv(bad, index=False)
    r = subprocess.run(
        [*WSIMIL, "tile", str(tmp_path / "r"), "--manifest", str(bad)],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "bad.csv" in r.stderr and "path" in r.stderr


def test_geojson_and_image_masks_replace_the_computed_mask(tmp_path, cohort):
    df = pd.read_csv(cohort).iloc[:2][["slide_id", "path"]]
    masks = tmp_path / "masks"
    masks.mkdir()
    # s0: a QuPath-style FeatureCollection, square 0..768 with a hole 256..512 (level-0 px).
    square = [[0, 0], [768, 0], [768, 768], [0, 768], [0, 0]]
    hole = [[256, 256], [512, 256], [512, 512], [256, 512], [256, 256]]
    fc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {"objectType": "annotation"},
                "geometry": {"type": "Polygon", "coordinates": [square, hole]},
            }
        ],
    }
    (masks / "s0.geojson").write_text(json.dumps(fc))
    # s1: a mask image (quarter scale) whose right half is tissue.
    from PIL import Image

    img = np.zeros((SIZE // 4, SIZE // 4), np.uint8)
    img[:, SIZE // 8 :] = 255
    Image.fromarray(img).save(masks / "s1.png")
    res = run_tile(df, tmp_path / "run", TileConfig(), mask=str(masks)).set_index("slide_id")
    assert (res["status"] == "ok").all()
    c0 = {
        tuple(c) for c in open_store(tmp_path / "run" / "tiles" / "s0.zarr")["coords"][:].tolist()
    }
    assert c0 == {
        (0, 0),
        (256, 0),
        (512, 0),
        (0, 256),
        (512, 256),
        (0, 512),
        (256, 512),
        (512, 512),
    }
    c1 = open_store(tmp_path / "run" / "tiles" / "s1.zarr")["coords"][:]
    assert len(c1) == 3 * 6 and (c1[:, 0] >= SIZE // 2).all()
    # A missing mask is that slide's error; a template with {slide_id} works too.
    res = run_tile(
        df, tmp_path / "run2", TileConfig(), mask=str(masks / "{slide_id}.geojson")
    ).set_index("slide_id")
    assert res.loc["s0", "status"] == "ok" and res.loc["s1", "status"] == "error"
    assert "s1.geojson" in res.loc["s1", "message"]


def test_changed_settings_are_detected_and_overwrite_redoes(tmp_path, cohort):
    df = pd.read_csv(cohort).iloc[:1]
    run = tmp_path / "run"
    assert run_tile(df, run, TileConfig()).status.tolist() == ["ok"]
    assert run_tile(df, run, TileConfig()).status.tolist() == ["skipped"]
    res = run_tile(df, run, TileConfig(tile_px=128))
    assert res.status.tolist() == ["error"] and "--overwrite" in res.message[0]
    assert run_tile(df, run, TileConfig(tile_px=128), overwrite=True).status.tolist() == ["ok"]
    assert open_store(run / "tiles" / "s0.zarr").attrs["tile_px"] == 128


def test_a_slide_locked_by_another_worker_is_skipped(tmp_path, cohort):
    from wsimil.locks import slide_lock

    df = pd.read_csv(cohort).iloc[:2]
    tiles = tmp_path / "run" / "tiles"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from wsimil.locks import slide_lock\n"
            f"with slide_lock({str(tiles)!r}, 's1') as ok:\n    print(ok, flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "True"
        res = run_tile(df, tmp_path / "run", TileConfig()).set_index("slide_id")
    finally:
        holder.kill()
        holder.wait()
    assert res.loc["s0", "status"] == "ok"
    assert (
        res.loc["s1", "status"] == "skipped" and res.loc["s1", "message"] == "in progress elsewhere"
    )
    assert not (tiles / "s1.zarr").exists()
    with slide_lock(tiles, "s1") as ok:  # the kernel released the killed holder's lock
        assert ok


def test_resume_after_sigkill_completes_and_equals_an_uninterrupted_run(tmp_path, cohort):
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(
        [*WSIMIL, "tile", str(ref), "--manifest", str(cohort)], check=True, capture_output=True
    )
    tiles = run / "tiles"
    tiles.mkdir(parents=True)
    # Leftovers of an earlier killed writer of s4 (on any host: only a lock holder writes them).
    (tiles / ".s4.zarr.partial").mkdir()
    (tiles / ".s4.zarr.partial" / "zarr.json").write_text("{}")
    (tiles / ".s4.qc.png.partial").write_bytes(b"partial")
    proc = subprocess.Popen(
        [*WSIMIL, "tile", str(run), "--manifest", str(cohort)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(tiles.glob("s*.zarr")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.stem for p in tiles.glob("*.zarr")}
    assert 1 <= len(done_before) < 6, "the kill should land mid-cohort"
    r = subprocess.run(
        [*WSIMIL, "tile", str(run), "--manifest", str(cohort)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert not [p for p in tiles.iterdir() if p.name.endswith((".partial", ".old"))]
    interrupted = [r["slide_id"] for r in _status(run) if r["status"] == "interrupted"]
    assert "s4" in interrupted and len(interrupted) == len(set(interrupted))
    a, b = _coords(ref), _coords(run)
    assert a.keys() == b.keys() == {f"s{i}" for i in range(6)}
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0])
        np.testing.assert_array_equal(a[k][1], b[k][1])
    assert all((tiles / f"s{i}.qc.png").is_file() for i in range(6))


def test_two_workers_on_one_cohort_tile_every_slide_exactly_once(tmp_path, cohort):
    run = tmp_path / "run"
    cmd = [*WSIMIL, "tile", str(run), "--manifest", str(cohort)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    lines = _status(run)
    done = [r["slide_id"] for r in lines if r["status"] == "ok"]
    assert sorted(done) == [f"s{i}" for i in range(6)]  # each exactly once
    assert all(r["status"] in ("ok", "skipped") for r in lines)
    assert len(lines) == 12  # every slide ended once in each worker: done or skipped
    stores = _coords(run)
    assert len(stores) == 6 and all(len(c) > 0 and len(c) == len(f) for c, f in stores.values())
    assert not [p for p in (run / "tiles").iterdir() if p.name.endswith(".partial")]
