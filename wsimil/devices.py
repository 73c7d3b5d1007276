"""Where a stage computes: the torch device (``auto``, ``cpu``, ``cuda``) and CPU threads."""

from __future__ import annotations

import math
import os


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


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: cgroups, taskset, Slurm), else all."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def loader_workers(setting: int | None, device: str) -> int:
    """DataLoader workers of the embed stage: ``setting``, or automatic when it is None.

    On CUDA the loader must keep up with the GPU: every usable CPU but the one that drives the
    GPU, up to 16 (more only adds start-up time and memory). On the CPU the model and the
    loader share the cores: 2, the measured choice on the 2-core machine (docs/embed.md).
    """
    if setting is not None:
        return setting
    if device == "cuda":
        return spare_cpus()
    return 2


def spare_cpus(cap: int = 16) -> int:
    """Every usable CPU but one (the process that drives the work), at least 1, at most ``cap``."""
    return max(1, min(usable_cpus() - 1, cap))


SMALL_BAG = 1_000_000  # feature values per bag below which one thread is fastest


def train_threads(cfg, bags: list) -> int:
    """CPU threads for training: ``cfg.threads``, or 1 for small bags, else every usable CPU.

    A MIL head on small bags does too little work per step to share between threads: on a
    2-core machine with both cores busy, musk2 ran at 1.3 s/epoch on one thread and 4.5 s/epoch
    on two (`docs/results.md`). Larger bags (slide features) gain from more threads.
    """
    if cfg.threads:
        return cfg.threads
    largest = max((b.features.shape[0] for b in bags), default=0)
    if cfg.max_instances:
        largest = min(largest, cfg.max_instances)
    width = math.prod(bags[0].features.shape[1:]) if bags else 0  # tiles: S * S * 3
    if largest * width <= SMALL_BAG:
        return 1
    return usable_cpus()
