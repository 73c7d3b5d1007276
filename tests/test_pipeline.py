"""The Snakemake workflow in pipelines/ on a tiny synthetic cohort.

Run locally end to end: every slide gets tiles, features and a heatmap; a second run has nothing
to do; with model_folder the cohort is scored by that model (one predict job, no training);
deleting one slide's features re-runs that slide's embed and heatmap jobs only. And run as
on Kubernetes, with no shared file system: each job in its own empty folder (a stand-in for a pod,
tests/helpers/pod_submit.sh), inputs and outputs through the fs storage plugin.
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


def test_workflow_runs_cohort_and_reruns_only_what_is_missing(tmp_path):
    run = tmp_path / "run"
    make_cohort(run, n_slides=4, width_px=1024, height_px=1024, seed=3)
    ids = [f"synth_{i:03d}" for i in range(4)]

    log = _snakemake(run, tmp_path)
    counts = {"tile": 4, "embed": 4, "train": 1, "heatmap": 4, "report": 1, "all": 1}
    assert _job_counts(log) == counts
    _check_cohort_outputs(run, ids)

    assert "Nothing to be done" in _snakemake(run, tmp_path, "--dry-run")

    # model_folder: predict with a trained model (here the run's own) instead of training.
    model = run / "models" / "gated_attention"
    log = _snakemake(run, tmp_path, f"model_folder={model}")
    assert _job_counts(log) == {"predict": 1, "all": 1}  # the heatmaps are those of this model
    import pandas as pd

    scored = pd.read_csv(run / "predictions" / "gated_attention" / "predictions.csv")
    drawn = pd.read_csv(run / "heatmaps" / "gated_attention" / "predictions.csv")
    assert sorted(scored.slide_id) == ids
    assert scored.set_index("slide_id").probability.to_dict() == pytest.approx(
        drawn.set_index("slide_id").probability.to_dict()
    )

    # One slide's features deleted: its embed and heatmap jobs only (no tiling, no training).
    shutil.rmtree(run / "features" / "efficientnet_lite0" / "synth_002.zarr")
    log = _snakemake(run, tmp_path, "--dry-run")
    assert _job_counts(log) == {"embed": 1, "heatmap": 1, "report": 1, "all": 1}
    assert "wildcards: slide=synth_002" in log
    assert not re.search(r"wildcards: slide=synth_00[013]", log)
    # ... and with model_folder the cohort is scored again, the heatmap drawn with that model.
    log = _snakemake(run, tmp_path, f"model_folder={model}", "--dry-run", "--printshellcmds")
    assert _job_counts(log) == {"embed": 1, "predict": 1, "heatmap": 1, "report": 1, "all": 1}
    assert re.search(rf'wsimil heatmap "\$run" .*--slides synth_002 .*--model {model} ', log)


@pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_cluster_generic") is None
    or importlib.util.find_spec("snakemake_storage_plugin_fs") is None
    or shutil.which("rsync") is None,
    reason="needs snakemake-executor-plugin-cluster-generic, snakemake-storage-plugin-fs and rsync",
)
def test_workflow_without_shared_file_system(tmp_path):
    cohort, work, pods, storage = (tmp_path / d for d in ("cohort", "work", "pods", "storage"))
    make_cohort(cohort, n_slides=4, width_px=1024, height_px=1024, seed=5)
    ids = [f"synth_{i:03d}" for i in range(4)]
    # The workflow's sources reach the pods as an archive of the git-tracked files.
    shutil.copytree(REPO / "pipelines", work / "pipelines")
    for git in (["init", "-q"], ["add", "pipelines"]):
        subprocess.run(["git", *git], cwd=work, check=True)
    pods.mkdir()
    env = {**os.environ, "WSIMIL_POD_ROOT": str(pods)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # snakemake inside pods
    cmd = [
        sys.executable, "-m", "snakemake", "-s", "pipelines/Snakefile", "--jobs", "3",
        "--executor", "cluster-generic",
        "--cluster-generic-submit-cmd", f"bash {POD_SUBMIT}",
        "--cluster-generic-status-cmd", f"bash {POD_SUBMIT} --status",
        "--seconds-between-status-checks", "1",  # the stand-in pods finish in seconds
        "--shared-fs-usage", "none", "--job-deploy-sources",
        "--default-storage-provider", "fs", "--default-storage-prefix", str(storage),
        "--config", "run_dir=run", f"manifest={cohort / 'manifest.csv'}",
        f"wsimil_config={REPO / 'configs' / 'demo.yaml'}", "wsimil=wsimil",
        "embed_device=cpu", "train_args=--epochs 3 --folds 2",
    ]  # fmt: skip

    def pod_logs() -> str:
        return "".join(f"\n--- {p}\n{p.read_text()[-1500:]}" for p in pods.glob("*/job.log"))

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + pod_logs()
    counts = _job_counts(proc.stdout + proc.stderr)
    assert counts == {"tile": 4, "embed": 4, "train": 1, "heatmap": 4, "report": 1, "all": 1}

    # Every job ran in its own pod folder and succeeded; the outputs are in the storage only.
    exit_codes = [p.read_text().strip() for p in pods.glob("*/exit_code")]
    assert exit_codes == ["0"] * 14, pod_logs()
    _check_cohort_outputs(storage / "run", ids)
    assert not (work / "run").exists()

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Nothing to be done" in log, log[-3000:]
    assert len(list(pods.iterdir())) == 14


def test_workflow_rejects_missing_manifest(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--cores", "1", "--directory", str(tmp_path), "-n", "--config", f"run_dir={tmp_path / 'nope'}"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "manifest not found" in proc.stdout + proc.stderr
