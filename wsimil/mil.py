"""MIL poolings of Ilse, Tomczak and Welling (ICML 2018), behind one interface and one factory.

Every model maps bags ``x`` of shape (B, N, D) with a padding mask (B, N) (True = real
instance) to a :class:`MILOutput`: bag logits (B,) and, per instance, attention weights or
instance scores (B, N). ``theta(X) = g(sigma(f(x_1), ..., f(x_K)))`` with

- ``f``: instance transform (a small MLP by default, any ``nn.Module`` mapping (..., D) to
  (..., hidden_dim));
- ``sigma``: the pooling (max, mean, attention, gated attention);
- ``g``: a linear classifier giving one logit (two classes, the paper's models) or one logit
  per class (three or more: softmax; :mod:`wsimil.classes`).

Names: ``instance_max``, ``instance_mean``, ``embedding_max``, ``embedding_mean``,
``attention``, ``gated_attention``. Use :func:`create_mil`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .classes import n_outputs
from .pixel_models import PIXEL_ENCODERS, PixelInstances

_REGISTRY: dict[str, Callable[..., MILModel]] = {}


@dataclass
class MILOutput:
    """Output of a MIL model.

    Attributes
    ----------
    logits : Tensor, shape (B,) or (B, C)
        Bag logit (two classes: probability of the positive class = sigmoid), or one logit
        per class (C >= 3: probabilities = softmax).
    attention : Tensor, shape (B, N), optional
        Attention weights (attention poolings): non-negative, sum to 1 over each bag's real
        instances, exactly 0 on padding.
    instance_scores : Tensor, shape (B, N), optional
        Instance probabilities (instance-level poolings); 0 on padding.
    contributions : Tensor, shape (B, N), optional
        Embedding poolings, in eval mode only: each instance's part in the pooled vector
        (``embedding_mean``: the bag probability the instance alone would give, whose logits
        average to the bag's when the classifier is linear; ``embedding_max``: the share of the
        pooled vector's dimensions whose maximum the instance supplies); 0 on padding.
    class_maps : Tensor, shape (B, C, N), optional
        Three or more classes: each class's per-instance map (its attention branch with
        ``per_class_attention``, instance class probabilities for instance poolings, the class
        probability each instance alone would give for ``embedding_mean``). The (B, N) map
        above is then the one of the bag's most probable class.
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    instance_scores: torch.Tensor | None = None
    contributions: torch.Tensor | None = None
    class_maps: torch.Tensor | None = None


def register_mil(name: str):
    """Decorator registering a model class under ``name``."""

    def deco(cls):
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def list_mil_models() -> list[str]:
    return sorted(_REGISTRY)


def create_mil(name: str, in_dim: int, **kwargs) -> MILModel:
    """Build a MIL model by name.

    Parameters
    ----------
    name : str
        One of :func:`list_mil_models`.
    in_dim : int
        Instance feature dimension D.
    **kwargs
        ``hidden_dim``, ``attention_dim``, ``dropout``, ``mlp_dims``, ``instance_encoder``
        (an ``nn.Module``, ``"mlp"``, ``"lenet"``, or a pixel network of
        :mod:`wsimil.pixel_models`: ``"cnn"``, ``"resnet"``, ``"finetune"``, whose settings
        are ``pixels``: ``side``, ``encoder``, ``train_blocks``, ``augment``), ``n_classes``
        (2: one logit) and ``per_class_attention`` (attention poolings with 3+ classes: one
        branch per class).
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown MIL model {name!r}; choose one of {', '.join(list_mil_models())}"
        )
    return _REGISTRY[name](in_dim, **kwargs)


def mlp_encoder(in_dim: int, dims: list[int], *, dropout: float) -> nn.Module:
    """Instance transform ``f``: Linear + ReLU + Dropout per width in ``dims``; (..., D) -> (..., dims[-1])."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in dims:
        layers += [nn.Linear(prev, width), nn.ReLU(), nn.Dropout(dropout)]
        prev = width
    return nn.Sequential(*layers)


class LeNetEncoder(nn.Module):
    """The paper's LeNet-style ``f`` for 28 x 28 images given flattened: (..., 784) -> (..., out_dim).

    conv5-20 + ReLU + maxpool2, conv5-50 + ReLU + maxpool2, fc-``out_dim`` + ReLU (+ dropout).
    """

    def __init__(self, out_dim: int = 500, *, dropout: float = 0.0, side: int = 28):
        super().__init__()
        self.side = side
        self.conv = nn.Sequential(
            nn.Conv2d(1, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        n = ((side - 4) // 2 - 4) // 2
        self.fc = nn.Sequential(nn.Linear(50 * n * n, out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.conv(x.reshape(-1, 1, self.side, self.side))
        return self.fc(h.flatten(1)).reshape(*lead, -1)


def check_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes and return a bool mask (B, N); refuse empty bags."""
    if x.dim() not in (3, 5):
        raise ValueError(
            f"bags must be (B, N, D) features or (B, N, S, S, 3) tiles, got {tuple(x.shape)}"
        )
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    mask = mask.to(torch.bool)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match bags {tuple(x.shape[:2])}")
    if x.shape[1] == 0 or not bool(mask.any(dim=1).all()):
        raise ValueError(
            "empty bag: every bag needs at least one instance (slides with 0 tiles are skipped upstream)"
        )
    return mask


class MILModel(nn.Module):
    """Shared parts: instance transform ``f`` and classifier ``g``."""

    registry_name = "base"

    def __init__(
        self,
        in_dim: int,
        *,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
        mlp_dims: list[int] | None = None,
        instance_encoder: nn.Module | str | None = None,
        n_classes: int = 2,
        per_class_attention: bool = False,
        pixels: dict | None = None,
    ):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        if per_class_attention and (n_classes < 3 or not isinstance(self, AttentionMIL)):
            raise ValueError(
                "per_class_attention needs an attention pooling (attention, gated_attention) "
                f"and three or more classes; got {self.registry_name} with {n_classes} classes"
            )
        self.n_classes, self.n_out = n_classes, n_outputs(n_classes)
        self.per_class = per_class_attention
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        self.pixels: dict | None = None  # the pixel network's settings (end-to-end models)
        if instance_encoder is None or instance_encoder == "mlp":
            dims = list(mlp_dims) if mlp_dims else [hidden_dim]
            self.hidden_dim = dims[-1]
            self.f = mlp_encoder(in_dim, dims, dropout=dropout)
        elif instance_encoder == "lenet":
            self.f = LeNetEncoder(hidden_dim, dropout=dropout)
        elif instance_encoder in PIXEL_ENCODERS:  # tiles (B, N, S, S, 3) uint8, end to end
            self.pixels = dict(pixels or {})
            self.f = PixelInstances(instance_encoder, out_dim=hidden_dim, dropout=dropout,
                                    **self.pixels)  # fmt: skip
            self.pixels.pop("pretrained", None)  # the saved model carries its own weights
        elif isinstance(instance_encoder, nn.Module):
            self.f = instance_encoder
        else:
            raise ValueError(
                f"unknown instance encoder {instance_encoder!r}; use 'mlp', 'lenet', "
                f"{', '.join(map(repr, PIXEL_ENCODERS))} or an nn.Module"
            )
        hidden_dim = self.hidden_dim
        self.g = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, self.n_out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        raise NotImplementedError

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for two classes, (B, C) otherwise, from pooled vectors (B, H)."""
        out = self.g(z)
        return out.squeeze(-1) if self.n_out == 1 else out


def _of_top_class(maps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The (B, N) map of each bag's most probable class from (B, C, N) maps."""
    top = logits.argmax(dim=1)
    return maps[torch.arange(len(top), device=maps.device), top]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax over ``dim`` in float32; padded positions get exactly 0."""
    s = scores.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=dim).masked_fill(~mask, 0.0)


def _logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


@register_mil("instance_max")
class InstanceMax(MILModel):
    """mi-Net: an instance classifier, bag score = max of instance scores."""

    def forward(self, x, mask=None):
        mask = check_mask(x, mask)
        if self.n_out > 1:  # per class: the highest instance logit, then softmax over classes
            s = self.g(self.f(x)).float()  # (B, N, C)
            logits = s.masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
            maps = torch.softmax(s, dim=-1).masked_fill(~mask[..., None], 0.0).transpose(1, 2)
            return MILOutput(logits=logits, instance_scores=_of_top_class(maps, logits),
                             class_maps=maps)  # fmt: skip
        s = self.g(self.f(x)).squeeze(-1).float()  # (B, N) instance logits
        logits = s.masked_fill(~mask, float("-inf")).amax(dim=1)
        return MILOutput(logits=logits, instance_scores=torch.sigmoid(s).masked_fill(~mask, 0.0))


@register_mil("instance_mean")
class InstanceMean(MILModel):
    """mi-Net: an instance classifier, bag score = mean of instance scores."""

    def forward(self, x, mask=None):
        mask = check_mask(x, mask)
        if self.n_out > 1:  # mean of the instances' class probabilities; logits = their logs
            p = torch.softmax(self.g(self.f(x)).float(), dim=-1).masked_fill(~mask[..., None], 0.0)
            bag_p = p.sum(dim=1) / mask.sum(dim=1, keepdim=True)
            logits = torch.log(bag_p.clamp_min(1e-6))
            maps = p.transpose(1, 2)
            return MILOutput(logits=logits, instance_scores=_of_top_class(maps, logits),
                             class_maps=maps)  # fmt: skip
        s = self.g(self.f(x)).squeeze(-1).float()
        p = torch.sigmoid(s).masked_fill(~mask, 0.0)
        bag_p = p.sum(dim=1) / mask.sum(dim=1)
        return MILOutput(logits=_logit(bag_p), instance_scores=p)


@register_mil("embedding_max")
class EmbeddingMax(MILModel):
    """MI-Net: max pooling of instance embeddings, then the classifier."""

    def forward(self, x, mask=None):
        mask = check_mask(x, mask)
        h = self.f(x).float().masked_fill(~mask[..., None], float("-inf"))
        z = h.amax(dim=1)
        out = MILOutput(logits=self.head(z))
        if not self.training:  # which instances supply the pooled maxima
            arg = h.argmax(dim=1)  # (B, D)
            counts = torch.zeros(mask.shape, device=h.device).scatter_add_(
                1, arg, torch.ones_like(arg, dtype=torch.float32)
            )
            out.contributions = counts / h.shape[-1]
        return out


@register_mil("embedding_mean")
class EmbeddingMean(MILModel):
    """MI-Net: mean pooling of instance embeddings, then the classifier."""

    def forward(self, x, mask=None):
        mask = check_mask(x, mask)
        h = self.f(x).float().masked_fill(~mask[..., None], 0.0)
        z = h.sum(dim=1) / mask.sum(dim=1, keepdim=True)
        out = MILOutput(logits=self.head(z))
        if not self.training and self.n_out > 1:  # each class's probability from the instance alone
            maps = torch.softmax(self.g(h).float(), dim=-1).masked_fill(~mask[..., None], 0.0)
            out.class_maps = maps.transpose(1, 2)
            out.contributions = _of_top_class(out.class_maps, out.logits)
        elif not self.training:  # the bag probability each instance alone would give
            p = torch.sigmoid(self.g(h).squeeze(-1).float())
            out.contributions = p.masked_fill(~mask, 0.0)
        return out


@register_mil("attention")
class AttentionMIL(MILModel):
    """Attention pooling: ``a_k = softmax_k(w^T tanh(V h_k))``, ``z = sum_k a_k h_k``."""

    gated = False

    def __init__(self, in_dim, **kwargs):
        super().__init__(in_dim, **kwargs)
        self.V = nn.Linear(self.hidden_dim, self.attention_dim)
        self.U = nn.Linear(self.hidden_dim, self.attention_dim) if self.gated else None
        self.w = nn.Linear(self.attention_dim, self.n_classes if self.per_class else 1)

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores ``w^T (tanh(V h) [* sigm(U h)])``: (B, N), or (B, C, N) per class."""
        a = torch.tanh(self.V(h))
        if self.U is not None:
            a = a * torch.sigmoid(self.U(h))
        s = self.w(a)
        return s.transpose(1, 2) if self.per_class else s.squeeze(-1)

    def forward(self, x, mask=None):
        mask = check_mask(x, mask)
        h = self.f(x)
        if self.per_class:  # one attention branch and one classifier row per class
            a = masked_softmax(
                self.attention_scores(h), mask[:, None, :].expand(-1, self.n_classes, -1), dim=2
            )
            z = self.g[0](torch.bmm(a, h.float()))  # (B, C, hidden), dropout
            linear = self.g[1]
            logits = (z * linear.weight).sum(-1) + linear.bias
            return MILOutput(logits=logits, attention=_of_top_class(a, logits), class_maps=a)
        a = masked_softmax(self.attention_scores(h), mask)  # float32
        z = torch.bmm(a.unsqueeze(1), h.float()).squeeze(1)  # (B, hidden) in float32
        return MILOutput(logits=self.head(z).float(), attention=a)


@register_mil("gated_attention")
class GatedAttentionMIL(AttentionMIL):
    """Gated attention: ``a_k = softmax_k(w^T (tanh(V h_k) * sigm(U h_k)))``."""

    gated = True
