"""`wsimil demo` on small slides: CV training leaves a deployable ensemble, which then scores and
draws a second, unlabelled cohort from where it lives."""

import json

import pandas as pd
import pytest

from wsimil.demo import run_demo

pytestmark = pytest.mark.slow


def test_demo_trains_with_cv_then_predicts_and_draws_an_unlabelled_cohort(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out, n_slides=6, n_external=3, size_px=2048, seed=1)
    assert res["failed"] == 0

    model = out / "models" / "gated_attention"
    card = json.loads((model / "card.json").read_text())
    assert card["kind"] == "ensemble" and len(card["members"]) == 3  # 3 slides a class: 3 folds
    pooled = json.loads((model / "metrics_pooled.json").read_text())
    assert pooled["n_slides"] == 6 and res["cv"]["n_slides"] == 6  # each slide tested once

    ext = out / "external"
    manifest = pd.read_csv(ext / "manifest.csv", keep_default_na=False)
    assert manifest.label.eq("").all() and manifest.slide_id.str.startswith("ext_").all()
    pred = pd.read_csv(ext / "predictions" / "gated_attention" / "predictions.csv")
    assert sorted(pred.slide_id) == sorted(manifest.slide_id)
    assert pred.probability.between(0, 1).all() and pred.label.isna().all()
    assert not (ext / "predictions" / "gated_attention" / "metrics.json").exists()  # no labels
    index = (ext / "heatmaps" / "gated_attention" / "index.html").read_text()
    assert all(f'href="slides/{sid}/{sid}.html"' in index for sid in manifest.slide_id)

    assert res["external"]["n_slides"] == 3
    truth = pd.read_csv(ext / "truth" / "labels.csv")  # the withheld labels, beside the masks
    assert sorted(truth.slide_id) == sorted(manifest.slide_id) and set(truth.label) == {0, 1}
    assert res["localisation"]["n_slides"] <= truth.label.sum()  # slides this small: few tiles
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["external"]["predictions"] == res["external"]["predictions"]

    # the training cohort is drawn too, so `wsimil review demo_run` shows it
    from wsimil.viewer.serve import open_review

    app, name = open_review(out)
    assert name == "gated_attention"
    page = app.test_client().get("/").get_data(as_text=True)
    cohort = pd.read_csv(out / "manifest.csv")
    assert all(f'href="/slide/{sid}"' in page for sid in cohort.slide_id)
    assert page.count("<td>train</td>") == len(cohort)  # every slide trained a fold model
