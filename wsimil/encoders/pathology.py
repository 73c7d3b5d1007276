"""Pathology foundation-model encoders: named registry entries built from their recipes.

Each entry (``uni``, ``uni2-h``, ``virchow2``, ``h-optimus-0``, ``h-optimus-1``,
``prov-gigapath``, ``phikon-v2``, ``conch-v1.5``) builds the timm architecture of its
:class:`~wsimil.encoders.recipes.Recipe`, loads the weight file of its Hugging Face repo from
the local cache only (safetensors, or a torch file read with ``weights_only=True``), strictly,
after mapping foreign layouts (Hugging Face Dinov2 for Phikon-v2, the CONCH vision tower) onto
it, and computes the recipe's feature. Absent weights give a one-line
:class:`~wsimil.encoders.MissingWeightsError` naming the repo and the download command.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
from torch import nn

from .base import Encoder, EncoderConfig, MissingWeightsError
from .recipes import Recipe, recipes
from .registry import register_encoder
from .weights import _hf_cache_dir, _hf_cached, _load_checkpoint


class TokenEncoder(Encoder):
    """An :class:`Encoder` whose feature is read from the ViT's tokens as its recipe says."""

    def __init__(self, backbone: nn.Module, config: EncoderConfig, *, feature: str, **kwargs):
        super().__init__(backbone, config, **kwargs)
        self.feature = feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature == "attn_pool":
            return super().forward(x)
        tokens = self.backbone.forward_features(x)
        f = tokens[:, 0]
        if self.feature == "cls+patch_mean":
            patches = tokens[:, self.backbone.num_prefix_tokens :]
            f = torch.cat([f, patches.mean(1)], dim=1)
        if f.shape[1] != self.config.feature_dim:
            raise RuntimeError(
                f"encoder {self.config.name!r} returned {f.shape[1]} features, its config says {self.config.feature_dim}"
            )
        return f.float()


class AttentionalPooler(nn.Module):
    """One learnt query attending over the tokens (the CONCH vision tower's contrastive pooler)."""

    def __init__(
        self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1
    ):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)

        def split(t):
            return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn = (attn - attn.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, -1, h * v.shape[-1])
        return self.to_out(out)


class ConchVision(nn.Module):
    """CONCH v1.5's vision tower: a ViT-L/16 trunk, the attentional pooler and a LayerNorm."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(768, trunk.embed_dim, 8, 1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


# --------------------------------------------------------------------------------------------
# foreign state-dict layouts


def _dino_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """DINO/iBOT-style position-embedding interpolation (bicubic, scale factor (g + 0.1) / n)."""
    cls_pos, patch = pos[:, :1], pos[:, 1:]
    n, dim = int(math.sqrt(patch.shape[1])), patch.shape[-1]
    scale = (grid + 0.1) / n
    p = patch.reshape(1, n, n, dim).permute(0, 3, 1, 2).float()
    p = nn.functional.interpolate(p, scale_factor=(scale, scale), mode="bicubic")
    p = p.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    return torch.cat([cls_pos, p], dim=1)


def _conch_adapter(sd: dict, backbone: nn.Module) -> dict:
    """The vision tower's keys fit as they are; its 224-px position table is interpolated to the
    448-px grid once, as the tower's own forward does on every call."""
    pos = sd.get("trunk.pos_embed")
    want = backbone.trunk.pos_embed.shape
    if pos is not None and pos.shape != want:
        sd = {**sd, "trunk.pos_embed": _dino_resize(pos, backbone.trunk.patch_embed.grid_size[0])}
    return sd


def _dinov2_adapter(sd: dict, backbone: nn.Module) -> dict:
    """Hugging Face ``Dinov2Model`` keys (Phikon-v2) -> timm ViT keys; q, k, v become one qkv."""
    if not any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in sd):
        return sd  # already timm keys
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    sd.pop("embeddings.mask_token", None)
    names = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "attention.output.dense": "attn.proj"}  # fmt: skip
    for i in range(len(backbone.blocks)):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd.pop(f"{src}{a}.{p}")
        for p in ("weight", "bias"):
            qkv = [sd.pop(f"{src}attention.attention.{t}.{p}") for t in ("query", "key", "value")]
            out[f"{dst}attn.qkv.{p}"] = torch.cat(qkv, dim=0)
        out[f"{dst}ls1.gamma"] = sd.pop(f"{src}layer_scale1.lambda1")
        out[f"{dst}ls2.gamma"] = sd.pop(f"{src}layer_scale2.lambda1")
    out.update(sd)  # anything left is reported as unexpected by the strict load
    if out["pos_embed"].shape != backbone.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = backbone.patch_embed.grid_size
        out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], list(grid), num_prefix_tokens=1)
    return out


_ADAPTERS = {"conch": _conch_adapter, "hf-dinov2": _dinov2_adapter}


# --------------------------------------------------------------------------------------------
# building


def weights_file(recipe: Recipe):
    """The recipe's weight file in the local Hugging Face cache and its snapshot, or None."""
    cache = _hf_cache_dir()
    for repo in (recipe.repo, *recipe.aliases):
        for fname in recipe.files:
            p = _hf_cached(repo, fname, cache, None)
            if p is not None:
                return p
    return None


def _missing(recipe: Recipe) -> MissingWeightsError:
    r = recipe.repo
    return MissingWeightsError(
        f"{recipe.name}: weights of {r} ({' or '.join(recipe.files)}) are not in the local "
        f"Hugging Face cache ({_hf_cache_dir()}); licence: {recipe.licence}; on a machine with "
        f"network access accept it on https://huggingface.co/{r}, run `hf auth login` and "
        f"`hf download {r}` (older clients: `huggingface-cli login` and `huggingface-cli download "
        f"{r}`), then copy the cache here or point HF_HOME at it; or pass checkpoint=PATH"
    )


def encoder_config(recipe: Recipe, weights_id: str = "random-init") -> EncoderConfig:
    """The :class:`EncoderConfig` a recipe's encoder carries (no model is built)."""
    return EncoderConfig(
        name=recipe.name,
        weights_id=weights_id,
        input_px=recipe.input_px,
        mean=tuple(recipe.mean),
        std=tuple(recipe.std),
        interpolation=recipe.interpolation,
        feature_dim=recipe.feature_dim,
        preferred_dtype=recipe.dtype,
    )


def build(name: str, pretrained: bool, **overrides) -> Encoder:
    """Build the named encoder; ``overrides`` change timm arguments (tests use a smaller depth).

    Raises
    ------
    MissingWeightsError
        ``pretrained`` and the repo's weight file is not in the local cache.
    """
    import timm

    recipe = recipes()[name]
    path = weights_file(recipe) if pretrained else None
    if pretrained and path is None:
        raise _missing(recipe)
    kwargs = {**recipe.kwargs, "num_classes": 0, **overrides}
    model = timm.create_model(recipe.arch, pretrained=False, **kwargs)
    if recipe.layout == "conch":
        model = ConchVision(model)
    enc = TokenEncoder(
        model.eval(), encoder_config(recipe), feature=recipe.feature,
        state_dict_adapter=_ADAPTERS.get(recipe.layout),
    )  # fmt: skip
    if path is not None:
        _load_checkpoint(enc, path)
        enc.config = dataclasses.replace(
            enc.config, weights_id=f"hf-hub:{recipe.repo}@{path.parent.name}"
        )
    return enc


for _name in recipes():
    register_encoder(_name)(partial(build, _name))
