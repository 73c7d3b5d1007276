"""Model files never run code: safetensors + JSON, pickles refused wherever wsimil loads a model.

A "pickle bomb" creates a marker file when unpickled. It is put at every path wsimil reads a
model from (``wsimil heatmap``, a fold when ``wsimil train`` resumes, ``wsimil embed
--checkpoint``); the marker must never appear and the user gets one line naming the file.
"""

import hashlib
import json
import pickle

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from wsimil.bags import Bag, Standardiser
from wsimil.checkpoint import load_checkpoint, save_checkpoint
from wsimil.cli import main
from wsimil.config import TrainConfig
from wsimil.encoders import create_encoder, normalise
from wsimil.fit import build_model, predict_bags
from wsimil.mil import list_mil_models

D = 8


class Bomb:
    """Unpickling this creates ``marker`` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bomb(path, marker):
    """A PyTorch-style file at ``path`` that creates ``marker`` when fully unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": Bomb(marker), "epoch": 3}, path)
    return path


def _model(cfg=None, seed=0):
    cfg = cfg or TrainConfig(hidden_dim=16, attention_dim=8, dropout=0.0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    std = Standardiser(rng.normal(size=D), rng.uniform(0.5, 2, size=D))
    return build_model(cfg, D).eval(), std, cfg


def _save(folder, seed=0, cfg=None):
    model, std, cfg = _model(cfg, seed)
    split = {"a": "train", "b": "val", "c": "test"}
    save_checkpoint(
        folder, model, std, cfg, encoder="toyenc", best_epoch=4, split=split, repeat=0, fold=1
    )
    return model, std


def _bags(n=4, seed=1):
    rng = np.random.default_rng(seed)
    return [
        Bag(f"b{i}", rng.normal(size=(7, D)).astype(np.float32), i % 2, f"b{i}") for i in range(n)
    ]


def _one_line_error(result, path):
    """The CLI failed with exactly one ``Error:`` line, naming ``path``; no traceback."""
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(path) in errors[0], result.output
    assert "Traceback" not in result.output
    return errors[0]


def _manifest(tmp_path):
    m = tmp_path / "manifest.csv"
    m.write_text("slide_id,path,label\ns0,s0.tiff,1\ns1,s1.tiff,0\n")
    return m


def test_the_bomb_is_live_when_fully_unpickled(tmp_path):
    """The test's bomb really runs code under a full unpickle, so its absence below means something."""
    marker = tmp_path / "marker"
    path = _bomb(tmp_path / "bomb.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# wsimil's own model folders


@pytest.mark.parametrize("name", list_mil_models())
def test_round_trip_gives_the_same_predictions(tmp_path, name):
    cfg = TrainConfig(model=name, hidden_dim=16, attention_dim=8, dropout=0.0, mlp_dims=[12, 6])
    model, std = _save(tmp_path / "m", cfg=cfg)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "model.safetensors"]
    loaded, std2, meta = load_checkpoint(tmp_path / "m")
    assert not loaded.training and meta["model_name"] == name and meta["in_dim"] == D
    assert meta["encoder"] == "toyenc" and meta["best_epoch"] == 4
    assert meta["extras"] == {"repeat": 0, "fold": 1} and meta["config"] == cfg.model_dump(
        mode="json"
    )
    np.testing.assert_array_equal(std2.mean, std.mean)
    np.testing.assert_array_equal(std2.std, std.std)
    bags = _bags()
    p1, _ = predict_bags(model, [std(b.features) for b in bags])
    p2, _ = predict_bags(loaded, [std2(b.features) for b in bags])
    np.testing.assert_array_equal(p1, p2)
    assert load_checkpoint(tmp_path / "m" / "model.json")[2] == meta  # the json path works too


def _edit_meta(folder, **changes):
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if k == "model_kwargs_extra":
            meta["model_kwargs"].update(v)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize(
    "changes, file, words",
    [
        ({"model_name": "resnet_but_evil"}, "model.json", "unknown model_name 'resnet_but_evil'"),
        ({"in_dim": 0}, "model.json", "in_dim must be an integer > 0"),
        ({"in_dim": "8"}, "model.json", "in_dim must be an integer > 0"),
        ({"in_dim": 9}, "model.safetensors", "does not fit gated_attention with in_dim 9"),
        ({"model_kwargs_extra": {"instance_encoder": {"__class__": "os.system"}}}, "model.json", "bad model_kwargs instance_encoder"),
        ({"model_kwargs_extra": {"evil": 1}}, "model.json", "unknown keys 'evil'"),
        ({"format": "pickle"}, "model.json", "format is 'pickle'"),
        ({"format_version": 2}, "model.json", "format_version 2 is not supported"),
        ({"weights_sha256": "0" * 63}, "model.json", "bad or missing weights_sha256"),
        ({"weights_file": "../../etc/passwd"}, "model.json", "bad or missing weights_file"),
        ({"split": []}, "model.json", "bad or missing split"),
    ],
)  # fmt: skip
def test_a_tampered_model_json_is_refused_with_one_line(tmp_path, changes, file, words):
    _save(tmp_path / "m")
    _edit_meta(tmp_path / "m", **changes)
    with pytest.raises(ValueError) as exc:
        load_checkpoint(tmp_path / "m")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "m" / file)), msg
    assert words in msg and "wsimil train" in msg


def test_non_json_and_a_missing_weights_file_are_refused(tmp_path):
    _save(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.json: not a readable model file") as exc:
        load_checkpoint(tmp_path / "m")
    assert "\n" not in str(exc.value)
    _save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read the model weights"):
        load_checkpoint(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"nothing.model\.json: no trained model"):
        load_checkpoint(tmp_path / "nothing")


def test_a_swapped_weights_file_is_refused(tmp_path):
    _save(tmp_path / "m", seed=0)
    _save(tmp_path / "other", seed=1)  # same architecture, other weights: only the hash tells
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError) as exc:
        load_checkpoint(tmp_path / "m")
    msg = str(exc.value)
    assert msg.startswith(str(tmp_path / "m" / "model.safetensors")) and "SHA-256 differs" in msg
    assert "\n" not in msg


def test_saving_again_replaces_the_model_and_removes_a_legacy_pickle(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    marker = tmp_path / "marker"
    _bomb(folder / "checkpoint.pt", marker)
    _save(folder, seed=0)
    model, _ = _save(folder, seed=1)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    loaded, _, _ = load_checkpoint(folder)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert not marker.exists()


def _bomb_model_folder(folder, marker, *, legacy: bool):
    """A model folder a loader must refuse: a legacy pickle, or a pickle as model.safetensors
    beside a valid-looking model.json whose SHA-256 matches it. Returns the file to be named."""
    if legacy:
        return _bomb(folder / "checkpoint.pt", marker)
    _save(folder)
    bomb = _bomb(folder / "model.safetensors", marker)
    _edit_meta(folder, weights_sha256=hashlib.sha256(bomb.read_bytes()).hexdigest())
    return bomb


@pytest.mark.parametrize("legacy", [True, False], ids=["checkpoint.pt", "model.safetensors"])
def test_heatmap_never_unpickles_a_model(tmp_path, legacy):
    run, marker = tmp_path / "run", tmp_path / "marker"
    bad = _bomb_model_folder(run / "models" / "evil", marker, legacy=legacy)
    m = _manifest(tmp_path)
    with pytest.raises(ValueError):  # in-process API
        load_checkpoint(run / "models" / "evil")
    r = CliRunner().invoke(main, ["heatmap", str(run), "--manifest", str(m), "--model", "evil"])
    line = _one_line_error(r, bad)
    if legacy:
        assert "no longer unpickles model files" in line and "can run code" in line
        assert "retrain with `wsimil train`" in line
    else:
        assert "not a safetensors file" in line
    assert not marker.exists()
    assert not (run / "heatmaps" / "evil" / "slides").exists()


@pytest.mark.parametrize("legacy", [True, False], ids=["checkpoint.pt", "model.safetensors"])
def test_train_never_unpickles_a_fold_it_would_resume(tmp_path, legacy):
    run, marker = tmp_path / "run", tmp_path / "marker"
    fold = run / "models" / "gated_attention" / "folds" / "r0_f0"
    bad = _bomb_model_folder(fold, marker, legacy=legacy)
    rows = [",".join(map(str, [b.label, b.bag_id, *x])) for b in _bags(12) for x in b.features]
    table = tmp_path / "bags.csv"
    table.write_text("\n".join(rows) + "\n")
    args = ["train", str(run), "--bags", str(table), "--protocol", "cv", "--folds", "3"]
    r = CliRunner().invoke(main, [*args, "--epochs", "1"])
    line = _one_line_error(r, bad)
    assert ("no longer unpickles" in line) if legacy else ("not a safetensors file" in line)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# encoder weights (`wsimil embed --checkpoint`)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_embed_never_unpickles_an_encoder_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    bomb = _bomb(tmp_path / "bomb.pth", marker)
    with pytest.raises(ValueError) as exc:
        create_encoder("resnet18", checkpoint=bomb)
    msg = str(exc.value)
    assert msg.startswith(str(bomb)) and "full unpickling" in msg and "\n" not in msg
    m = _manifest(tmp_path)
    args = ["embed", str(tmp_path / "run"), "--manifest", str(m), "--encoder", "resnet18"]
    r = CliRunner().invoke(main, [*args, "--checkpoint", str(bomb), "--device", "cpu"])
    line = _one_line_error(r, bomb)
    assert "can run code" in line
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"  # a plain pickle (not torch.save's zip) is refused the same way
    raw.write_bytes(pickle.dumps(Bomb(marker)))
    with pytest.raises(ValueError, match="full unpickling"):
        create_encoder("resnet18", checkpoint=raw)
    assert not marker.exists()


def test_a_pickled_module_is_refused_with_how_to_convert_it(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(timm.create_model("resnet18", pretrained=False), path)
    with pytest.raises(ValueError) as exc:
        create_encoder("resnet18", checkpoint=path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: refused")
    assert "can run code" in msg and 'torch.save(model.state_dict(), "weights.pth")' in msg
    assert "safetensors" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dicts_and_safetensors_still_load(tmp_path, suffix):
    src = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = create_encoder("resnet18", checkpoint=path)
    assert enc.config.weights_id.startswith(f"file:{path.resolve()}#sha256=")
    x = normalise(torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8), enc.config)
    with torch.inference_mode():
        torch.testing.assert_close(
            enc(x), src.forward_head(src.forward_features(x), pre_logits=True)
        )


def test_a_damaged_safetensors_encoder_file_is_one_line(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"not a readable safetensors file") as exc:
        create_encoder("resnet18", checkpoint=path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)
