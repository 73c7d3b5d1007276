"""The encoder registry and the one factory, :func:`create_encoder`.

Named entries register themselves with :func:`register_encoder` (see
:mod:`wsimil.encoders.builtin`); names not in the registry fall back to the generic timm and
``hf-hub:`` builders of :mod:`wsimil.encoders.generic`. This module must not import the
modules that register entries (they import it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm

from .base import Encoder
from .generic import _build_hf_hub, _build_timm
from .weights import _load_checkpoint

__all__ = ["create_encoder", "list_encoders", "register_encoder"]

_REGISTRY: dict[str, Callable[[bool], Encoder]] = {}


def register_encoder(name: str) -> Callable[[Callable[[bool], Encoder]], Callable[[bool], Encoder]]:
    """Decorator registering ``builder(pretrained: bool) -> Encoder`` under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is already registered.
    """

    def deco(builder: Callable[[bool], Encoder]) -> Callable[[bool], Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return deco


def list_encoders() -> list[str]:
    """Registered encoder names (any timm model name and ``hf-hub:ORG/NAME`` also work)."""
    return sorted(_REGISTRY)


def create_encoder(
    name: str, *, pretrained: bool = True, checkpoint: str | Path | None = None
) -> Encoder:
    """Build a frozen encoder in eval mode.

    Parameters
    ----------
    name : str
        A registered name (:func:`list_encoders`), ``timm:<model>``, a plain timm model name
        (``resnet18``, ``resnet50.a1_in1k``) or ``hf-hub:<org>/<name>[@revision]``.
    pretrained : bool
        Load pretrained weights (from local files only). ``False`` gives random init
        (``weights_id="random-init"``), for tests and benchmarks.
    checkpoint : str or Path, optional
        A local weights file for the architecture ``name`` names: a ``.safetensors`` file or
        a plain state dict (``.pth``, ``.bin``, possibly wrapped in ``{"state_dict": ...}`` or
        ``{"model": ...}``), read with ``torch.load(weights_only=True)``, which builds tensors
        and plain containers only. Nothing is fully unpickled: a whole ``torch.save``-d
        ``nn.Module`` (or anything else the restricted unpickler refuses) is refused, since
        loading it could run code from the file; convert a file you trust once with
        ``torch.save(model.state_dict(), "weights.pth")`` or to safetensors. Takes precedence
        over ``pretrained``. Every backbone weight must be present; only classifier (and
        truncated) keys may be left over.

    Returns
    -------
    Encoder
        In eval mode with ``requires_grad=False``.

    Raises
    ------
    ValueError
        Unknown name; a checkpoint that does not fit the architecture, is not readable, or
        would need full unpickling.
    FileNotFoundError
        ``checkpoint`` does not exist.
    MissingWeightsError
        Pretrained weights are not available locally.
    """
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_file():
            raise FileNotFoundError(f"encoder checkpoint not found: {checkpoint}")
    use_pretrained = bool(pretrained) and checkpoint is None
    if name in _REGISTRY:
        encoder = _REGISTRY[name](use_pretrained)
    elif name.startswith("hf-hub:"):
        encoder = _build_hf_hub(name, use_pretrained)
    else:
        arch = name[len("timm:") :] if name.startswith("timm:") else name
        if not arch or not timm.is_model(arch):
            raise ValueError(
                f"unknown encoder {name!r}: registered encoders are {', '.join(list_encoders())}; "
                "any timm model name (e.g. 'resnet18' or 'timm:convnext_tiny') or 'hf-hub:ORG/NAME' also works"
            )
        encoder = _build_timm(name, arch, use_pretrained)
    if checkpoint is not None:
        _load_checkpoint(encoder, checkpoint)
    return encoder.freeze()
