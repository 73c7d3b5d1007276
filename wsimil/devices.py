"""Picking the torch device of a stage: ``auto`` (CUDA when visible), ``cpu`` or ``cuda``."""

from __future__ import annotations


def pick_device(name: str) -> str:
    """``"cuda"`` or ``"cpu"`` for a ``--device`` value.

    Raises
    ------
    RuntimeError
        ``cuda`` asked for where no CUDA device is visible (one line saying what to use).
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return name
