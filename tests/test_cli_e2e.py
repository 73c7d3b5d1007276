"""All four stages through the real CLI on a tiny generated cohort with one unreadable slide."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from wsimil.cli import main
from wsimil.store import open_store
from wsimil.synth import make_cohort

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    manifest = make_cohort(run, n_slides=8, width_px=2048, height_px=2048, mpp=0.5, seed=7)
    df = pd.read_csv(manifest)
    (run / "slides" / "broken.svs").write_text("this is not a slide\n")
    bad = pd.DataFrame([{"slide_id": "broken", "path": "slides/broken.svs", "label": 0}])
    pd.concat([df, bad]).to_csv(manifest, index=False)
    return run, df


def _run(args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def _status(path):
    return {d["slide_id"]: d for d in map(json.loads, path.read_text().splitlines())}


def test_four_stages_end_to_end(cohort):
    run, df = cohort
    good = df.slide_id.tolist()

    r = _run(["tile", run, "--target-mpp", 1.0, "--tile-px", 128])
    assert r.exit_code == 1  # the broken slide fails ...
    # one whole line, however long, naming the file and the reason
    line = [x for x in r.output.splitlines() if x.startswith("error ")]
    assert len(line) == 1 and "broken.svs: cannot open slide (OpenSlide:" in line[0]
    for sid in good:  # ... and every other slide completes
        g = open_store(run / "tiles" / f"{sid}.zarr")
        assert g["coords"].shape[0] > 10 and g.attrs["tile_px_level0"] == 256
        assert (run / "tiles" / f"{sid}.qc.png").exists()
    status = _status(run / "tiles" / "status.jsonl")
    assert status["broken"]["status"] == "error" and all(status[s]["status"] == "ok" for s in good)

    r = _run(
        ["embed", run, "--encoder", "efficientnet_lite0", "--batch-size", 32, "--num-workers", 1]
    )
    assert r.exit_code == 1
    for sid in good:
        g = open_store(run / "features" / "efficientnet_lite0" / f"{sid}.zarr")
        feats = g["features"][...]
        assert feats.dtype == np.float16 and feats.shape[1] == 1280
        np.testing.assert_array_equal(
            g["coords"][...], open_store(run / "tiles" / f"{sid}.zarr")["coords"][...]
        )
        assert g.attrs["encoder"]["name"] == "efficientnet_lite0"
        assert np.isfinite(feats.astype(np.float32)).all()

    r = _run(["train", run, "--encoder", "efficientnet_lite0", "--epochs", 5, "--seed", 1])
    assert r.exit_code == 0, r.output
    model_dir = run / "models" / "gated_attention"
    pred = pd.read_csv(model_dir / "predictions.csv")
    assert sorted(pred.slide_id) == sorted(good)  # the broken slide has no features and is skipped
    assert set(pred.split) == {"train", "val", "test"}
    assert pred.probability.between(0, 1).all()
    metrics = pd.read_csv(model_dir / "metrics.csv")
    assert {"accuracy", "precision", "recall", "f1", "auc"} <= set(metrics.columns)
    assert (model_dir / "model.json").exists() and (model_dir / "model.safetensors").exists()
    # Over the memory budget the slides are read from their stores at each use: same model.
    r = _run(
        [
            "train",
            run,
            "--encoder",
            "efficientnet_lite0",
            "--epochs",
            5,
            "--seed",
            1,
            "--name",
            "streamed",
            "--memory-budget-gb",
            1e-6,
        ]
    )
    assert r.exit_code == 0, r.output
    assert "read from their stores" in r.output
    streamed = pd.read_csv(run / "models" / "streamed" / "predictions.csv")
    np.testing.assert_allclose(streamed.probability, pred.probability, atol=1e-5)

    # Any column name works as the label column, e.g. one with a space.
    her2 = pd.read_csv(run / "manifest.csv").rename(columns={"label": "HER2 status"})
    her2.to_csv(run / "her2.csv", index=False)
    r = _run(
        ["train", run, "--manifest", run / "her2.csv", "--label-column", "HER2 status",
         "--encoder", "efficientnet_lite0", "--epochs", 2, "--name", "her2"]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    labels = pd.read_csv(run / "models" / "her2" / "predictions.csv").set_index("slide_id").label
    assert labels.to_dict() == her2.set_index("slide_id")["HER2 status"].loc[good].to_dict()

    r = _run(["heatmap", run, "--model", "gated_attention", "--thumbnail-px", 256])
    assert r.exit_code == 1  # broken slide again, with its real cause from the tile stage
    hm = run / "heatmaps" / "gated_attention"
    cause = _status(hm / "status.jsonl")["broken"]["message"]
    assert cause.startswith("broken: no features; `wsimil tile` failed for it: ") and (
        "broken.svs: cannot open slide" in cause
    )
    for sid in good:
        assert (hm / "slides" / sid / f"{sid}.png").exists()
        t = pd.read_csv(hm / "slides" / sid / f"{sid}.csv")
        assert t.attention.sum() == pytest.approx(1.0, abs=1e-3)
        assert t.attention_scaled.min() == 0 and t.attention_scaled.max() == pytest.approx(1.0)
    hp = pd.read_csv(hm / "predictions.csv")
    np.testing.assert_allclose(
        hp.set_index("slide_id").probability.sort_index(),
        pred.set_index("slide_id").probability.sort_index(),
        atol=1e-5,
    )

    # Re-running a stage skips complete slides; other settings are refused, not mixed.
    r = _run(["tile", run, "--target-mpp", 1.0, "--tile-px", 128])
    assert "skipped" in r.output
    r = _run(["tile", run, "--target-mpp", 1.0, "--tile-px", 96])
    assert r.exit_code == 1 and "--overwrite" in r.output


def test_help_is_fast_and_lists_the_stages():
    out = subprocess.run(
        [sys.executable, "-m", "wsimil.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("tile", "embed", "train", "heatmap", "demo", "synth"):
        assert cmd in out
    # Heavy libraries are imported inside the commands, not at import time.
    code = "import sys, wsimil.cli; print(any(m in sys.modules for m in ('torch', 'timm', 'openslide', 'zarr')))"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
