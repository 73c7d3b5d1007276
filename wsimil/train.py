"""``wsimil train``: a MIL head on bags of patch embeddings, with slide labels only.

Reads ``features/<encoder>/<slide_id>.zarr`` for the slides of the manifest, splits them
(seeded, stratified, by ``case_id`` when given so a patient never straddles train and test),
trains with Adam and early stopping on the validation loss, and writes ``models/<name>/``:
``checkpoint.pt`` (everything needed to predict or resume), ``predictions.csv``,
``metrics.csv``, ``history.csv`` and ``config.yaml``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import TrainConfig, save_config
from .mil import create_mil
from .store import open_store


@dataclass
class Bag:
    """One bag: a slide's tile features and its label."""

    bag_id: str
    features: np.ndarray  # (N, D) float32
    label: int
    group: str  # case_id, or bag_id when there is none


def load_slide_bags(
    manifest: pd.DataFrame,
    features_dir: str | Path,
    *,
    label_column: str = "label",
    memory_budget_gb: float = 8.0,
    console=None,
) -> tuple[list[Bag], list[dict]]:
    """Load the feature bags of the manifest's slides.

    Slides without a feature store or with 0 tiles are skipped (and reported). The total size is
    checked against ``memory_budget_gb`` before anything is loaded.

    Returns
    -------
    bags : list of Bag
    skipped : list of dict(slide_id, reason)
    """
    features_dir = Path(features_dir)
    present, skipped = [], []
    total_bytes = 0
    for rec in manifest.itertuples(index=False):
        store = features_dir / f"{rec.slide_id}.zarr"
        if not store.exists():
            skipped.append({"slide_id": rec.slide_id, "reason": f"no feature store at {store}"})
            continue
        g = open_store(store)
        n, d = g["features"].shape
        if n == 0:
            skipped.append({"slide_id": rec.slide_id, "reason": "0 tiles"})
            continue
        total_bytes += n * d * 4
        present.append((rec, g))
    if total_bytes > memory_budget_gb * 2**30:
        raise MemoryError(
            f"{features_dir}: the cohort's features need {total_bytes / 2**30:.1f} GiB as float32, over the "
            f"{memory_budget_gb} GiB budget; raise --memory-budget-gb or train on fewer slides"
        )
    bags = []
    for rec, g in present:
        label = getattr(rec, label_column)
        case = getattr(rec, "case_id", None)
        group = str(case) if case is not None and not pd.isna(case) else str(rec.slide_id)
        bags.append(Bag(str(rec.slide_id), np.asarray(g["features"][...], dtype=np.float32), int(label), group))
    if console is not None:
        for s in skipped:
            console.print(f"[yellow]skip[/yellow] {s['slide_id']}: {s['reason']}")
    return bags, skipped


def split_bags(bags: list[Bag], *, test_fraction: float, val_fraction: float, seed: int) -> dict[str, str]:
    """Seeded split into train/val/test, stratified by label, grouped by ``Bag.group``.

    Returns
    -------
    dict bag_id -> "train" | "val" | "test"
    """
    from sklearn.model_selection import train_test_split

    groups = sorted({b.group for b in bags})
    glabel = {g: 0 for g in groups}
    for b in bags:
        glabel[b.group] = max(glabel[b.group], b.label)

    def take(pool: list[str], fraction: float, rs: int) -> tuple[list[str], list[str]]:
        y = [glabel[g] for g in pool]
        try:  # stratified when every class has enough groups, plain otherwise (tiny cohorts)
            return train_test_split(pool, test_size=fraction, random_state=rs, stratify=y)
        except ValueError:
            return train_test_split(pool, test_size=fraction, random_state=rs)

    g_trainval, g_test = take(groups, test_fraction, seed)
    g_train, g_val = take(g_trainval, val_fraction, seed + 1)
    where = {**{g: "train" for g in g_train}, **{g: "val" for g in g_val}, **{g: "test" for g in g_test}}
    return {b.bag_id: where[b.group] for b in bags}


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 and ROC AUC (NaN when one class is missing)."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(probs) >= threshold).astype(int)
    out = {
        "n": len(labels),
        "accuracy": accuracy_score(labels, pred) if len(labels) else float("nan"),
        "precision": precision_score(labels, pred, zero_division=0),
        "recall": recall_score(labels, pred, zero_division=0),
        "f1": f1_score(labels, pred, zero_division=0),
        "auc": roc_auc_score(labels, probs) if len(set(labels.tolist())) == 2 else float("nan"),
    }
    return {k: (float(v) if k != "n" else int(v)) for k, v in out.items()}


class Standardiser:
    """Per-feature mean/std from the training bags only."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = mean.astype(np.float32)
        self.std = np.maximum(std, 1e-6).astype(np.float32)

    @classmethod
    def fit(cls, bags: list[Bag]) -> Standardiser:
        n = sum(len(b.features) for b in bags)
        s = sum(b.features.sum(0, dtype=np.float64) for b in bags)
        mean = s / n
        ss = sum(((b.features - mean) ** 2).sum(0, dtype=np.float64) for b in bags)
        return cls(mean, np.sqrt(ss / max(n - 1, 1)))

    def __call__(self, features: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((features - self.mean) / self.std)


def bag_loss(model, x: torch.Tensor, y: float, loss_fn) -> torch.Tensor:
    out = model(x.unsqueeze(0))
    return loss_fn(out.logits, torch.tensor([y], dtype=torch.float32))


@torch.inference_mode()
def predict_bags(model, tensors: list[torch.Tensor]) -> tuple[np.ndarray, list]:
    """Bag probabilities (K,) and per-bag MIL outputs for a list of (N, D) tensors."""
    model.eval()
    probs, outs = [], []
    for x in tensors:
        out = model(x.unsqueeze(0))
        probs.append(float(torch.sigmoid(out.logits)[0]))
        outs.append(out)
    return np.asarray(probs), outs


def fit(train: list[Bag], val: list[Bag], cfg: TrainConfig, *, console=None) -> tuple[torch.nn.Module, Standardiser, pd.DataFrame, int]:
    """Train a MIL model; early stopping on the validation loss; returns the best model.

    Returns
    -------
    model, standardiser, history (epoch, train_loss, val_loss, seconds), best_epoch
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    in_dim = train[0].features.shape[1]
    std = Standardiser.fit(train)
    xs_train = [std(b.features) for b in train]
    xs_val = [std(b.features) for b in val]
    y_train = np.array([b.label for b in train], np.float32)
    y_val = np.array([b.label for b in val], np.float32)

    model = create_mil(cfg.model, in_dim, hidden_dim=cfg.hidden_dim, attention_dim=cfg.attention_dim, dropout=cfg.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    n_pos = max(y_train.sum(), 1.0)
    n_neg = max(len(y_train) - y_train.sum(), 1.0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([n_neg / n_pos]))
    eval_loss_fn = torch.nn.BCEWithLogitsLoss()

    best = (float("inf"), copy.deepcopy(model.state_dict()), 0)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        for i in rng.permutation(len(xs_train)):
            x = xs_train[i]
            if cfg.max_instances and len(x) > cfg.max_instances:
                x = x[torch.from_numpy(rng.choice(len(x), cfg.max_instances, replace=False))]
            loss = bag_loss(model, x, y_train[i], loss_fn)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        probs, _ = predict_bags(model, xs_val)
        val_loss = float(eval_loss_fn(torch.logit(torch.tensor(probs).clamp(1e-6, 1 - 1e-6)), torch.tensor(y_val)))
        history.append({"epoch": epoch, "train_loss": total / len(xs_train), "val_loss": val_loss, "seconds": time.perf_counter() - t0})
        if val_loss < best[0] - 1e-4:
            best = (val_loss, copy.deepcopy(model.state_dict()), epoch)
        elif epoch - best[2] >= cfg.patience:
            break
        if console is not None and (epoch % 5 == 0 or epoch == 1):
            console.print(f"  epoch {epoch:3d}  train loss {history[-1]['train_loss']:.4f}  val loss {val_loss:.4f}")
    model.load_state_dict(best[1])
    model.eval()
    return model, std, pd.DataFrame(history), best[2]


def save_checkpoint(path: Path, model, std: Standardiser, cfg: TrainConfig, *, encoder: str | None, best_epoch: int, split: dict) -> None:
    torch.save(
        {
            "model_name": cfg.model,
            "model_kwargs": {"hidden_dim": cfg.hidden_dim, "attention_dim": cfg.attention_dim, "dropout": cfg.dropout},
            "in_dim": model.in_dim,
            "state_dict": model.state_dict(),
            "feature_mean": std.mean,
            "feature_std": std.std,
            "config": cfg.model_dump(),
            "encoder": encoder,
            "best_epoch": best_epoch,
            "split": split,
        },
        path,
    )


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


def run_train(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    encoder: str,
    memory_budget_gb: float = 8.0,
    console=None,
) -> dict:
    """Train on the features of ``encoder`` in ``out_dir``; write ``models/<cfg.name>/``.

    Returns
    -------
    dict of test metrics (and ``model_dir``).
    """
    from .embed import encoder_dir_name

    out_dir = Path(out_dir)
    model_dir = out_dir / "models" / cfg.name
    model_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, model_dir / "config.yaml")
    if cfg.label_column not in manifest.columns:
        raise ValueError(f"manifest has no label column {cfg.label_column!r}")
    bags, skipped = load_slide_bags(
        manifest,
        out_dir / "features" / encoder_dir_name(encoder),
        label_column=cfg.label_column,
        memory_budget_gb=memory_budget_gb,
        console=console,
    )
    if len(bags) < 4:
        raise ValueError(f"only {len(bags)} slides have features; need at least 4 to split train/val/test")
    split = split_bags(bags, test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train = [b for b in bags if split[b.bag_id] == "train"]
    val = [b for b in bags if split[b.bag_id] == "val"]
    model, std, history, best_epoch = fit(train, val, cfg, console=console)
    history.to_csv(model_dir / "history.csv", index=False)
    save_checkpoint(model_dir / "checkpoint.pt", model, std, cfg, encoder=encoder, best_epoch=best_epoch, split=split)

    probs, _ = predict_bags(model, [std(b.features) for b in bags])
    pred = pd.DataFrame(
        {
            "slide_id": [b.bag_id for b in bags],
            "split": [split[b.bag_id] for b in bags],
            "probability": probs,
            "prediction": (probs >= 0.5).astype(int),
            "label": [b.label for b in bags],
        }
    )
    pred.to_csv(model_dir / "predictions.csv", index=False)
    metrics = [{"split": s, **binary_metrics(pred.label[pred.split == s].values, pred.probability[pred.split == s].values)} for s in ("train", "val", "test")]
    pd.DataFrame(metrics).to_csv(model_dir / "metrics.csv", index=False)
    test = next(m for m in metrics if m["split"] == "test")
    return {**test, "best_epoch": best_epoch, "model_dir": str(model_dir), "skipped": skipped}
