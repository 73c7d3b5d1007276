"""Encoders for names outside the registry: any timm model and timm-format ``hf-hub:`` repos.

:func:`~wsimil.encoders.create_encoder` falls back to :func:`_build_hf_hub` for
``hf-hub:<org>/<name>[@revision]`` and to :func:`_build_timm` for ``timm:<model>`` or a plain
timm model name. :func:`_timm_model` (timm with local-cache weights only) and
:func:`_wrap_timm` (input config from timm's data config) are also the building blocks for
named entries in :mod:`wsimil.encoders.builtin`.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch import nn

from .base import Encoder, EncoderConfig, MissingWeightsError
from .weights import _HF_WEIGHT_FILES, _find_timm_weights, _hf_cache_dir, _hf_cached


def _build_timm(name: str, arch: str, pretrained: bool) -> Encoder:
    model, weights_id = _timm_model(arch, pretrained, num_classes=0)
    return _wrap_timm(name, model, weights_id)


def _build_hf_hub(name: str, pretrained: bool) -> Encoder:
    repo = name[len("hf-hub:") :]
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1:
        raise ValueError(f"encoder {name!r}: expected 'hf-hub:ORG/NAME[@revision]'")
    cache = _hf_cache_dir()
    fetch = (
        f"on a machine with access run `hf auth login` and `hf download {repo_id}` (older clients: "
        f"`huggingface-cli login` and `huggingface-cli download {repo_id}`) after accepting the model "
        f"licence on https://huggingface.co/{repo_id}, then copy the cache or point HF_HOME at it"
    )
    cfg_path = _hf_cached(repo_id, "config.json", cache, revision or None)
    if cfg_path is None:
        raise MissingWeightsError(
            f"{name}: {repo_id} is not in the local Hugging Face cache ({cache}); {fetch}"
        )
    snapshot = cfg_path.parent
    with open(cfg_path, encoding="utf-8") as fh:
        hub_cfg = json.load(fh)
    if "architecture" not in hub_cfg:
        raise ValueError(
            f"{name}: {cfg_path} has no 'architecture'; only timm-format hub models are supported"
        )
    if pretrained and not any((snapshot / f).is_file() for f in _HF_WEIGHT_FILES):
        raise MissingWeightsError(
            f"{name}: config of {repo_id} is cached in {snapshot} but no weights file ({', '.join(_HF_WEIGHT_FILES)}); {fetch}"
        )
    # timm's 'local-dir:' source reads config.json and the weights from the snapshot folder.
    model = timm.create_model(f"local-dir:{snapshot}", pretrained=pretrained, num_classes=0)
    weights_id = f"hf-hub:{repo_id}@{snapshot.name}" if pretrained else "random-init"
    return _wrap_timm(name, model, weights_id)


def _wrap_timm(name: str, model: nn.Module, weights_id: str) -> Encoder:
    data_cfg = timm.data.resolve_data_config({}, model=model)
    interp = data_cfg.get("interpolation", "bilinear")
    cls = model.pretrained_cfg.get("classifier") if getattr(model, "pretrained_cfg", None) else None
    prefixes = tuple(f"{c}." for c in ([cls] if isinstance(cls, str) else (cls or ())))
    has_norm_or_attn = any(
        isinstance(m, nn.LayerNorm | nn.MultiheadAttention) for m in model.modules()
    )
    cfg = EncoderConfig(
        name=name,
        weights_id=weights_id,
        input_px=int(data_cfg["input_size"][-1]),
        mean=tuple(float(v) for v in data_cfg["mean"]),
        std=tuple(float(v) for v in data_cfg["std"]),
        interpolation=interp if interp in ("bilinear", "bicubic") else "bilinear",
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        preferred_dtype="bfloat16" if has_norm_or_attn else "float16",
    )
    return Encoder(model, cfg, ignore_prefixes=prefixes)


def _timm_model(arch: str, pretrained: bool, **kwargs) -> tuple[nn.Module, str]:
    """``timm.create_model`` with pretrained weights from local caches only."""
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs), "random-init"
    try:
        pcfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as exc:  # invalid pretrained tag
        raise ValueError(f"encoder {arch!r}: {exc}") from exc
    if pcfg is None:
        raise MissingWeightsError(
            f"timm has no pretrained weights for {arch!r}; pass checkpoint=PATH or pretrained=False"
        )
    full = f"{pcfg.architecture}.{pcfg.tag}" if pcfg.tag else pcfg.architecture
    path, where = _find_timm_weights(pcfg)
    if path is None:
        cache = _hf_cache_dir()
        if pcfg.hf_hub_id:
            fetch = (
                f"on a machine with network run `hf download {pcfg.hf_hub_id}` (older clients: "
                f"`huggingface-cli download {pcfg.hf_hub_id}`) and copy the cache here or point HF_HOME at it"
            )
            what = f"Hugging Face repo {pcfg.hf_hub_id}"
        else:
            fetch = f"download {pcfg.url} into {Path(torch.hub.get_dir()) / 'checkpoints'}"
            what = pcfg.url
        raise MissingWeightsError(
            f"pretrained weights for {full} ({what}) are not in the local cache ({cache}); {fetch}; "
            "or pass checkpoint=PATH, or pretrained=False for random init"
        )
    model = timm.create_model(
        arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
    )
    return model, f"timm:{full}@{where}"
