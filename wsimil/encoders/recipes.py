"""The recipes of the pathology foundation-model encoders: one :class:`Recipe` per named entry.

A recipe is everything a model's own card and reference code fix: the timm architecture and its
arguments, the input size, interpolation and mean/std, which tokens make the feature, its width,
the dtype the model runs in, the Hugging Face repo and the weight file it holds there, and the
licence. Checked against the model cards and the reference loaders of TRIDENT
(github.com/mahmoodlab/TRIDENT, ``trident/patch_encoder_models/load.py`` at a91fa84, 2026-06);
see ``docs/encoders.md``. Plain data only: :mod:`wsimil.encoders.pathology` builds from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import IMAGENET_MEAN, IMAGENET_STD

#: how a recipe's feature is made from the backbone's tokens
FEATURES = {
    "cls": "class token after the final norm",
    "cls+patch_mean": "class token ++ mean of the patch tokens (register tokens excluded)",
    "attn_pool": "attentional pooler over all tokens + LayerNorm (CONCH vision tower)",
}

_GATED_NC = "CC-BY-NC-ND 4.0, gated (accept on the model page)"


@dataclass(frozen=True, eq=False)
class Recipe:
    """How one named pathology encoder is built, fed and read out."""

    name: str
    repo: str  #: Hugging Face repo id
    files: tuple[str, ...]  #: weight files in the repo, first found is used
    arch: str  #: timm architecture
    kwargs: dict = field(default_factory=dict)  #: timm arguments (num_classes=0 is added)
    input_px: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    feature: str = "cls"  #: a key of :data:`FEATURES`
    feature_dim: int = 1024
    dtype: str = "float16"  #: preferred autocast dtype on CUDA
    licence: str = _GATED_NC
    layout: str = "timm"  #: state-dict layout of the repo: timm, hf-dinov2 or conch
    aliases: tuple[str, ...] = ()  #: other spellings of the repo id a cache may hold


def _swiglu():
    import timm
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


def recipes() -> dict[str, Recipe]:
    """All recipes by name (built on call: the SwiGLU arguments need timm and torch)."""
    swiglu = _swiglu()
    optimus = dict(
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True,
                "global_pool": "token"},
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        feature_dim=1536,
        licence="Apache-2.0, gated (accept on the model page)",
    )  # fmt: skip
    out = [
        Recipe(
            "uni", "MahmoodLab/UNI", ("pytorch_model.bin",), "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            aliases=("MahmoodLab/uni",),
        ),
        Recipe(
            "uni2-h", "MahmoodLab/UNI2-h", ("pytorch_model.bin",), "vit_giant_patch14_224",
            {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
             "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
             "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **swiglu},
            feature_dim=1536, dtype="bfloat16",
        ),
        Recipe(
            "virchow2", "paige-ai/Virchow2", ("model.safetensors", "pytorch_model.bin"),
            "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
             "global_pool": "", "dynamic_img_size": True, **swiglu},
            interpolation="bicubic", feature="cls+patch_mean", feature_dim=2560,
            licence="CC-BY-NC-ND 4.0, gated (accept on the model page)",
        ),
        Recipe("h-optimus-0", "bioptimus/H-optimus-0", ("model.safetensors", "pytorch_model.bin"),
               **optimus),
        Recipe("h-optimus-1", "bioptimus/H-optimus-1", ("model.safetensors", "pytorch_model.bin"),
               **{**optimus, "licence": "non-commercial licence, gated (accept on the model page)"}),
        Recipe(
            "prov-gigapath", "prov-gigapath/prov-gigapath", ("pytorch_model.bin",),
            "vit_giant_patch14_dinov2",
            {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
             "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334,
             "dynamic_img_size": True},
            interpolation="bicubic", feature_dim=1536,
            licence="Apache-2.0, gated (accept on the model page)",
        ),
        Recipe(
            "phikon-v2", "owkin/phikon-v2", ("model.safetensors",), "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5},
            dtype="float32", licence="Owkin non-commercial licence, not gated", layout="hf-dinov2",
        ),
        Recipe(
            "conch-v1.5", "MahmoodLab/conchv1_5", ("pytorch_model_vision.bin",),
            "vit_large_patch16_224",
            {"img_size": 448, "patch_size": 16, "init_values": 1.0},
            input_px=448, feature="attn_pool", feature_dim=768, layout="conch",
        ),
    ]  # fmt: skip
    return {r.name: r for r in out}
