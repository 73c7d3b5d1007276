"""Trained-model files: everything needed to predict with, or resume from, a model.

A model folder (``models/<name>/``, or a fold's ``folds/r<repeat>_f<fold>/``) holds

- ``model.safetensors``: the tensors only, in safetensors (no code can be stored in it): the
  model's state dict under ``model.<key>`` and the training standardiser's per-feature mean and
  std under ``standardiser.mean`` and ``standardiser.std``;
- ``model.json``: everything else (format name and version, model name and arguments, input
  dimension, encoder, best epoch, split, training config, extras) and the SHA-256 of
  ``model.safetensors``, so a swapped or damaged weights file is refused.

The tensors are written first and ``model.json`` last, each atomically: a model whose
``model.json`` exists is complete. Nothing is unpickled: a model file can never run code when
loaded. A legacy ``checkpoint.pt`` (a pickle) is refused with a message saying to retrain.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from .bags import Standardiser
from .config import TrainConfig
from .mil import create_mil, list_mil_models
from .pixel_models import PIXEL_ENCODERS
from .store import atomic_output, write_text_atomic

MODEL_FORMAT = "wsimil-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
LEGACY_FILE = "checkpoint.pt"
MAX_CLASSES = 1000
_MODEL_PREFIX = "model."
_MEAN, _STD = "standardiser.mean", "standardiser.std"
_RETRAIN = "delete the model folder and retrain with `wsimil train`, or get the whole folder again"


def model_kwargs(cfg: TrainConfig, n_classes: int = 2, pixels: dict | None = None) -> dict:
    """The keyword arguments of :func:`wsimil.mil.create_mil` that a training config (and the
    number of classes of its labels, and for end-to-end models the pixel network's settings,
    :func:`pixel_settings`) sets."""
    extra = {"pixels": pixels} if pixels is not None else {}
    return {
        **extra,
        "hidden_dim": cfg.hidden_dim,
        "attention_dim": cfg.attention_dim,
        "dropout": cfg.dropout,
        "mlp_dims": cfg.mlp_dims,
        "instance_encoder": cfg.instance_encoder,
        "n_classes": n_classes,
        "per_class_attention": cfg.per_class_attention,
    }


def pixel_settings(cfg: TrainConfig, side: int, encoder: str | None) -> dict | None:
    """An end-to-end model's pixel network settings (None for a model on features)."""
    if cfg.instance_encoder not in PIXEL_ENCODERS:
        return None
    name = encoder if cfg.instance_encoder == "finetune" else None
    return {"side": int(side), "encoder": name, "train_blocks": cfg.train_blocks,
            "augment": cfg.augment}  # fmt: skip


def model_folder(path: str | Path) -> Path:
    """The model folder of ``path``: the folder itself, or the folder of one of its files."""
    path = Path(path)
    return path.parent if path.name in (META_FILE, WEIGHTS_FILE, LEGACY_FILE) else path


def has_model(path: str | Path) -> bool:
    """Whether the folder holds a model, complete (``model.json``) or legacy (``checkpoint.pt``)."""
    folder = model_folder(path)
    return (folder / META_FILE).is_file() or (folder / LEGACY_FILE).is_file()


def save_checkpoint(
    folder: str | Path,
    model,
    std: Standardiser,
    cfg: TrainConfig,
    *,
    encoder: str | None,
    best_epoch: int,
    split: dict,
    classes: list[str] = ("0", "1"),
    threshold: float | None = 0.5,
    **extras,
) -> None:
    """Write a trained model to ``folder``: ``model.safetensors``, then ``model.json``.

    Parameters
    ----------
    folder : str or Path
        The model folder (created when missing). Its ``model.json`` is removed first and
        written last, so the folder never shows a model whose files do not belong together;
        a legacy ``checkpoint.pt`` in it is removed.
    model : MILModel
        The trained model (built from ``cfg``: ``cfg.model`` and :func:`model_kwargs`).
    std : Standardiser
        The training standardiser.
    cfg : TrainConfig
        The training settings, kept in ``model.json`` (``config``).
    encoder : str or None
        The encoder whose features the model was trained on.
    best_epoch : int
        The epoch whose weights are kept.
    split : dict
        Bag id -> ``train``, ``val`` or ``test``.
    classes : list of str
        The class names in the order of the model's outputs (:mod:`wsimil.classes`).
    threshold : float or None
        The binary decision threshold chosen on the training slides (None: 3+ classes).
    **extras
        Further JSON-friendly items (e.g. ``repeat``, ``fold``), kept under ``extras``.
    """
    folder = model_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)
    tensors = {
        _MODEL_PREFIX + k: v.detach().to("cpu").clone().contiguous()
        for k, v in model.state_dict().items()
    }
    tensors[_MEAN] = torch.from_numpy(std.mean.copy())
    tensors[_STD] = torch.from_numpy(std.std.copy())
    from safetensors.torch import save

    blob = save(tensors)
    with atomic_output(folder / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(blob)
    meta = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": cfg.model,
        "model_kwargs": model_kwargs(cfg, len(classes), getattr(model, "pixels", None)),
        "in_dim": int(model.in_dim),
        "classes": [str(c) for c in classes],
        "threshold": threshold,
        "encoder": encoder,
        "best_epoch": int(best_epoch),
        "split": {str(k): v for k, v in split.items()},
        "config": cfg.model_dump(mode="json"),
        "extras": extras,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=2) + "\n")
    (folder / LEGACY_FILE).unlink(missing_ok=True)


def load_checkpoint(folder: str | Path) -> tuple[torch.nn.Module, Standardiser, dict]:
    """Rebuild a trained model from its folder, without unpickling anything.

    Parameters
    ----------
    folder : str or Path
        The model folder (or its ``model.json``).

    Returns
    -------
    model : MILModel
        In eval mode.
    std : Standardiser
        The training standardiser.
    meta : dict
        The validated contents of ``model.json`` (``config``, ``encoder``, ``split``,
        ``best_epoch``, ``extras``, ...).

    Raises
    ------
    FileNotFoundError
        The folder holds no model.
    ValueError
        One line naming the file and what to do: a legacy pickled ``checkpoint.pt``, a
        ``model.json`` that is not valid, or a ``model.safetensors`` that is missing, damaged,
        swapped (SHA-256 mismatch) or does not fit the model.
    """
    folder = model_folder(folder)
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file():
        legacy = folder / LEGACY_FILE
        if legacy.is_file():
            raise ValueError(
                f"{legacy}: refused: a model saved by an older wsimil as a pickle; wsimil no longer "
                f"unpickles model files because loading a pickle can run code; delete it and retrain with `wsimil train`"
            )
        raise FileNotFoundError(f"{meta_path}: no trained model; run `wsimil train` first")
    meta = _read_meta(meta_path)
    tensors = _read_tensors(weights_path, meta["weights_sha256"])
    model = create_mil(meta["model_name"], meta["in_dim"], **meta["model_kwargs"])
    state = {k[len(_MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
    _check_fits(weights_path, tensors, state, model, meta)
    model.load_state_dict(state, strict=True)
    model.eval()
    std = Standardiser(tensors[_MEAN].numpy(), tensors[_STD].numpy())
    return model, std, meta


# --------------------------------------------------------------------------------------------
# reading and validating


def _read_meta(path: Path) -> dict:
    """Parse and validate ``model.json``; any problem is one ValueError line naming the file."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable model file ({_short(exc)}); {_RETRAIN}") from exc
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{path}: not a valid wsimil model file ({problem}); {_RETRAIN}")
    meta.setdefault("classes", ["0", "1"])  # models before class names were binary 0/1
    meta.setdefault("threshold", 0.5)
    return meta


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _meta_problem(meta) -> str | None:
    """What is wrong with a parsed ``model.json``, or None."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, got {type(meta).__name__}"
    if meta.get("format") != MODEL_FORMAT:
        return f"format is {meta.get('format')!r}, not {MODEL_FORMAT!r}"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format_version {meta.get('format_version')!r} is not supported (this wsimil reads {FORMAT_VERSION})"
    if meta.get("model_name") not in list_mil_models():
        return (
            f"unknown model_name {meta.get('model_name')!r}; known: {', '.join(list_mil_models())}"
        )
    if not _is_int(meta.get("in_dim"), 1):
        return f"in_dim must be an integer > 0, got {meta.get('in_dim')!r}"
    problem = _kwargs_problem(meta.get("model_kwargs"))
    if problem:
        return problem
    checks = {
        "encoder": meta.get("encoder") is None or isinstance(meta.get("encoder"), str),
        "best_epoch": _is_int(meta.get("best_epoch")),
        "split": isinstance(meta.get("split"), dict)
        and all(isinstance(v, str) for v in meta["split"].values()),
        "config": isinstance(meta.get("config"), dict),
        "extras": isinstance(meta.get("extras"), dict),
        "weights_file": meta.get("weights_file") == WEIGHTS_FILE,
        "weights_sha256": isinstance(meta.get("weights_sha256"), str)
        and len(meta["weights_sha256"]) == 64
        and all(c in "0123456789abcdef" for c in meta["weights_sha256"]),
        "classes": _classes_ok(meta.get("classes", ["0", "1"]), meta["model_kwargs"]),
        "threshold": meta.get("threshold", 0.5) is None
        or (_is_number(meta.get("threshold", 0.5)) and 0 < meta.get("threshold", 0.5) < 1),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"bad or missing {', '.join(bad)}" if bad else None


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _classes_ok(classes, kwargs: dict) -> bool:
    """Distinct short names, as many as the model has classes."""
    return (
        isinstance(classes, list)
        and all(isinstance(c, str) and 0 < len(c) <= 64 for c in classes)
        and len(set(classes)) == len(classes) == kwargs.get("n_classes", 2)
    )


def _kwargs_problem(kwargs) -> str | None:
    """What is wrong with ``model_kwargs`` (only the keys and values a config can set), or None."""
    if not isinstance(kwargs, dict):
        return "model_kwargs must be an object"
    unknown = sorted(
        set(kwargs)
        - {"hidden_dim", "attention_dim", "dropout", "mlp_dims", "instance_encoder", "n_classes",
           "per_class_attention", "pixels"}
    )  # fmt: skip
    if unknown:
        return f"model_kwargs has unknown keys {', '.join(map(repr, unknown))}"
    dropout, dims = kwargs.get("dropout", 0.0), kwargs.get("mlp_dims")
    checks = {
        "hidden_dim": _is_int(kwargs.get("hidden_dim", 1), 1),
        "attention_dim": _is_int(kwargs.get("attention_dim", 1), 1),
        "dropout": isinstance(dropout, int | float) and not isinstance(dropout, bool)
        and math.isfinite(dropout) and 0 <= dropout < 1,
        "mlp_dims": dims is None or (isinstance(dims, list) and all(_is_int(d, 1) for d in dims)),
        "instance_encoder": kwargs.get("instance_encoder") in (None, "mlp", "lenet", *PIXEL_ENCODERS),
        "pixels": _pixels_ok(kwargs.get("pixels"), kwargs.get("instance_encoder")),
        "n_classes": _is_int(kwargs.get("n_classes", 2), 2) and kwargs.get("n_classes", 2) <= MAX_CLASSES,
        "per_class_attention": kwargs.get("per_class_attention", False) in (True, False),
    }  # fmt: skip
    bad = [k for k, ok in checks.items() if not ok]
    return f"bad model_kwargs {', '.join(bad)}" if bad else None


def _pixels_ok(pixels, instance_encoder) -> bool:
    """The pixel network's settings: present exactly for pixel models, of known keys and types."""
    if instance_encoder not in PIXEL_ENCODERS:
        return pixels is None
    if not isinstance(pixels, dict) or set(pixels) != {
        "side",
        "encoder",
        "train_blocks",
        "augment",
    }:
        return False
    name = pixels["encoder"]
    return (_is_int(pixels["side"], 8) and pixels["side"] <= 1024
            and _is_int(pixels["train_blocks"]) and pixels["train_blocks"] <= 1000
            and pixels["augment"] in (True, False)
            and (name is None if instance_encoder != "finetune"
                 else isinstance(name, str) and 0 < len(name) <= 200))  # fmt: skip


def _read_tensors(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, read once, checked against ``model.json``'s SHA-256."""
    from safetensors.torch import load

    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ValueError(
            f"{path}: cannot read the model weights ({_short(exc)}); {_RETRAIN}"
        ) from exc
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise ValueError(
            f"{path}: SHA-256 differs from the one in {META_FILE} (the weights file was replaced or damaged); {_RETRAIN}"
        )
    try:
        return load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors file ({_short(exc)}); {_RETRAIN}") from exc


def _check_fits(path: Path, tensors: dict, state: dict, model, meta: dict) -> None:
    """Refuse tensors that do not fit the model ``model.json`` describes (one ValueError line)."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in tensors if k not in (_MEAN, _STD) and not k.startswith(_MODEL_PREFIX)]
    unexpected += [k for k in state if k not in own]
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    for key in (_MEAN, _STD):
        t = tensors.get(key)
        if t is None or tuple(t.shape) != (meta["in_dim"],) or t.dtype != torch.float32:
            shapes.append(f"{key} must be float32 of shape ({meta['in_dim']},)")
    if shapes:
        problems.append(f"shape mismatches ({'; '.join(shapes[:3])})")
    if problems:
        raise ValueError(
            f"{path}: does not fit {meta['model_name']} with in_dim {meta['in_dim']}: {', '.join(problems)}; {_RETRAIN}"
        )


def _short(exc: BaseException) -> str:
    """An exception as one short line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
