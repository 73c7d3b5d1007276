"""``run_heatmap`` on a small real cohort: every output per slide, and bad input per slide.

Slides, tiling and training are real; the features are written by the test following the
embed stage's store contract (a lesion signal in a few dimensions), so no CNN has to run.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsimil.config import HeatmapConfig, TileConfig, TrainConfig
from wsimil.demo import lesion_tile_labels, localisation
from wsimil.heatmap import run_heatmap
from wsimil.manifest import read_manifest
from wsimil.store import open_store, write_array
from wsimil.synth import load_lesion_mask, make_cohort
from wsimil.tile import run_tile
from wsimil.train import run_train

ENC = "toyenc"
DIM = 16


def _write_features(run, sid, *, labels, coords, tile_attrs, rng, encoder=ENC):
    import zarr

    feats = rng.normal(0, 1, (len(coords), DIM)).astype(np.float32)
    feats[:, :4] += 3.0 * labels[:, None]
    path = run / "features" / ENC / f"{sid}.zarr"
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    write_array(g, "features", feats.astype(np.float16))
    write_array(g, "coords", coords.astype(np.int32))
    g.attrs.update({"encoder": {"name": encoder, "feature_dim": DIM}, "tiles": tile_attrs})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    run = tmp_path_factory.mktemp("hmrun")
    manifest_path = make_cohort(run, n_slides=10, width_px=1536, height_px=1536, mpp=0.5, seed=3)
    manifest = read_manifest(manifest_path, require_label=True)
    # The grid tiles only (no gap tiles): the features below are random draws per tile, and the
    # models trained on them in these tests were sized for this layout.
    tile_cfg = TileConfig(target_mpp=1.0, tile_px=32, tissue_threshold=0.5, qc_px=128,
                          gap_tiles=False)  # fmt: skip
    run_tile(manifest, run, tile_cfg)
    rng = np.random.default_rng(0)
    lesions = {}
    for rec in manifest.itertuples(index=False):
        tg = open_store(run / "tiles" / f"{rec.slide_id}.zarr")
        ta = dict(tg.attrs)
        coords = np.asarray(tg["coords"][...])
        mask, ds = load_lesion_mask(rec.lesion_mask, slide_width_px=ta["width_px"])
        y = lesion_tile_labels(
            coords, tile_px_level0=ta["tile_px_level0"], mask=mask, mask_downsample=ds
        )
        lesions[rec.slide_id] = y
        _write_features(run, rec.slide_id, labels=y, coords=coords, tile_attrs=ta, rng=rng)
    run_train(
        manifest,
        run,
        TrainConfig(
            epochs=25, patience=25, lr=1e-3, hidden_dim=32, attention_dim=16, dropout=0.0, seed=0
        ),
        encoder=ENC,
    )
    run_train(
        manifest,
        run,
        TrainConfig(
            name="inst", model="instance_max", epochs=5, hidden_dim=16, dropout=0.0, seed=0
        ),
        encoder=ENC,
    )
    return run, manifest, lesions


def test_every_output_for_every_slide_and_attention_finds_the_lesions(cohort):
    run, manifest, lesions = cohort
    cfg = HeatmapConfig(thumbnail_px=256, top_k=3, crop_px=32, smooth_tiles=0.5)
    res = run_heatmap(manifest, run, cfg, model_name="gated_attention")
    assert (res.status == "ok").all(), res.message.tolist()
    hm = run / "heatmaps" / "gated_attention"
    for sid in manifest.slide_id:
        d = hm / "slides" / sid
        t = pd.read_csv(d / f"{sid}.csv")
        assert {"x", "y", "attention", "attention_scaled", "rank", "instance_score"} <= set(
            t.columns
        )
        assert len(t) == len(lesions[sid])
        assert t.attention.sum() == pytest.approx(1.0, abs=1e-3)
        for suffix in (".png", ".thumb.jpg", ".geojson", ".heatmap.tiff", ".html"):
            assert (d / f"{sid}{suffix}").stat().st_size > 0
        assert len(list((d / "top").glob("*.jpg"))) == 3
        assert len(json.loads((d / f"{sid}.geojson").read_text())["features"]) == len(t)
        assert json.loads((d / "slide.json").read_text())["status"] == "ok"
    index = (hm / "index.html").read_text()
    assert all(f'href="slides/{sid}/{sid}.html"' in index for sid in manifest.slide_id)
    pred = pd.read_csv(hm / "predictions.csv")
    assert sorted(pred.slide_id) == sorted(manifest.slide_id)
    # Every slide is marked with what the model saw of it; metrics count held-out slides only.
    split = json.loads((run / "models" / "gated_attention" / "model.json").read_text())["split"]
    assert pred.set_index("slide_id").split.to_dict() == {s: split[s] for s in pred.slide_id}
    summary = json.loads((hm / "summary.json").read_text())
    held_out = [s for s in pred.slide_id if split[s] == "test"]
    assert summary["n_labelled"] == len(held_out) and sum(summary["splits"].values()) == len(pred)
    seen = len(pred) - len(held_out)
    assert f"/{len(held_out)} held-out slides correct ({seen} slides the model was trained" in index
    pos = manifest[manifest.label == "1"].slide_id.tolist()
    loc = localisation(run, manifest, "gated_attention", pos)
    assert loc["n_slides"] >= 3 and loc["auc_mean"] > 0.8, loc


def test_bad_input_fails_per_slide_with_a_clear_message_and_the_rest_goes_on(cohort, tmp_path):
    src, manifest, _ = cohort
    run = tmp_path / "run"  # a copy, so the other tests keep an intact run
    shutil.copytree(src / "features", run / "features")
    shutil.copytree(src / "models", run / "models")
    ids = manifest.slide_id.tolist()
    missing, other_enc, moved = ids[0], ids[1], ids[2]
    feat = run / "features" / ENC
    shutil.rmtree(feat / f"{missing}.zarr")
    g = open_store(feat / f"{other_enc}.zarr")
    import zarr

    zarr.open_group(str(feat / f"{other_enc}.zarr"), mode="r+").attrs["encoder"] = {
        **dict(g.attrs)["encoder"],
        "name": "resnet50",
    }
    bad = manifest.copy()
    bad.loc[bad.slide_id == moved, "path"] = str(tmp_path / "gone" / "slide.tiff")

    res = run_heatmap(
        bad,
        run,
        HeatmapConfig(thumbnail_px=128, top_k=1, crop_px=32, pyramid_tiff=False),
        model_name="gated_attention",
    ).set_index("slide_id")
    assert (
        res.loc[missing, "status"] == "error"
        and "no features" in res.loc[missing, "message"]
        and "wsimil embed" in res.loc[missing, "message"]
    )
    assert (
        res.loc[other_enc, "status"] == "error"
        and "resnet50" in res.loc[other_enc, "message"]
        and ENC in res.loc[other_enc, "message"]
    )
    assert (
        res.loc[moved, "status"] == "error"
        and "file not found" in res.loc[moved, "message"]
        and "gone" in res.loc[moved, "message"]
    )
    for sid in (missing, other_enc, moved):
        assert "\n" not in res.loc[sid, "message"]
    assert (res.drop(index=[missing, other_enc, moved]).status == "ok").all()
    hm = run / "heatmaps" / "gated_attention"
    status = [json.loads(line) for line in (hm / "status.jsonl").read_text().splitlines()]
    assert {d["slide_id"] for d in status if d["status"] == "error"} >= {missing, other_enc, moved}
    index = (hm / "index.html").read_text()
    assert "no features" in index and "resnet50" in index  # failures are shown on the page too
    pred = pd.read_csv(hm / "predictions.csv")
    assert set(pred.slide_id) == set(ids) - {missing, other_enc, moved}

    with pytest.raises(FileNotFoundError, match="models/nope: no trained model there"):
        run_heatmap(manifest, run, HeatmapConfig(), model_name="nope")


def test_instance_models_export_instance_scores(cohort):
    run, manifest, _ = cohort
    sub = manifest.head(2)
    res = run_heatmap(
        sub,
        run,
        HeatmapConfig(thumbnail_px=128, top_k=0, pyramid_tiff=False, review_page=False),
        model_name="inst",
    )
    assert (res.status == "ok").all(), res.message.tolist()
    hm = run / "heatmaps" / "inst"
    sid = sub.slide_id.iloc[0]
    t = pd.read_csv(hm / "slides" / sid / f"{sid}.csv")
    assert t.instance_score.between(0, 1).all() and t.instance_score.notna().all()
    feat = json.loads((hm / "slides" / sid / f"{sid}.geojson").read_text())["features"][0]
    assert feat["properties"]["measurements"]["instance_score"] == pytest.approx(
        t.instance_score[0], abs=1e-5
    )
    assert not (hm / "index.html").exists() and not (hm / "slides" / sid / "top").exists()


@pytest.mark.parametrize("pooling", ["embedding_mean", "embedding_max"])
def test_embedding_poolings_score_and_map_each_tile_contribution(cohort, pooling):
    run, manifest, lesions = cohort
    cfg = TrainConfig(name=pooling, model=pooling, epochs=15, hidden_dim=16, dropout=0.0, seed=0)
    run_train(manifest, run, cfg, encoder=ENC)
    positive = manifest[manifest.label == "1"].head(2)
    res = run_heatmap(
        positive, run, HeatmapConfig(thumbnail_px=96, top_k=0, pyramid_tiff=False,
        review_page=False), model_name=pooling,
    )  # fmt: skip
    assert (res.status == "ok").all(), res.message.tolist()
    assert res.probability.between(0, 1).all()
    for sid in positive.slide_id:
        t = pd.read_csv(run / "heatmaps" / pooling / "slides" / sid / f"{sid}.csv")
        assert t.attention.between(0, 1).all() and t.instance_score.isna().all()
        if pooling == "embedding_max":  # shares of the pooled dimensions
            assert t.attention.sum() == pytest.approx(1.0, abs=1e-5)
        on = lesions[sid].astype(bool)
        assert t.attention[on].mean() > t.attention[~on].mean()  # the map points at the lesion


def test_a_slide_with_no_tiles_gets_status_empty_and_a_plain_thumbnail(cohort, tmp_path):
    src, manifest, _ = cohort
    run = tmp_path / "run"
    shutil.copytree(src / "models", run / "models")
    sid = manifest.slide_id[0]
    import zarr

    ta = dict(open_store(src / "tiles" / f"{sid}.zarr").attrs)
    g = zarr.open_group(str(run / "features" / ENC / f"{sid}.zarr"), mode="w", zarr_format=3)
    write_array(g, "features", np.zeros((0, DIM), np.float16))
    write_array(g, "coords", np.zeros((0, 2), np.int32))
    g.attrs.update({"encoder": {"name": ENC, "feature_dim": DIM}, "tiles": ta})
    res = run_heatmap(
        manifest.iloc[:1],
        run,
        HeatmapConfig(thumbnail_px=128, review_page=False),
        model_name="gated_attention",
    )
    assert res.status.tolist() == ["empty"] and "0 tiles" in res.message[0]
    from PIL import Image

    with Image.open(run / "heatmaps" / "gated_attention" / "slides" / sid / f"{sid}.png") as im:
        assert max(im.size) >= 128


def _cli(*args):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "wsimil.cli", *map(str, args)], stderr=subprocess.PIPE, text=True
    )


def _copy_run(src, dst):
    for d in ("tiles", "features", "models"):
        shutil.copytree(src / d, dst / d)
    return dst


def test_two_concurrent_heatmaps_do_each_slide_once_and_the_cohort_outputs_are_whole(
    cohort, tmp_path
):
    src, manifest, _ = cohort
    run = _copy_run(src, tmp_path / "run")
    m = tmp_path / "manifest.csv"
    manifest.to_csv(m, index=False)
    args = ("heatmap", run, "--manifest", m, "--thumbnail-px", 128, "--top-k", 1, "--no-tiff")
    procs = [_cli(*args) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    hm = run / "heatmaps" / "gated_attention"
    lines = [json.loads(x) for x in (hm / "status.jsonl").read_text().splitlines()]
    ok = sorted(d["slide_id"] for d in lines if d["status"] == "ok")
    assert ok == sorted(manifest.slide_id)  # each slide exactly once
    assert len(lines) == 2 * len(manifest) and {d["status"] for d in lines} == {"ok", "skipped"}
    # The process that finished last wrote the report after every slide was done.
    pred = pd.read_csv(hm / "predictions.csv")
    assert sorted(pred.slide_id) == sorted(manifest.slide_id)
    assert json.loads((hm / "summary.json").read_text())["status"] == {"ok": len(manifest)}

    # A re-run skips every slide and says so; the cohort outputs stay whole.
    p = _cli(*args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    again = [json.loads(x) for x in (hm / "status.jsonl").read_text().splitlines()][len(lines) :]
    assert [d["status"] for d in again] == ["skipped"] * len(manifest)
    assert sorted(pd.read_csv(hm / "predictions.csv").slide_id) == sorted(manifest.slide_id)


def test_per_slide_jobs_write_only_their_slide_and_report_assembles_the_cohort(cohort, tmp_path):
    src, manifest, _ = cohort
    run = _copy_run(src, tmp_path / "run")
    m = tmp_path / "manifest.csv"
    manifest.to_csv(m, index=False)
    ids = manifest.slide_id.tolist()
    hm = run / "heatmaps" / "gated_attention"
    for sid in ids[:3]:
        p = _cli("heatmap", run, "--manifest", m, "--slides", sid, "--thumbnail-px", 96,
                 "--top-k", 0, "--no-tiff", "--no-geojson")  # fmt: skip
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert not (hm / "predictions.csv").exists() and not (hm / "index.html").exists()
    assert sorted(d.name for d in (hm / "slides").iterdir()) == sorted(ids[:3])
    p = _cli("heatmap", run, "--manifest", m, "--slides", "nope")
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "nope not in the manifest" in err

    p = _cli("report", run, "--manifest", m, "--model", "gated_attention")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert sorted(pd.read_csv(hm / "predictions.csv").slide_id) == sorted(ids[:3])
    summary = json.loads((hm / "summary.json").read_text())
    assert summary["status"] == {"ok": 3, "missing": len(ids) - 3} and summary["n_scored"] == 3
    index = (hm / "index.html").read_text()
    assert all(f'href="slides/{sid}/{sid}.html"' in index for sid in ids[:3])
    assert all(f'id="row-{sid}"' in index for sid in ids)  # not-yet-run slides listed too
    assert "no heatmap yet" in index


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_cv_leaves_an_ensemble_that_scores_another_unlabelled_cohort_from_where_it_lives(
    cohort, tmp_path
):
    from wsimil.checkpoint import load_checkpoint
    from wsimil.deploy import load_model
    from wsimil.store import open_store

    run, manifest, lesions = cohort
    cfg = TrainConfig(name="cv3", protocol="cv", n_folds=3, epochs=10, hidden_dim=16,
                      attention_dim=8, dropout=0.0, seed=0)  # fmt: skip
    run_train(manifest, run, cfg, encoder=ENC)
    model_dir = run / "models" / "cv3"
    card = json.loads((model_dir / "card.json").read_text())
    assert card["kind"] == "ensemble" and len(card["members"]) == 3
    assert card["features"]["encoder"]["name"] == ENC and card["features"]["tiles"]["tile_px"] == 32
    assert card["training"]["n_slides"] == len(manifest) and card["threshold"] == 0.5
    pooled = json.loads((model_dir / "metrics_pooled.json").read_text())
    assert pooled["n_slides"] == len(manifest)  # every slide once, from the fold that tested it
    auc = pooled["metrics"]["auc"]
    assert (
        auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
        and card["metrics"]["pooled_test"] == pooled
    )

    # Another cohort, another folder, no labels: the model is used where it lives.
    other = tmp_path / "other"
    for d in ("tiles", "features"):
        shutil.copytree(run / d, other / d)
    unlabelled = manifest.drop(columns=["label"]).head(4)
    before = _tree(model_dir)
    res = run_heatmap(unlabelled, other, HeatmapConfig(thumbnail_px=96, top_k=0,
                      pyramid_tiff=False), model_name=str(model_dir))  # fmt: skip
    assert (res.status == "ok").all(), res.message.tolist()
    assert _tree(model_dir) == before  # nothing written into the model folder
    out = other / "heatmaps" / "cv3"
    assert (out / "index.html").exists() and len(pd.read_csv(out / "predictions.csv")) == 4
    # The ensemble's probability is the mean of its members'.
    sid = unlabelled.slide_id.iloc[0]
    feats = np.asarray(open_store(other / "features" / ENC / f"{sid}.zarr")["features"][...],
                       dtype=np.float32)  # fmt: skip
    members = [load_checkpoint(model_dir / m) for m in card["members"]]
    import torch

    with torch.inference_mode():
        probs = [float(torch.sigmoid(m(s(feats).unsqueeze(0)).logits)[0]) for m, s, _ in members]
    assert res.set_index("slide_id").probability[sid] == pytest.approx(np.mean(probs), abs=1e-6)
    assert load_model(model_dir).score(feats)[0][1] == pytest.approx(np.mean(probs), abs=1e-6)


def test_features_of_another_tile_size_or_encoder_weights_are_refused_per_slide(cohort, tmp_path):
    import zarr

    run, manifest, _ = cohort
    other = tmp_path / "other"
    for d in ("tiles", "features"):
        shutil.copytree(run / d, other / d)
    ids = manifest.slide_id.tolist()[:3]
    g = zarr.open_group(str(other / "features" / ENC / f"{ids[0]}.zarr"), mode="r+")
    g.attrs["tiles"] = {**g.attrs["tiles"], "tile_px": 64}
    g = zarr.open_group(str(other / "features" / ENC / f"{ids[1]}.zarr"), mode="r+")
    g.attrs["encoder"] = {**g.attrs["encoder"], "weights_id": "other-weights"}
    res = run_heatmap(manifest.head(3), other, HeatmapConfig(thumbnail_px=96, top_k=0,
                      pyramid_tiff=False, review_page=False),
                      model_name=str(run / "models" / "gated_attention")).set_index("slide_id")  # fmt: skip
    assert res.status[ids[2]] == "ok"
    assert res.status[ids[0]] == "error" and "tiles tile_px=64" in res.message[ids[0]]
    assert "the model was trained on 32" in res.message[ids[0]]
    assert (
        res.status[ids[1]] == "error"
        and "encoder weights_id='other-weights'" in res.message[ids[1]]
    )


def test_predict_scores_an_external_cohort_with_metrics_intervals_and_plots(cohort, tmp_path):
    run, manifest, _ = cohort
    other = tmp_path / "external"
    for d in ("tiles", "features"):
        shutil.copytree(run / d, other / d)
    m = tmp_path / "external.csv"
    manifest.to_csv(m, index=False)
    model_dir = run / "models" / "gated_attention"
    before = _tree(model_dir)
    p = _cli("predict", other, "--manifest", m, "--model", model_dir, "--bootstrap", 200)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert _tree(model_dir) == before  # nothing written into the model folder
    out = other / "predictions" / "gated_attention"
    pred = pd.read_csv(out / "predictions.csv")
    assert sorted(pred.slide_id) == sorted(manifest.slide_id) and set(pred.split) == {"external"}
    metrics = json.loads((out / "metrics.json").read_text())
    auc = metrics["metrics"]["auc"]
    assert auc["ci95"][0] <= auc["value"] <= auc["ci95"][1]
    assert metrics["n_slides"] == len(manifest) and 0 <= metrics["ece"] <= 1
    assert (out / "roc.png").stat().st_size > 1000 and (out / "calibration.png").exists()
    sid = manifest.slide_id.iloc[0]
    tiles = pd.read_csv(out / "slides" / sid / "tiles.csv")
    assert tiles.attention.sum() == pytest.approx(1.0, abs=1e-3)
    # The model's own training cohort is marked, and its train/val slides are never counted.
    from wsimil.predict import run_predict

    res = run_predict(manifest, run, "gated_attention", n_boot=50)
    assert (res.status == "ok").all()
    own = pd.read_csv(run / "predictions" / "gated_attention" / "predictions.csv")
    split = json.loads((model_dir / "model.json").read_text())["split"]
    assert own.set_index("slide_id").split.to_dict() == {s: split[s] for s in own.slide_id}
    own_metrics = run / "predictions" / "gated_attention" / "metrics.json"
    n_test = sum(v == "test" for v in split.values())
    assert not own_metrics.exists() or json.loads(own_metrics.read_text())["n_slides"] == n_test
    # Without labels: scores, no metrics.
    other2 = tmp_path / "external2"
    for d in ("tiles", "features"):
        shutil.copytree(run / d, other2 / d)
    run_predict(manifest.drop(columns=["label"]), other2, str(model_dir))
    out2 = other2 / "predictions" / "gated_attention"
    assert len(pd.read_csv(out2 / "predictions.csv")) == len(manifest)
    assert not (out2 / "metrics.json").exists()


def test_a_three_class_model_draws_the_predicted_class_map_and_shows_every_class(cohort, tmp_path):
    """String class labels: per-class attention branches, one map per class in the tile table,
    every class probability on the review page and in predict's table."""
    run, manifest, lesions = cohort
    tri = manifest.copy()
    negatives = [s for s in tri.slide_id if lesions[s].sum() == 0]
    tri["label"] = [
        "tumour" if lesions[s].sum() else ("normal" if negatives.index(s) % 2 else "stroma")
        for s in tri.slide_id
    ]
    cfg = TrainConfig(name="tri", per_class_attention=True, epochs=3, hidden_dim=16,
                      attention_dim=8, dropout=0.0, val_fraction=0.0, test_fraction=0.3)  # fmt: skip
    res = run_train(tri, run, cfg, encoder=ENC)
    assert res["classes"] == ["normal", "stroma", "tumour"] and "balanced_accuracy" in res
    card = json.loads((run / "models" / "tri" / "card.json").read_text())
    assert card["classes"] == ["normal", "stroma", "tumour"] and card["threshold"] is None
    shown = tri.iloc[:4]
    out = run_heatmap(shown, run, HeatmapConfig(thumbnail_px=128, top_k=1, crop_px=16,
                      geojson=False, pyramid_tiff=False), model_name="tri")  # fmt: skip
    assert (out.status == "ok").all(), out.message.tolist()
    for sid in shown.slide_id:
        folder = run / "heatmaps" / "tri" / "slides" / sid
        rec = json.loads((folder / "slide.json").read_text())
        probs = rec["probabilities"]
        assert list(probs) == card["classes"] and sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert rec["prediction"] == max(probs, key=probs.get)
        assert rec["probability"] == pytest.approx(max(probs.values()))
        table = pd.read_csv(folder / f"{sid}.csv")
        for c in card["classes"]:  # each class's attention branch sums to 1 over the tiles
            assert table[f"map_{c}"].sum() == pytest.approx(1, abs=1e-3)
        np.testing.assert_allclose(table.attention, table[f"map_{rec['prediction']}"], atol=1e-6)
        overlays = rec["files"]["class_overlays"]  # one overlay per class, drawn from its map
        assert list(overlays) == card["classes"]
        assert all((folder / f).stat().st_size > 1000 for f in overlays.values())
        page = (folder / f"{sid}.html").read_text()
        assert "Evidence for each class" in page and all(
            f'src="{f}"' in page for f in overlays.values()
        )
    page = (run / "heatmaps" / "tri" / "index.html").read_text()
    assert all(f"{c} 0." in page or f"{c} 1." in page for c in card["classes"])
    from wsimil.predict import run_predict

    run_predict(shown, run, "tri", n_boot=50)
    pred = pd.read_csv(run / "predictions" / "tri" / "predictions.csv")
    assert {f"p_{c}" for c in card["classes"]} <= set(pred.columns)
    np.testing.assert_allclose(pred[[f"p_{c}" for c in card["classes"]]].sum(axis=1), 1, atol=1e-5)
    # A label the model does not know is refused up front, naming the slide.
    odd = shown.assign(label=["tumour", "normal", "stroma", "necrosis"])
    with pytest.raises(ValueError, match=rf"{shown.slide_id.iloc[3]}: 'necrosis'"):
        run_predict(odd, run, "tri")


def test_predict_on_the_gpu_agrees_with_the_cpu_or_says_there_is_none(cohort, tmp_path):
    import torch

    from wsimil.predict import run_predict

    run, manifest, _ = cohort
    shown = manifest.iloc[:3]
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device is visible; use --device cpu"):
            run_predict(shown, run, "gated_attention", device="cuda")
        return
    outs = {}
    for dev in ("cpu", "cuda"):
        other = tmp_path / dev
        shutil.copytree(run / "features", other / "features")
        outs[dev] = run_predict(shown, other, str(run / "models" / "gated_attention"), device=dev)
    np.testing.assert_allclose(outs["cpu"].probability, outs["cuda"].probability, atol=1e-4)


def test_heatmap_draws_from_the_tables_predict_wrote_without_scoring_again(
    cohort, tmp_path, monkeypatch
):
    import wsimil.heatmap as hm
    from wsimil.predict import run_predict

    run, manifest, _ = cohort
    other = tmp_path / "ext"
    for d in ("tiles", "features"):
        shutil.copytree(run / d, other / d)
    shown = manifest.iloc[:2]
    model_dir = str(run / "models" / "gated_attention")
    run_predict(shown, other, model_dir, n_boot=20)

    def no_scoring(*_, **__):
        raise AssertionError("scored again")

    monkeypatch.setattr(hm, "slide_scores", no_scoring)
    cfg = HeatmapConfig(thumbnail_px=128, top_k=1, crop_px=16, geojson=False, pyramid_tiff=False)
    res = run_heatmap(shown, other, cfg, model_name=model_dir)
    assert (res.status == "ok").all(), res.message.tolist()
    for sid in shown.slide_id:
        drawn = pd.read_csv(other / "heatmaps" / "gated_attention" / "slides" / sid / f"{sid}.csv")
        scored = pd.read_csv(
            other / "predictions" / "gated_attention" / "slides" / sid / "tiles.csv"
        )
        pd.testing.assert_frame_equal(drawn, scored)
    # A slide predict has not scored is scored by the heatmap itself.
    res = hm.run_heatmap(manifest.iloc[2:3], other, cfg, model_name=model_dir, report=False)
    assert res.status.tolist() == ["error"] and "scored again" in res.message.iloc[0]
