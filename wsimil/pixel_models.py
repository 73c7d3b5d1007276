"""Instance networks on tile pixels, trained end to end through the MIL pooling (``f`` of the paper).

The paper trains both the instance network ``f`` and the pooling from the bag label alone. With
frozen encoder features only the pooling and a small MLP learn; when the features do not carry
the signal (a small shape on tissue), nothing recovers it. These modules take a bag's tiles as
uint8 pixels, (..., S, S, 3), and return (..., H) instance embeddings, so any pooling of
:mod:`wsimil.mil` trains on pixels (``instance_encoder`` = one of :data:`PIXEL_ENCODERS`):

``cnn``
    the paper's LeNet-style network, for RGB tiles of any side >= 16 px: conv5-20, ReLU,
    maxpool2, conv5-50, ReLU, maxpool2, adaptive max pool to 4 x 4 (the paper's 28 px input
    gives 4 x 4 there), fc-H, ReLU, dropout;
``resnet``
    a small ResNet from scratch: a 3x3 stem and four stages of one basic block (32, 64, 128,
    256 channels; strides 1, 2, 2, 2), GroupNorm (a bag is one slide: batch statistics would
    be one slide's), global average pool, fc-H, ReLU, dropout;
``finetune``
    a registry encoder (:func:`wsimil.encoders.create_encoder`, pretrained weights) whose last
    ``train_blocks`` blocks (and the layers after them) are trained, the rest frozen (batch
    norm statistics stay frozen too), then fc-H, ReLU, dropout.

Pixels are scaled to [0, 1], augmented in training mode only (:func:`augment_he`), resized to
the network's input side when it differs, and normalised with the network's mean/std. At
evaluation (no gradient) tiles go through in chunks, so a bag of any size needs bounded memory;
in training the bag is bounded by ``max_instances``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PIXEL_ENCODERS  # the names (light, for the workflow); this module builds them

__all__ = ["PIXEL_ENCODERS", "PixelInstances", "augment_he"]

#: tiles per forward chunk at evaluation (bounded memory for big bags)
EVAL_CHUNK = 256
_HEAD_NAMES = {"classifier", "fc", "head", "head_drop"}  # a timm model's classifier: never used


def augment_he(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """H&E-safe augmentation of (B, 3, S, S) float tiles in [0, 1], each tile its own draw.

    Flips and 90-degree turns (tissue has no up), and mild colour jitter: brightness and
    contrast x U(0.9, 1.1), per-channel (stain) scale x U(0.95, 1.05) and shift U(-0.02, 0.02).
    """
    b, dev = x.shape[0], x.device
    turns = torch.randint(0, 4, (b,), generator=generator).tolist()
    flips = torch.rand(b, generator=generator) < 0.5
    out = torch.stack([
        torch.rot90(t.flip(-1) if f else t, k, dims=(-2, -1))
        for t, k, f in zip(x, turns, flips.tolist(), strict=True)
    ])  # fmt: skip

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, *shape, generator=generator)).to(dev)

    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * u(0.9, 1.1, 1, 1, 1) + mean * u(0.9, 1.1, 1, 1, 1)
    out = out * u(0.95, 1.05, 3, 1, 1) + u(-0.02, 0.02, 3, 1, 1)
    return out.clamp_(0.0, 1.0)


def lenet_rgb() -> tuple[nn.Module, int]:
    """The paper's LeNet feature extractor for RGB tiles: (B, 3, S, S) -> (B, 800)."""
    net = nn.Sequential(
        nn.Conv2d(3, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(4), nn.Flatten(),
    )  # fmt: skip
    return net, 50 * 4 * 4


class _Basic(nn.Module):
    """A ResNet basic block with GroupNorm."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout),
        )  # fmt: skip
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def small_resnet(widths=(32, 64, 128, 256)) -> tuple[nn.Module, int]:
    """A small ResNet from scratch: (B, 3, S, S) -> (B, widths[-1])."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.GroupNorm(8, widths[0]), nn.ReLU()
    ]  # fmt: skip
    cin = widths[0]
    for i, w in enumerate(widths):
        layers.append(_Basic(cin, w, 1 if i == 0 else 2))
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), widths[-1]


def block_list(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """A timm backbone's blocks in order, and the layers with weights that come after them.

    Blocks are ``blocks`` (EfficientNet stages, ViT blocks), ``stages`` (ConvNeXt...) or
    ``layer1``..``layer4`` (ResNet); what follows (``conv_head``, ``bn2``, ``norm``...) is
    trained with the last blocks. The classifier is not: features are its input.
    """
    for name in ("blocks", "stages"):
        seq = getattr(backbone, name, None)
        if isinstance(seq, nn.Sequential | nn.ModuleList) and len(seq):
            blocks, container = list(seq), name
            break
    else:
        names = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(backbone, n)]
        if not names:
            raise ValueError(
                f"{type(backbone).__name__}: no blocks, stages or layer1-4 to fine-tune; "
                "use --instance-encoder cnn or resnet"
            )
        blocks, container = [getattr(backbone, n) for n in names], names[-1]
        blocks = [b for b in blocks if any(True for _ in b.parameters())]
    children = [n for n, _ in backbone.named_children()]
    after = children[children.index(container) + 1 :] if container in children else []
    tail = [getattr(backbone, n) for n in after if n not in _HEAD_NAMES]
    return blocks, [m for m in tail if any(True for _ in m.parameters())]


def finetune_net(name: str, train_blocks: int, *, pretrained: bool):
    """A registry encoder with its last ``train_blocks`` blocks trainable; returns (net, dim, config)."""
    from .encoders import create_encoder

    encoder = create_encoder(name, pretrained=pretrained)  # frozen, eval mode for good
    blocks, tail = block_list(encoder.backbone)
    if train_blocks > len(blocks):
        raise ValueError(
            f"--train-blocks {train_blocks}: {name} has {len(blocks)} blocks; use at most that"
        )
    for m in (blocks[len(blocks) - train_blocks :] + tail) if train_blocks else []:
        for p in m.parameters():
            p.requires_grad_(True)
    return encoder, encoder.config.feature_dim, encoder.config


class PixelInstances(nn.Module):
    """``f`` on tiles: (..., S, S, 3) uint8 -> (..., out_dim) float, trained end to end.

    Parameters
    ----------
    kind : str
        One of :data:`PIXEL_ENCODERS`.
    side : int
        S, the side of the cached tiles in pixels.
    out_dim : int
        H, the instance embedding width the pooling sees.
    dropout : float
    encoder : str, optional
        ``finetune``: the registry encoder's name.
    train_blocks : int
        ``finetune``: blocks trained (0: only the fc on top of the frozen encoder).
    augment : bool
        Augment tiles in training mode (:func:`augment_he`).
    pretrained : bool
        ``finetune``: load the encoder's pretrained weights (training). A saved model is
        rebuilt without them and gets its own weights from its file.
    """

    def __init__(self, kind: str, *, side: int, out_dim: int, dropout: float = 0.0,
                 encoder: str | None = None, train_blocks: int = 1, augment: bool = True,
                 pretrained: bool = False):  # fmt: skip
        super().__init__()
        self.kind, self.side, self.augment = kind, int(side), bool(augment)
        self.input_px = None
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        if kind == "cnn":
            self.net, width = lenet_rgb()
        elif kind == "resnet":
            self.net, width = small_resnet()
        elif kind == "finetune":
            if not encoder:
                raise ValueError(
                    "--instance-encoder finetune needs --encoder NAME (a registry encoder)"
                )
            self.net, width, cfg = finetune_net(encoder, train_blocks, pretrained=pretrained)
            mean, std, self.input_px = cfg.mean, cfg.std, int(cfg.input_px)
        else:
            raise ValueError(
                f"unknown pixel instance encoder {kind!r}; use one of {PIXEL_ENCODERS}"
            )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.fc = nn.Sequential(nn.Linear(width, out_dim), nn.ReLU(), nn.Dropout(dropout))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, s = x.shape[:-3], self.side
        if tuple(x.shape[-3:]) != (s, s, 3):
            raise ValueError(f"tiles must be (..., {s}, {s}, 3) uint8, got {tuple(x.shape)}")
        flat = x.reshape(-1, s, s, 3)
        if torch.is_grad_enabled() or len(flat) <= EVAL_CHUNK:
            h = self._embed(flat)
        else:
            h = torch.cat([self._embed(c) for c in flat.split(EVAL_CHUNK)])
        return h.reshape(*lead, -1)

    def _embed(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.permute(0, 3, 1, 2).float().div(255.0)
        if self.training and self.augment:
            x = augment_he(x)
        if self.input_px and self.input_px != self.side:
            x = nn.functional.interpolate(x, size=(self.input_px,) * 2, mode="bilinear",
                                          antialias=True, align_corners=False)  # fmt: skip
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.fc(self.net(x).flatten(1).float())
