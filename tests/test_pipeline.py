"""The Snakemake workflow in pipelines/ on a tiny synthetic cohort, run once for the module.

As on Kubernetes, with no shared file system: each job in its own empty folder (a stand-in for a
pod, tests/helpers/pod_submit.sh; the embed jobs grouped as the profiles do), inputs and outputs
through the fs storage plugin: every slide gets tiles, features and a heatmap, the cohort a
model and a review page, and a second run has nothing to do. Then locally, from those outputs:
nothing to do; deleting one slide's tiles re-runs that slide's tile, embed and heatmap jobs
only (no training); with model_folder the cohort is scored by that model (one predict job, no
training); deleting one slide's features re-runs that slide's embed and heatmap jobs only.
Without the pod plugins the module's run is local.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsimil.synth import make_cohort

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("snakemake") is None,
        reason="snakemake not installed (pip install -e '.[pipelines]')",
    ),
]

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "pipelines" / "Snakefile"
POD_SUBMIT = REPO / "tests" / "helpers" / "pod_submit.sh"


def _snakemake(run_dir: Path, work: Path, *extra: str) -> str:
    wsimil = Path(sys.executable).with_name("wsimil")
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--cores", "2", "--directory", str(work),
        "--config", f"run_dir={run_dir}", f"wsimil_config={REPO / 'configs' / 'demo.yaml'}", f"wsimil={wsimil}",
        "embed_device=cpu", "train_args=--epochs 3 --folds 2", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _check_cohort_outputs(run: Path, ids: list[str]) -> None:
    """Every per-slide file each stage makes, and cohort outputs covering every slide."""
    import pandas as pd

    hm = run / "heatmaps" / "gated_attention"
    for sid in ids:
        assert (run / "tiles" / f"{sid}.zarr" / "zarr.json").is_file()
        assert (run / "tiles" / f"{sid}.qc.png").stat().st_size > 0
        assert (run / "features" / "efficientnet_lite0" / f"{sid}.zarr" / "zarr.json").is_file()
        d = hm / "slides" / sid
        for name in (f"{sid}.png", f"{sid}.thumb.jpg", f"{sid}.csv", f"{sid}.geojson",
                     f"{sid}.heatmap.tiff", f"{sid}.html", "slide.json"):  # fmt: skip
            assert (d / name).stat().st_size > 0, d / name
        assert list((d / "top").glob("*.jpg"))
    assert (
        json.loads((run / "models" / "gated_attention" / "card.json").read_text())["kind"]
        == "ensemble"
    )
    pred = pd.read_csv(hm / "predictions.csv")
    assert sorted(pred.slide_id) == sorted(ids) and pred.probability.between(0, 1).all()
    index = (hm / "index.html").read_text()
    assert all(f'href="slides/{sid}/{sid}.html"' in index for sid in ids)
    assert json.loads((hm / "summary.json").read_text())["status"] == {"ok": len(ids)}


def _job_counts(log: str) -> dict[str, int]:
    """Rule -> count from the first 'Job stats' table of a Snakemake log."""
    m = re.search(r"Job stats:\njob\s+count\n[-\s]+\n(.*?)\n\n", log, re.S)
    if m is None:
        return {}
    rows = (line.split() for line in m.group(1).splitlines())
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[0] != "total"}


PODS_AVAILABLE = not (
    importlib.util.find_spec("snakemake_executor_plugin_cluster_generic") is None
    or importlib.util.find_spec("snakemake_storage_plugin_fs") is None
    or shutil.which("rsync") is None
)


def _pods_cmd(tmp: Path, cohort: Path) -> tuple[list[str], dict]:
    """The workflow as on Kubernetes: each job in a stand-in pod, outputs in the fs storage."""
    work, pods, storage = tmp / "work", tmp / "pods", tmp / "storage"
    # The workflow's sources reach the pods as an archive of the git-tracked files.
    shutil.copytree(REPO / "pipelines", work / "pipelines")
    for git in (["init", "-q"], ["add", "pipelines"]):
        subprocess.run(["git", *git], cwd=work, check=True)
    pods.mkdir()
    env = {**os.environ, "WSIMIL_POD_ROOT": str(pods)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # snakemake inside pods
    cmd = [
        sys.executable, "-m", "snakemake", "-s", "pipelines/Snakefile", "--jobs", "3",
        "--executor", "cluster-generic", "--group-components", "embed=4",  # as the profiles do
        "--cluster-generic-submit-cmd", f"bash {POD_SUBMIT}",
        "--cluster-generic-status-cmd", f"bash {POD_SUBMIT} --status",
        "--seconds-between-status-checks", "1",  # the stand-in pods finish in seconds
        "--shared-fs-usage", "none", "--job-deploy-sources",
        "--default-storage-provider", "fs", "--default-storage-prefix", str(storage),
        "--config", "run_dir=run", f"manifest={cohort / 'manifest.csv'}",
        f"wsimil_config={REPO / 'configs' / 'demo.yaml'}", "wsimil=wsimil",
        "embed_device=cpu", "train_args=--epochs 3 --folds 2",
    ]  # fmt: skip
    return cmd, env


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    """The 4-slide cohort through the whole workflow, once for this module: in stand-in pods
    with no shared file system when the plugins are installed, else locally. The local test
    starts from its outputs instead of computing them again."""
    tmp = tmp_path_factory.mktemp("workflow")
    cohort = tmp / "cohort"
    make_cohort(cohort, n_slides=4, width_px=1024, height_px=1024, seed=5)
    if not PODS_AVAILABLE:
        return {"run": cohort, "cohort": cohort, "log": _snakemake(cohort, tmp)}
    cmd, env = _pods_cmd(tmp, cohort)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp / "work", env=env)
    pods = tmp / "pods"
    logs = "".join(f"\n--- {p}\n{p.read_text()[-1500:]}" for p in pods.glob("*/job.log"))
    return {"run": tmp / "storage" / "run", "cohort": cohort, "log": proc.stdout + proc.stderr,
            "rc": proc.returncode, "pod_logs": logs, "cmd": cmd, "env": env, "tmp": tmp}  # fmt: skip


@pytest.mark.skipif(
    not PODS_AVAILABLE,
    reason="needs snakemake-executor-plugin-cluster-generic, snakemake-storage-plugin-fs and rsync",
)
def test_workflow_without_shared_file_system(workflow_run):
    w = workflow_run
    ids = [f"synth_{i:03d}" for i in range(4)]
    pods, work = w["tmp"] / "pods", w["tmp"] / "work"
    assert w["rc"] == 0, w["log"][-3000:] + w["pod_logs"]
    counts = _job_counts(w["log"])
    assert counts == {"tile": 4, "embed": 4, "train": 1, "heatmap": 4, "report": 1, "all": 1}

    # Every job ran in its own pod folder (the 4 embed jobs in one, as one group) and succeeded;
    # the outputs are in the storage only.
    exit_codes = [p.read_text().strip() for p in pods.glob("*/exit_code")]
    assert exit_codes == ["0"] * 11, w["pod_logs"]
    _check_cohort_outputs(w["run"], ids)
    assert not (work / "run").exists()

    proc = subprocess.run(w["cmd"], capture_output=True, text=True, cwd=work, env=w["env"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Nothing to be done" in log, log[-3000:]
    assert len(list(pods.iterdir())) == 11
    # Re-embedding one slide re-plans that slide, not the training: the model in the storage
    # is seen as complete.
    store = next((w["run"] / "features").glob("*/synth_001.zarr"))
    aside = w["tmp"] / "aside.zarr"
    store.rename(aside)
    try:
        proc = subprocess.run([*w["cmd"], "--dry-run"], capture_output=True, text=True,
                              cwd=work, env=w["env"])  # fmt: skip
    finally:
        aside.rename(store)  # the module's run stays whole for the local test
    planned = _job_counts(proc.stdout + proc.stderr)
    assert proc.returncode == 0 and planned.get("embed") == 1 and "train" not in planned, planned


def _copy_of_run(w: dict, tmp_path: Path) -> Path:
    """The module's run outputs copied (with their times) into ``tmp_path/run``, without the
    cohort's own slides when the module's run was local."""
    run, top = tmp_path / "run", str(w["run"])
    shutil.copytree(w["run"], run, ignore=lambda d, names: {"slides", "truth"} if d == top else ())
    return run


def test_workflow_runs_locally_reruns_only_what_is_missing_and_predicts(workflow_run, tmp_path):
    """Locally, from the complete outputs of the module's run (copied with their times)."""
    import pandas as pd

    w = workflow_run
    assert w.get("rc", 0) == 0, w["log"][-3000:] + w.get("pod_logs", "")
    ids = [f"synth_{i:03d}" for i in range(4)]
    run = _copy_of_run(w, tmp_path)
    cohort = [f"manifest={w['cohort'] / 'manifest.csv'}"]  # the slides are read in place
    _check_cohort_outputs(run, ids)
    assert "Nothing to be done" in _snakemake(run, tmp_path, *cohort, "--dry-run")

    # One slide's tiles deleted: its tile, embed and heatmap jobs only (no training), then the
    # report; run for real, the cohort is whole again.
    shutil.rmtree(run / "tiles" / "synth_002.zarr")
    log = _snakemake(run, tmp_path, *cohort)
    assert _job_counts(log) == {"tile": 1, "embed": 1, "heatmap": 1, "report": 1, "all": 1}
    assert "wildcards: slide=synth_002" in log
    assert not re.search(r"wildcards: slide=synth_00[013]", log)
    _check_cohort_outputs(run, ids)

    # model_folder: predict with a trained model (here the run's own) instead of training.
    model = run / "models" / "gated_attention"
    log = _snakemake(run, tmp_path, *cohort, f"model_folder={model}")
    assert _job_counts(log) == {"predict": 1, "all": 1}  # the heatmaps are those of this model
    scored = pd.read_csv(run / "predictions" / "gated_attention" / "predictions.csv")
    drawn = pd.read_csv(run / "heatmaps" / "gated_attention" / "predictions.csv")
    assert sorted(scored.slide_id) == ids
    assert scored.set_index("slide_id").probability.to_dict() == pytest.approx(
        drawn.set_index("slide_id").probability.to_dict()
    )

    # One slide's features deleted: its embed and heatmap jobs only (no tiling, no training) ...
    shutil.rmtree(run / "features" / "efficientnet_lite0" / "synth_001.zarr")
    log = _snakemake(run, tmp_path, *cohort, "--dry-run")
    assert _job_counts(log) == {"embed": 1, "heatmap": 1, "report": 1, "all": 1}
    # ... and with model_folder the cohort is scored again, the heatmap drawn with that model.
    log = _snakemake(run, tmp_path, *cohort, f"model_folder={model}", "--dry-run", "-p")
    assert _job_counts(log) == {"embed": 1, "predict": 1, "heatmap": 1, "report": 1, "all": 1}
    assert re.search(rf'wsimil heatmap "\$run" .*--slides synth_001 .*--model {model} ', log)


def test_workflow_rejects_missing_manifest(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--cores", "1", "--directory", str(tmp_path), "-n", "--config", f"run_dir={tmp_path / 'nope'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "manifest not found" in proc.stdout + proc.stderr


def test_workflow_trains_end_to_end_on_tile_caches(workflow_run, tmp_path):
    """instance_encoder=cnn: per-slide cache jobs instead of embed, train on the caches, heatmaps."""
    import pandas as pd

    w = workflow_run
    assert w.get("rc", 0) == 0, w["log"][-3000:] + w.get("pod_logs", "")
    ids = [f"synth_{i:03d}" for i in range(4)]
    run = _copy_of_run(w, tmp_path)
    e2e = [f"manifest={w['cohort'] / 'manifest.csv'}", "instance_encoder=cnn", "cache_px=32",
           "model_name=e2e"]  # fmt: skip
    log = _snakemake(run, tmp_path, *e2e, "-p")
    assert _job_counts(log) == {"cache": 4, "train": 1, "heatmap": 4, "report": 1, "all": 1}
    assert re.search(r'wsimil train "\$run" .*--instance-encoder cnn --cache-px 32', log)
    for sid in ids:
        assert (run / "tile_cache" / "32px" / f"{sid}.zarr" / "zarr.json").is_file()
    card = json.loads((run / "models" / "e2e" / "card.json").read_text())
    assert card["features"]["encoder"] == {"name": "pixels", "px": 32}
    pred = pd.read_csv(run / "heatmaps" / "e2e" / "predictions.csv")
    assert sorted(pred.slide_id) == ids and pred.probability.between(0, 1).all()
    assert "Nothing to be done" in _snakemake(run, tmp_path, *e2e, "--dry-run")


def test_workflow_refuses_a_bad_end_to_end_setting(tmp_path):
    for bad, says in (("instance_encoder=lenet", "instance_encoder 'lenet'"),
                      ("instance_encoder=cnn", "cache_px")):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--cores", "1", "-n",
             "--directory", str(tmp_path), "--config", f"run_dir={tmp_path}", bad],
            capture_output=True, text=True, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode != 0 and says in proc.stdout + proc.stderr, bad
