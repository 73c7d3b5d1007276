"""Trained-model checkpoints: everything needed to predict with, or resume from, a model."""

from __future__ import annotations

from pathlib import Path

import torch

from .bags import Standardiser
from .config import TrainConfig
from .mil import create_mil


def model_kwargs(cfg: TrainConfig) -> dict:
    return {
        "hidden_dim": cfg.hidden_dim,
        "attention_dim": cfg.attention_dim,
        "dropout": cfg.dropout,
        "mlp_dims": cfg.mlp_dims,
        "instance_encoder": cfg.instance_encoder,
    }


def save_checkpoint(
    path: Path,
    model,
    std: Standardiser,
    cfg: TrainConfig,
    *,
    encoder: str | None,
    best_epoch: int,
    split: dict,
    **extra,
) -> None:
    """Write everything needed to predict with, or resume from, a trained model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model_name": cfg.model,
            "model_kwargs": model_kwargs(cfg),
            "in_dim": model.in_dim,
            "state_dict": model.state_dict(),
            "feature_mean": std.mean,
            "feature_std": std.std,
            "config": cfg.model_dump(),
            "encoder": encoder,
            "best_epoch": best_epoch,
            "split": split,
            **extra,
        },
        tmp,
    )
    tmp.replace(path)  # a checkpoint that exists is complete


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, Standardiser, dict]:
    """Rebuild a trained model from ``checkpoint.pt``; returns (model in eval mode, standardiser, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model checkpoint; run `wsimil train` first")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = create_mil(ckpt["model_name"], ckpt["in_dim"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, Standardiser(ckpt["feature_mean"], ckpt["feature_std"]), ckpt
