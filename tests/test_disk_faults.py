"""A full, read-only or unwritable run folder: one line, a clean stop, nothing half-written.

Real faults, not mocks: a size-limited tmpfs fills up (ENOSPC), a tmpfs remounted read-only
(EROFS), and a folder without write permission for a process that lacks CAP_DAC_OVERRIDE
(EACCES). Mounting needs root (as in CI and the Docker image); elsewhere these tests skip.
"""

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from wsimil.config import TileConfig
from wsimil.manifest import read_manifest
from wsimil.synth import make_cohort
from wsimil.tile import run_tile

WSIMIL = [sys.executable, "-m", "wsimil.cli"]
TILE_ARGS = ["--target-mpp", "1.0", "--tile-px", "64"]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root"
)


@contextmanager
def tmpfs(path: Path, size: str):
    """A fresh tmpfs of ``size`` mounted at ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    src = tmp_path_factory.mktemp("faults")
    manifest = make_cohort(src, n_slides=4, width_px=1536, height_px=1536, mpp=0.5, seed=3)
    return src, manifest


def _wsimil(*args, pre=()):
    return subprocess.run(
        [*pre, *WSIMIL, *map(str, args)], capture_output=True, text=True, timeout=600
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial" in p.name or ".old" in p.name)


def _status(folder: Path) -> dict:
    path = folder / "status.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {d["slide_id"]: d["status"] for d in map(json.loads, lines)}


@needs_root
def test_a_full_disk_during_embed_stops_cleanly_and_the_run_resumes(cohort, tmp_path):
    src, manifest = cohort
    run = tmp_path / "run"
    ids = set(read_manifest(manifest).slide_id)
    run_tile(read_manifest(manifest), run, TileConfig(target_mpp=1.0, tile_px=64))
    feat = run / "features" / "efficientnet_lite0"
    embed = ["embed", run, "--manifest", manifest, "--encoder", "efficientnet_lite0",
             "--num-workers", "0", "--batch-size", "16"]  # fmt: skip
    with tmpfs(feat, "192k"):
        r = _wsimil(*embed)
        assert r.returncode == 1, r.stderr
        errors = [x for x in r.stderr.splitlines() if x.startswith("error ")]
        assert len(errors) == 1 and "No space left on device" in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        assert "stopped:" in r.stderr and "run the same command again" in r.stderr
        assert _leftovers(feat) == []  # no partial store of the slide that hit the full disk
        done = {p.stem for p in feat.glob("*.zarr")}
        assert 0 < len(done) < 4  # what finished before the disk filled is kept, and logged
        assert {s for s, v in _status(feat).items() if v == "ok"} == done
        # Space freed: the same command finishes the cohort and keeps what was done.
        subprocess.run(["mount", "-o", "remount,size=64m", str(feat)], check=True)
        r = _wsimil(*embed)
        assert r.returncode == 0, r.stderr
        assert {p.stem for p in feat.glob("*.zarr")} == ids
        status = [json.loads(x) for x in (feat / "status.jsonl").read_text().splitlines()]
        assert {d["slide_id"] for d in status if d["status"] == "skipped"} == done


@needs_root
def test_a_read_only_run_folder_gives_one_line_and_exit_1(cohort, tmp_path):
    src, manifest = cohort
    with tmpfs(tmp_path / "run", "8m") as run:
        subprocess.run(["mount", "-o", "remount,ro", str(run)], check=True)
        r = _wsimil("tile", run, "--manifest", manifest, *TILE_ARGS)
        assert r.returncode == 1
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and "Read-only file system" in lines[0], r.stderr
        assert str(run / "tiles") in lines[0] and "writable" in lines[0]


@needs_root
def test_an_unwritable_stage_folder_gives_one_line_per_problem_not_a_traceback(cohort, tmp_path):
    src, manifest = cohort
    run = tmp_path / "run"
    (run / "tiles").mkdir(parents=True)
    os.chmod(run / "tiles", 0o555)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", "--"]  # fmt: skip
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    r = _wsimil("tile", run, "--manifest", manifest, *TILE_ARGS, pre=drop)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Permission denied" in lines[0], r.stderr
    assert list((run / "tiles").iterdir()) == []
