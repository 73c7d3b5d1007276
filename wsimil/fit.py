"""The training loop: a MIL head on bags, one bag per step, read top to bottom (:func:`fit`).

Adam, early stopping on the validation loss, class weighting or balanced sampling, bags
subsampled to ``max_instances`` per step, and the cohort's features held in memory up to a
budget (the rest read from their stores ahead of use). :mod:`wsimil.train` runs it per fold.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
import torch

from .bags import Bag, BagTensors, Standardiser
from .checkpoint import model_kwargs, pixel_settings
from .classes import probabilities
from .config import TrainConfig
from .devices import pick_device, train_threads
from .mil import create_mil
from .pixel_models import PIXEL_ENCODERS

#: instances per training step of an end-to-end model when ``max_instances`` is not set
PIXEL_MAX_INSTANCES = 256


@torch.inference_mode()
def predict_bags(model, tensors) -> tuple[np.ndarray, list]:
    """Class probabilities (K, C) and per-bag MIL outputs for K (N, D) tensors (any iterable).

    Two classes: column 1 is the probability of the positive class (:mod:`wsimil.classes`).
    """
    model.eval()
    device = next(model.parameters()).device
    probs, outs = [], []
    for x in tensors:
        out = model(x.to(device, non_blocking=True).unsqueeze(0))
        probs.append(probabilities(out.logits)[0].cpu().numpy())
        outs.append(out)
    return np.asarray(probs, dtype=np.float64).reshape(len(probs), -1), outs


def bag_loss(model, x: torch.Tensor, y: int, loss_fn) -> torch.Tensor:
    """The loss of one bag: BCE on its logit (two classes) or cross-entropy (three or more)."""
    out = model(x.unsqueeze(0))
    if out.logits.dim() == 1:
        return loss_fn(out.logits, torch.tensor([float(y)], device=x.device))
    return loss_fn(out.logits, torch.tensor([int(y)], device=x.device))


def build_model(cfg: TrainConfig, in_dim: int, n_classes: int = 2, *, side: int | None = None,
                encoder: str | None = None) -> torch.nn.Module:  # fmt: skip
    """The MIL model a config describes (instance transform f, pooling, classifier).

    End to end (``cfg.instance_encoder`` a pixel network): ``side`` is the tiles' side and
    ``encoder`` the registry encoder to fine-tune (``finetune``, with its pretrained weights).
    """
    pixels = pixel_settings(cfg, side or 0, encoder)
    if pixels is not None:
        pixels["pretrained"] = True
    return create_mil(cfg.model, in_dim, **model_kwargs(cfg, n_classes, pixels))


def bag_shape(bags: list[Bag]) -> tuple[int, int | None]:
    """The model's input width and, for tiles (N, S, S, 3), their side S (else None)."""
    shape = bags[0].features.shape
    return (3, int(shape[1])) if len(shape) == 4 else (int(shape[1]), None)


def step_instances(cfg: TrainConfig, side: int | None) -> int | None:
    """Instances per bag per training step: ``cfg.max_instances``; end to end 256 by default
    (a whole slide's tiles through a CNN with gradients would not fit in memory)."""
    if cfg.max_instances or side is None:
        return cfg.max_instances
    return PIXEL_MAX_INSTANCES


def _bag_tensors(train, val, std, memory_budget_gb, console) -> tuple[BagTensors, BagTensors]:
    """Standardised bags; over-budget cohorts keep what fits and read the rest ahead of use."""
    per_bag = memory_budget_gb * 2**30 / max(len(train) + len(val), 1)  # budget split by bag count
    xs_train = BagTensors(train, std, budget_bytes=per_bag * len(train))
    xs_val = BagTensors(val, std, budget_bytes=per_bag * len(val))
    streamed = xs_train.n_streamed + xs_val.n_streamed
    if console is not None and streamed:
        console.print(
            f"  {streamed} of {len(train) + len(val)} bags read from their stores at each use"
        )
    return xs_train, xs_val


def _val_loss(model, xs_val, y_val: np.ndarray, epoch: int) -> float:
    """Unweighted BCE (cross-entropy for 3+ classes) over the validation bags; without them,
    a falling number (keep the last)."""
    if not xs_val:
        return -float(epoch)
    probs, _ = predict_bags(model, xs_val)
    p = torch.tensor(probs).clamp(1e-6, 1 - 1e-6)
    if p.shape[1] == 2:
        return float(torch.nn.BCEWithLogitsLoss()(torch.logit(p[:, 1]), torch.tensor(y_val)))
    return float(torch.nn.NLLLoss()(torch.log(p), torch.tensor(y_val).long()))


def _loss_and_sampling(y: np.ndarray, n_classes: int, balance: str, device):
    """The loss (class-weighted under ``class_weight``) and each training bag's sampling
    probability (classes equally often, for ``sampling``)."""
    counts = np.maximum(np.bincount(y, minlength=n_classes).astype(float), 1.0)
    p_sample = 1.0 / (n_classes * counts[y])
    p_sample /= p_sample.sum()
    weighted = balance == "class_weight"
    if n_classes == 2:
        pos_weight = (
            torch.tensor([float(counts[0] / counts[1])], device=device) if weighted else None
        )
        return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight), p_sample
    weight = (
        torch.tensor(len(y) / (n_classes * counts), dtype=torch.float32, device=device)
        if weighted
        else None
    )
    return torch.nn.CrossEntropyLoss(weight=weight), p_sample


def fit(
    train: list[Bag],
    val: list[Bag],
    cfg: TrainConfig,
    *,
    seed: int | None = None,
    n_classes: int = 2,
    memory_budget_gb: float = 8.0,
    console=None,
    encoder: str | None = None,
) -> tuple[torch.nn.Module, Standardiser, pd.DataFrame, int]:
    """Train a MIL model, one bag per step; early stopping on the validation loss; returns the best model.

    Features are standardised with statistics of ``train`` only. Bags longer than
    ``cfg.max_instances`` are subsampled per step (training only). Class imbalance is
    handled by ``cfg.balance`` (two classes: the positive class's BCE weight; three or more:
    cross-entropy class weights ``n / (C n_c)``; or sampling each class equally often).
    ``n_classes`` > 2 trains a softmax head; bag labels are class indices. Bags held in their stores (over-budget cohorts) are cached in
    memory up to ``memory_budget_gb`` and the rest read ahead of each step (:class:`BagTensors`).

    On the CPU, denormal floats are flushed to zero while training: once a model fits its
    bags, gradients and Adam's second moments fall below 1e-38 and each operation on them
    costs many cycles (an end-to-end CNN's epochs grew from 17 s to 90 s; 69 against 26 ms per
    step in isolation). Values that small change no weight that matters.

    Returns
    -------
    model, standardiser, history (epoch, train_loss, val_loss, seconds), best_epoch
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(train_threads(cfg, train))
    was_flushing = float(torch.tensor([1e-39]) * 1.0) == 0.0  # torch has no getter
    flushing = torch.set_flush_denormal(True)  # False where the CPU cannot (nothing changed)
    try:
        return _fit(train, val, cfg, seed=seed, n_classes=n_classes,
                    memory_budget_gb=memory_budget_gb, console=console, encoder=encoder)  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # no change to the rest of the process
        if flushing and not was_flushing:
            torch.set_flush_denormal(False)


def _fit(
    train: list[Bag],
    val: list[Bag],
    cfg: TrainConfig,
    *,
    seed: int | None = None,
    n_classes: int = 2,
    memory_budget_gb: float = 8.0,
    console=None,
    encoder: str | None = None,
) -> tuple[torch.nn.Module, Standardiser, pd.DataFrame, int]:
    """:func:`fit` on the threads it set."""
    seed = cfg.seed if seed is None else seed
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    in_dim, side = bag_shape(train)
    if (side is None) == (cfg.instance_encoder in PIXEL_ENCODERS):
        raise ValueError(
            f"--instance-encoder {cfg.instance_encoder} trains on "
            + ("tiles (the tile cache)" if side is None else "features, but these bags are tiles")
        )
    std = (
        Standardiser.fit(train)
        if cfg.standardise and side is None
        else Standardiser(np.zeros(in_dim), np.ones(in_dim))  # tiles: the network normalises
    )
    xs_train, xs_val = _bag_tensors(train, val, std, memory_budget_gb, console)
    y_train = np.array([b.label for b in train], np.int64)
    y_val = np.array([b.label for b in val], np.float32 if n_classes == 2 else np.int64)

    device = torch.device(pick_device(cfg.device))
    model = build_model(cfg, in_dim, n_classes, side=side, encoder=encoder).to(device)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=(0.9, 0.999),
        weight_decay=cfg.weight_decay,
    )
    cap = step_instances(cfg, side)
    loss_fn, p_sample = _loss_and_sampling(y_train, n_classes, cfg.balance, device)

    best = (float("inf"), copy.deepcopy(model.state_dict()), 0)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        if cfg.balance == "sampling":
            order = rng.choice(len(xs_train), len(xs_train), replace=True, p=p_sample)
        else:
            order = rng.permutation(len(xs_train))
        for i, x in xs_train.items(order):
            if cap and len(x) > cap:
                x = x[torch.from_numpy(rng.choice(len(x), cap, replace=False))]
            loss = bag_loss(model, x.to(device, non_blocking=True), y_train[i], loss_fn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        val_loss = _val_loss(model, xs_val, y_val, epoch)
        history.append({"epoch": epoch, "train_loss": total / len(xs_train),
                        "val_loss": val_loss, "seconds": time.perf_counter() - t0})  # fmt: skip
        if val_loss < best[0] - 1e-4:
            best = (val_loss, copy.deepcopy(model.state_dict()), epoch)
        elif epoch - best[2] >= cfg.patience:
            break
        if console is not None and (epoch % 5 == 0 or epoch == 1):
            console.print(
                f"  epoch {epoch:3d}  train loss {history[-1]['train_loss']:.4f}  val loss {val_loss:.4f}"
            )
    model.load_state_dict(best[1])
    model.to("cpu").eval()  # saved and scored from the CPU
    return model, std, pd.DataFrame(history), best[2]
