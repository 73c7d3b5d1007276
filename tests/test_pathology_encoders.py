"""The pathology foundation-model recipes, offline: full-size architectures on the meta device,
and reduced-depth copies loaded from a Hugging Face cache laid out as the real repos are, their
features checked against a direct computation written from each model card."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner

from wsimil.encoders import MissingWeightsError, create_encoder, normalise
from wsimil.encoders import pathology as P

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}

# name: (width, input px, interpolation, (mean, std), full-size facts: key -> shape)
CARDS = {
    "uni": (1024, 224, "bilinear", IMAGENET, {"pos_embed": (1, 197, 1024), "blocks.23.ls1.gamma": (1024,)}),
    "uni2-h": (1536, 224, "bilinear", IMAGENET, {"reg_token": (1, 8, 1536), "pos_embed": (1, 256, 1536), "blocks.23.mlp.fc1.weight": (8192, 1536)}),
    "virchow2": (2560, 224, "bicubic", IMAGENET, {"reg_token": (1, 4, 1280), "blocks.31.mlp.fc1.weight": (6832, 1280), "blocks.31.mlp.fc2.weight": (1280, 3416)}),
    "h-optimus-0": (1536, 224, "bilinear", OPTIMUS, {"reg_token": (1, 4, 1536), "blocks.39.mlp.fc1.weight": (8192, 1536)}),
    "h-optimus-1": (1536, 224, "bilinear", OPTIMUS, {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536)}),
    "prov-gigapath": (1536, 224, "bicubic", IMAGENET, {"patch_embed.proj.weight": (1536, 3, 16, 16), "blocks.39.mlp.fc1.weight": (8192, 1536)}),
    "phikon-v2": (1024, 224, "bilinear", IMAGENET, {"pos_embed": (1, 197, 1024), "blocks.23.attn.qkv.weight": (3072, 1024)}),
    "conch-v1.5": (768, 448, "bilinear", IMAGENET, {"trunk.pos_embed": (1, 785, 1024), "attn_pool_contrast.query": (1, 768), "ln_contrast.weight": (768,)}),
}  # fmt: skip

# timm-format repos: the arguments each card (or its reference loader) gives timm, written out here
TIMM_CARDS = {
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}, "pytorch_model.bin"),
    "uni2-h": ("vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **SWIGLU}, "pytorch_model.bin"),
    "virchow2": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True, **SWIGLU}, "pytorch_model.bin"),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}, "pytorch_model.bin"),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False}, "pytorch_model.bin"),
    "prov-gigapath": ("vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334}, "pytorch_model.bin"),
}  # fmt: skip


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub"


def _put(cache, repo: str, fname: str, sd: dict, commit="89abcdef" * 5) -> None:
    """Save ``sd`` as ``fname`` in huggingface_hub's cache layout (refs/main -> snapshots/)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if fname.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(snap / fname))
    else:
        torch.save(sd, snap / fname)
    (snap / "config.json").write_text(json.dumps({"note": "written by the test"}))


def _tiles(px: int, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, px, px, 3), dtype=torch.uint8, generator=g)


def _card_input(tiles: torch.Tensor, mean_std) -> torch.Tensor:
    """The cards' ToTensor + Normalize, written out."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (tiles.permute(0, 3, 1, 2).float() / 255 - mean) / std


def _randomised(model: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_full_size_recipe_on_the_meta_device(name):
    width, px, interp, (mean, std), facts = CARDS[name]
    with torch.device("meta"):
        enc = P.build(name, pretrained=False)
        out = enc(torch.empty(2, 3, px, px))
    assert out.shape == (2, width)
    cfg = enc.config
    assert (cfg.feature_dim, cfg.input_px, cfg.interpolation) == (width, px, interp)
    assert (cfg.mean, cfg.std) == (mean, std)
    shapes = {k: tuple(v.shape) for k, v in enc.backbone.state_dict().items()}
    assert {k: shapes.get(k) for k in facts} == facts


@pytest.mark.parametrize("name", sorted(TIMM_CARDS))
def test_timm_recipe_from_the_hf_cache_matches_the_card(name, hf_home):
    arch, kwargs, fname = TIMM_CARDS[name]
    width, px, _, mean_std, _ = CARDS[name]
    src = timm.create_model(arch, num_classes=0, depth=1, weight_init="skip", **kwargs).eval()
    src.load_state_dict(_randomised(src))
    _put(hf_home, P.recipes()[name].repo, fname, src.state_dict())
    enc = P.build(name, pretrained=True, depth=1, weight_init="skip")
    assert enc.config.weights_id == f"hf-hub:{P.recipes()[name].repo}@{'89abcdef' * 5}"
    tiles = _tiles(px, 1)
    with torch.inference_mode():
        got = enc(normalise(tiles, enc.config))
        out = src(_card_input(tiles, mean_std))
    if name == "virchow2":  # the card: class token ++ mean of the patch tokens (after 1 + 4)
        out = torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
    assert got.shape == (1, width)
    torch.testing.assert_close(got, out, atol=2e-4, rtol=2e-4)


def _dinov2_reference(sd: dict, x: torch.Tensor, heads: int = 16) -> torch.Tensor:
    """Hugging Face Dinov2Model's last_hidden_state[:, 0], from its own keys, in plain torch."""
    ln = torch.nn.functional.layer_norm
    e = torch.nn.functional.conv2d(x, sd["embeddings.patch_embeddings.projection.weight"],
                                   sd["embeddings.patch_embeddings.projection.bias"], stride=16)  # fmt: skip
    h = torch.cat(
        [sd["embeddings.cls_token"].expand(len(x), -1, -1), e.flatten(2).transpose(1, 2)], 1
    )
    h = h + sd["embeddings.position_embeddings"]
    i, d = 0, h.shape[-1]
    while f"encoder.layer.{i}.norm1.weight" in sd:
        p = lambda n, i=i: sd[f"encoder.layer.{i}.{n}"]  # noqa: E731
        y = ln(h, (d,), p("norm1.weight"), p("norm1.bias"), 1e-6)
        q, k, v = (torch.nn.functional.linear(y, p(f"attention.attention.{t}.weight"), p(f"attention.attention.{t}.bias"))
                   .reshape(len(x), -1, heads, d // heads).transpose(1, 2) for t in ("query", "key", "value"))  # fmt: skip
        a = ((q @ k.transpose(-1, -2)) / (d // heads) ** 0.5).softmax(-1) @ v
        a = torch.nn.functional.linear(a.transpose(1, 2).reshape(len(x), -1, d),
                                       p("attention.output.dense.weight"), p("attention.output.dense.bias"))  # fmt: skip
        h = h + a * p("layer_scale1.lambda1")
        y = ln(h, (d,), p("norm2.weight"), p("norm2.bias"), 1e-6)
        y = torch.nn.functional.gelu(
            torch.nn.functional.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))
        )
        h = h + torch.nn.functional.linear(y, p("mlp.fc2.weight"), p("mlp.fc2.bias")) * p(
            "layer_scale2.lambda1"
        )
        i += 1
    return ln(h, (d,), sd["layernorm.weight"], sd["layernorm.bias"], 1e-6)[:, 0]


def test_phikon_v2_from_hugging_face_dinov2_keys(hf_home):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    d = 1024
    sd = {"embeddings.cls_token": r(1, 1, d), "embeddings.mask_token": r(1, d),
          "embeddings.position_embeddings": r(1, 197, d),
          "embeddings.patch_embeddings.projection.weight": r(d, 3, 16, 16),
          "embeddings.patch_embeddings.projection.bias": r(d),
          "layernorm.weight": 1 + r(d), "layernorm.bias": r(d)}  # fmt: skip
    pre = "encoder.layer.0."
    for n, shape in [("norm1", (d,)), ("norm2", (d,)), ("attention.attention.query", (d, d)),
                     ("attention.attention.key", (d, d)), ("attention.attention.value", (d, d)),
                     ("attention.output.dense", (d, d)), ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d))]:  # fmt: skip
        sd[f"{pre}{n}.weight"] = (1 + r(d)) if n.startswith("norm") else r(*shape)
        sd[f"{pre}{n}.bias"] = r(shape[0])
    sd[f"{pre}layer_scale1.lambda1"], sd[f"{pre}layer_scale2.lambda1"] = r(d), r(d)
    _put(hf_home, "owkin/phikon-v2", "model.safetensors", sd)
    enc = P.build("phikon-v2", pretrained=True, depth=1, weight_init="skip")
    tiles = _tiles(224)
    with torch.inference_mode():
        got = enc(normalise(tiles, enc.config))
        want = _dinov2_reference(sd, _card_input(tiles, IMAGENET))
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_conch_v15_vision_tower_at_448(hf_home):
    trunk = timm.create_model("vit_large_patch16_224", num_classes=0, depth=1, init_values=1.0)
    pool = P.AttentionalPooler(768, 1024, 8, 1)
    ln = torch.nn.LayerNorm(768)
    sd = {**{f"trunk.{k}": v for k, v in _randomised(trunk).items()},
          **{f"attn_pool_contrast.{k}": v for k, v in _randomised(pool).items()},
          **{f"ln_contrast.{k}": v + 1 if k == "weight" else v for k, v in _randomised(ln).items()}}  # fmt: skip
    _put(hf_home, "MahmoodLab/conchv1_5", "pytorch_model_vision.bin", sd)
    enc = P.build("conch-v1.5", pretrained=True, depth=1, weight_init="skip")
    trunk.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("trunk.")})
    tiles = _tiles(448, 1)
    with torch.inference_mode():
        got = enc(normalise(tiles, enc.config))
        x = _card_input(tiles, IMAGENET)
        # the tower's forward: tokens with its 14 x 14 table interpolated to 28 x 28 (DINO style)
        t = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([trunk.cls_token.expand(1, -1, -1), t], 1)
        pos = trunk.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        pos = torch.nn.functional.interpolate(
            pos, scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic"
        )
        t = t + torch.cat([trunk.pos_embed[:, :1], pos.permute(0, 2, 3, 1).reshape(1, 784, -1)], 1)
        t = trunk.norm(trunk.blocks(t))
        kv = torch.nn.functional.linear(torch.nn.functional.layer_norm(t, (1024,), sd["attn_pool_contrast.ln_k.weight"], sd["attn_pool_contrast.ln_k.bias"]), sd["attn_pool_contrast.to_kv.weight"])  # fmt: skip
        q = torch.nn.functional.linear(torch.nn.functional.layer_norm(sd["attn_pool_contrast.query"], (768,), sd["attn_pool_contrast.ln_q.weight"], sd["attn_pool_contrast.ln_q.bias"]), sd["attn_pool_contrast.to_q.weight"])  # fmt: skip
        k, v = kv.chunk(2, -1)
        heads = [((q[:, h * 96:(h + 1) * 96] @ k[0, :, h * 96:(h + 1) * 96].T) / 96**0.5).softmax(-1) @ v[0, :, h * 96:(h + 1) * 96] for h in range(8)]  # fmt: skip
        o = torch.nn.functional.linear(torch.cat(heads, -1), sd["attn_pool_contrast.to_out.weight"])
        want = torch.nn.functional.layer_norm(
            o, (768,), sd["ln_contrast.weight"], sd["ln_contrast.bias"]
        )
    assert got.shape == (1, 768)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_a_local_weights_file_loads_into_a_named_entry(tmp_path):
    """What create_encoder(name, checkpoint=FILE) does, at depth 1: the entry's adapter maps the
    file's layout (here Virchow2's own timm keys, safetensors) and the load is strict."""
    from safetensors.torch import save_file

    from wsimil.encoders.weights import _load_checkpoint

    arch, kwargs, _ = TIMM_CARDS["virchow2"]
    src = timm.create_model(arch, num_classes=0, depth=1, weight_init="skip", **kwargs).eval()
    src.load_state_dict(_randomised(src))
    path = tmp_path / "virchow2.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = P.build("virchow2", pretrained=False, depth=1, weight_init="skip")
    _load_checkpoint(enc, path)
    assert enc.config.weights_id.startswith(f"file:{path.resolve()}#sha256=")
    tiles = _tiles(224, 1)
    with torch.inference_mode():
        out = src(_card_input(tiles, IMAGENET))
        want = torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
        torch.testing.assert_close(enc(normalise(tiles, enc.config)), want, atol=2e-4, rtol=2e-4)


def test_missing_weights_is_one_line_naming_the_repo_and_the_command(hf_home):
    for name in ("uni", "virchow2", "conch-v1.5"):
        with pytest.raises(MissingWeightsError) as err:
            create_encoder(name)
        msg = str(err.value)
        repo = P.recipes()[name].repo
        assert "\n" not in msg and f"hf download {repo}" in msg
        assert f"huggingface-cli download {repo}" in msg and "licence" in msg


def test_a_state_dict_that_does_not_fit_is_refused(hf_home):
    src = timm.create_model("vit_large_patch16_224", num_classes=0, depth=1)  # no layer scale
    _put(hf_home, "MahmoodLab/UNI", "pytorch_model.bin", src.state_dict())
    with pytest.raises(ValueError, match=r"does not fit encoder 'uni'.*missing keys.*ls1.gamma"):
        P.build("uni", pretrained=True, depth=1)


def test_encoders_command_lists_width_input_licence_and_weights(hf_home):
    from wsimil.cli import main

    src = timm.create_model("vit_large_patch16_224", num_classes=0, depth=1, init_values=1e-5)
    _put(hf_home, "MahmoodLab/UNI", "pytorch_model.bin", src.state_dict())
    r = CliRunner().invoke(main, ["encoders"])
    assert r.exit_code == 0, r.output
    lines = {ln.split()[0]: ln for ln in r.output.splitlines() if ln.strip()}
    assert "1024" in lines["uni"] and "found" in lines["uni"]
    assert (
        "2560" in lines["virchow2"]
        and "missing" in lines["virchow2"]
        and "gated" in lines["virchow2"]
    )
    assert "448" in lines["conch-v1.5"] and "768" in lines["conch-v1.5"]
    assert {"efficientnet_lite0", "resnet50_trunc", "h-optimus-1", "phikon-v2"} <= set(lines)
