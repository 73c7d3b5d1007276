"""The deployable model of a training run, described by its card, and scoring with it.

``wsimil train`` ends every protocol with ``models/<name>/card.json``, the file a user copies
with the folder to another site. It names:

- ``kind``: ``single`` (holdout, split column: the model in the folder itself) or ``ensemble``
  (cross-validation: the fold models under ``folds/``, whose probabilities are averaged, as are
  their attention and per-tile maps);
- ``members``: the model folders, relative to the card (``.`` or ``folds/r<i>_f<j>``);
- ``classes``: the class names in the order of the model's outputs (two: the second is the
  positive class); ``threshold``: where a binary slide is called positive (a number, or chosen
  by Youden's rule on each model's training slides: ``threshold_rule``), ``null`` for three or
  more classes (the most probable class is the prediction);
- ``features``: the encoder (name, weights id, input size, mean/std...) and the tile geometry
  (target mpp, tile px) of the features it was trained on. Features made otherwise are refused,
  slide by slide (:func:`check_features`);
- ``training``: slides, manifest digest, protocol; ``metrics``: test metrics; ``versions``.

Members are loaded with :func:`wsimil.checkpoint.load_checkpoint` (safetensors + JSON, nothing
unpickled). A folder with a ``model.json`` and no card (a holdout model of an older run) loads as
a single model without the feature checks.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .store import write_text_atomic

CARD_FILE = "card.json"
#: splits a model learnt from or was tuned on: shown, never counted in held-out metrics
SEEN_SPLITS = ("train", "val")
CARD_FORMAT = "wsimil-model-card"
_MEMBER = re.compile(r"\.|folds/r\d{1,4}_f\d{1,4}")
#: tile settings that must match between a model's training features and new features
TILE_KEYS = ("target_mpp", "tile_px")
#: encoder settings that are not part of what the features are
_ENCODER_IGNORED = ("preferred_dtype",)


def feature_signature(store_attrs: dict) -> dict:
    """What a feature store's features are: its encoder and tile geometry (from its attrs)."""
    enc = {
        k: v for k, v in dict(store_attrs.get("encoder") or {}).items() if k not in _ENCODER_IGNORED
    }
    tiles = dict(store_attrs.get("tiles") or {})
    return {"encoder": enc, "tiles": {k: tiles.get(k) for k in TILE_KEYS}}


def write_card(model_dir: Path, *, kind: str, members: list[str], cfg, classes: list[str],
               decision: dict, features: dict | None, training: dict, metrics: dict) -> Path:  # fmt: skip
    """Write ``card.json`` (last, atomically) for the trained model in ``model_dir``."""
    import torch

    from . import __version__

    card = {
        "format": CARD_FORMAT,
        "format_version": 1,
        "kind": kind,
        "members": members,
        "model": cfg.model,
        "classes": [str(c) for c in classes],
        **decision,
        "features": features,
        "training": training,
        "metrics": metrics,
        "versions": {"wsimil": __version__, "torch": torch.__version__},
    }
    path = Path(model_dir) / CARD_FILE
    write_text_atomic(path, json.dumps(card, indent=2, default=float) + "\n")
    return path


def read_card(model_dir: Path) -> dict:
    """The validated card of ``model_dir``; one-line ValueError naming the file otherwise."""
    path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a readable model card ({exc}); retrain or copy the folder again"
        ) from exc
    members = card.get("members") if isinstance(card, dict) else None
    if card.get("format") != CARD_FORMAT or card.get("kind") not in ("single", "ensemble"):
        raise ValueError(f"{path}: not a wsimil model card; retrain or copy the folder again")
    if (
        not isinstance(members, list)
        or not members
        or not all(isinstance(m, str) and _MEMBER.fullmatch(m) for m in members)
    ):
        raise ValueError(f"{path}: 'members' must list '.' or folds/r<i>_f<j> folders")
    classes, threshold = card.get("classes", [0, 1]), card.get("threshold", 0.5)
    if not (isinstance(classes, list) and 2 <= len(classes) <= 1000
            and len({str(c) for c in classes}) == len(classes)
            and all(isinstance(c, str | int) and 0 < len(str(c)) <= 64 for c in classes)):  # fmt: skip
        raise ValueError(f"{path}: 'classes' must list 2 or more distinct class names")
    if threshold is not None and not (isinstance(threshold, int | float) and 0 < threshold < 1):
        raise ValueError(f"{path}: 'threshold' must be a number between 0 and 1, or null")
    return card


class Predictor:
    """A deployable model: one or several members, each with its own standardiser.

    Parameters
    ----------
    members : list of (model, standardiser)
    card : dict or None
        The model card (None for a folder without one).
    """

    def __init__(self, members: list, card: dict | None, folder: Path):
        self.members, self.card, self.folder = members, card, folder
        self.meta = members[0][2]
        self.in_dim = int(self.meta["in_dim"])
        self.encoder = (card or {}).get("features", {}) or {}
        self.classes = [str(c) for c in (card or self.meta).get("classes", ["0", "1"])]
        threshold = (card or self.meta).get("threshold", 0.5)
        self.threshold = None if len(self.classes) > 2 else float(threshold or 0.5)
        self.device = "cpu"

    def to(self, device: str) -> Predictor:
        """Score on ``device`` (``auto``, ``cpu`` or ``cuda``; :func:`wsimil.devices.pick_device`)."""
        from .devices import pick_device

        self.device = pick_device(device)
        for model, _, _ in self.members:
            model.to(self.device)
        return self

    def split_of(self, slide_id: str) -> str:
        """What the model saw of a slide: its split (``train``, ``val``, ``test``) or ``external``.

        An ensemble of fold models has trained on every slide of its cohort (each is a test
        slide of one fold only), so those are ``train``.
        """
        splits = [m[2].get("split") or {} for m in self.members]
        if len(splits) == 1:
            return str(splits[0].get(slide_id, "external"))
        return "train" if any(slide_id in s for s in splits) else "external"

    @property
    def encoder_name(self) -> str | None:
        enc = self.encoder.get("encoder") or {}
        return enc.get("name") or self.meta.get("encoder")

    @property
    def pixel_side(self) -> int | None:
        """End-to-end models: the side of the cached tiles they read (else None, features)."""
        pixels = self.meta["model_kwargs"].get("pixels")
        return int(pixels["side"]) if pixels else None

    def decide(self, probs: np.ndarray) -> tuple[float, str]:
        """The reported probability and predicted class name of class probabilities (C,)."""
        from .classes import decide

        return decide(probs, self.classes, self.threshold)

    def score(self, features: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray | None]]:
        """Class probabilities and per-tile maps for (N, D) features, averaged over members.

        Returns
        -------
        probs : (C,) array (binary: [1 - p, p])
        maps : dict of arrays or None: ``attention``, ``instance_scores``, ``contributions``
            (N,) and ``class_maps`` (C, N) (3+ classes: each class's map; the (N,) map is then
            the predicted class's, taken after averaging)
        """
        import torch

        from .classes import probabilities

        probs, maps = [], {"attention": [], "instance_scores": [], "contributions": [],
                           "class_maps": []}  # fmt: skip
        with torch.inference_mode():
            for model, std, _ in self.members:
                out = model(std(features).to(self.device).unsqueeze(0))
                probs.append(probabilities(out.logits)[0].cpu().numpy())
                for k in maps:
                    v = getattr(out, k)
                    if v is not None:
                        maps[k].append(v[0].float().cpu().numpy())
        mean = {k: (np.mean(v, axis=0) if v else None) for k, v in maps.items()}
        p = np.mean(probs, axis=0)
        if mean["class_maps"] is not None:  # the ensemble's predicted class's map
            top = mean["class_maps"][int(np.argmax(p))]
            for k in ("attention", "instance_scores", "contributions"):
                if mean[k] is not None:
                    mean[k] = top
        return p, mean


def load_model(folder: str | Path) -> Predictor:
    """The deployable model of ``folder`` (a model folder, wherever it lives)."""
    from .checkpoint import META_FILE, load_checkpoint

    folder = Path(folder)
    if (folder / CARD_FILE).is_file():
        card = read_card(folder)
        members = [load_checkpoint(folder / m) for m in card["members"]]
        if any(m[2]["classes"] != [str(c) for c in card.get("classes", [0, 1])] for m in members):
            raise ValueError(f"{folder / CARD_FILE}: its classes differ from its models'; "
                             "retrain or copy the folder again")  # fmt: skip
        return Predictor(members, card, folder)
    if (folder / META_FILE).is_file() or (folder / "checkpoint.pt").is_file():
        return Predictor([load_checkpoint(folder)], None, folder)
    raise FileNotFoundError(
        f"{folder}: no trained model there (no {CARD_FILE}); run `wsimil train` first, or pass "
        "--model with a model name or the path of a model folder"
    )


def check_features(predictor: Predictor, store_attrs: dict, slide_id: str) -> None:
    """Refuse features that are not what the model was trained on (one line naming the slide)."""
    want = predictor.encoder
    if not want:
        return
    got = feature_signature(store_attrs)
    for part in ("encoder", "tiles"):
        diff = sorted(
            k for k in set(want[part]) | set(got[part]) if want[part].get(k) != got[part].get(k)
        )
        if diff:
            k = diff[0]
            raise ValueError(
                f"{slide_id}: features made with {part} {k}={got[part].get(k)!r}, the model was "
                f"trained on {want[part].get(k)!r} ({', '.join(diff)} differ); embed this cohort "
                "with the model's encoder and tile settings (see its card.json)"
            )


def training_features(layout, encoder: str, slide_ids: list[str]) -> dict | None:
    """The features' signature (:func:`wsimil.deploy.feature_signature`), the same for all slides.

    Raises
    ------
    ValueError
        Slides whose features were made with other encoder or tile settings (named).
    """
    return _one_signature({sid: layout.feature_store(encoder, sid) for sid in slide_ids},
                          "features", "other encoder or tile settings; re-embed")  # fmt: skip


def training_pixels(layout, px: int, slide_ids: list[str]) -> dict | None:
    """The same for an end-to-end model: its tile caches' signature
    (``{"encoder": {"name": "pixels", "px": px}, "tiles": ...}``), the same for all slides."""
    return _one_signature({sid: layout.tile_cache_store(px, sid) for sid in slide_ids},
                          "tiles", "other tile settings; re-tile")  # fmt: skip


def _one_signature(stores: dict, what: str, fix: str) -> dict | None:
    """:func:`feature_signature` of every store (slide id -> path), or ValueError naming two that differ."""
    from .store import store_attrs

    sig, first = None, None
    for sid, path in stores.items():
        this = feature_signature(store_attrs(path) or {})
        if sig is None:
            sig, first = this, sid
        elif this != sig:
            raise ValueError(
                f"{what} of {sid} and {first} were made with {fix} the cohort with one setting "
                "before training"
            )
    return sig


def manifest_digest(manifest: pd.DataFrame) -> str:
    """SHA-256 of the manifest rows a model was trained on (as CSV)."""
    return hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()
