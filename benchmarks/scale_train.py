"""Training at scale on the CPU: one epoch over 1,000 bags of 10,000 x 1,024 and one bag of 200,000.

Usage::

    python benchmarks/scale_train.py STORE_DIR [--bags 1000] [--instances 10000] [--dim 1024]
        [--memory-budget-gb 4] [--big 200000] [--threads 2] [--devices cpu,cuda]

1. Writes ``--bags`` generated bags as Zarr arrays (float16, as the embed stage stores
   features; ~20 GB for the defaults) under STORE_DIR, once (a re-run reuses them).
2. Trains one epoch with :func:`wsimil.train.fit`, the code path of ``wsimil train``, on the
   bags as the embed stage's stores give them over the memory budget: each bag keeps its Zarr
   array, ``--memory-budget-gb`` of them are held in memory and the rest are read one bag ahead
   of the step (:class:`wsimil.bags.BagTensors`). Reports the time of the standardisation pass,
   of setting up the cache, of the epoch, the same steps on one in-memory bag (compute alone),
   and the peak resident memory.
3. One bag of ``--big`` instances: one training step and one evaluation pass, and peak memory.

4. With a GPU (``--devices``, default ``cpu`` and ``cuda`` when one is visible): the epoch of
   step 2 on each device, side by side in one run, and the ratio (``train.device``; the bags
   are moved to the device once per step).

Gated attention, f = fc-256 (ReLU, dropout 0.25), attention dim 128, one bag per step.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from wsimil.bags import Bag, BagTensors
from wsimil.config import TrainConfig
from wsimil.bags import Standardiser
from wsimil.fit import bag_loss, build_model, fit


def make_bag(i: int, n: int, d: int) -> np.ndarray:
    """Bag ``i``: (n, d) float16 features, deterministic; odd bags hold 1 % shifted instances."""
    rng = np.random.default_rng(i)
    x = rng.standard_normal((n, d), dtype=np.float32)
    if i % 2:
        x[: n // 100, :8] += 2.0
    return x.astype(np.float16)


def write_stores(root: Path, n_bags: int, n: int, d: int) -> list[Bag]:
    """One Zarr array per bag (written once; complete arrays are reused)."""
    import zarr

    root.mkdir(parents=True, exist_ok=True)
    bags = []
    for i in range(n_bags):
        path = root / f"bag{i:05d}.zarr"
        if not (path / "done").exists():
            arr = zarr.create_array(str(path), shape=(n, d), dtype="float16", chunks=(4096, d), compressors=None, overwrite=True)
            arr[...] = make_bag(i, n, d)
            (path / "done").touch()
        bags.append(Bag(f"bag{i:05d}", zarr.open_array(str(path), mode="r"), i % 2, f"bag{i:05d}"))
    return bags


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store_dir", type=Path)
    ap.add_argument("--bags", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--memory-budget-gb", type=float, default=4.0)
    ap.add_argument("--big", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(model="gated_attention", hidden_dim=256, attention_dim=128, dropout=0.25, epochs=1, patience=1, val_fraction=0.0, balance="none", seed=0)

    t0 = time.perf_counter()
    bags = write_stores(args.store_dir, args.bags, args.instances, args.dim)
    print(json.dumps({"what": "stores", "bags": len(bags), "shape": [args.instances, args.dim], "gb_float16": round(len(bags) * args.instances * args.dim * 2 / 2**30, 1),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)

    t0 = time.perf_counter()
    std = Standardiser.fit(bags)
    t_std = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = BagTensors(bags, std, budget_bytes=args.memory_budget_gb * 2**30)
    t_cache = time.perf_counter() - t0
    n_cached = len(cache.cached)
    del cache
    t0 = time.perf_counter()
    _, _, history, _ = fit(bags, [], cfg, memory_budget_gb=args.memory_budget_gb)  # standardises and caches again, then the epoch
    t_fit = time.perf_counter() - t0
    epoch_s = float(history.seconds.iloc[0])

    # the same steps on one bag already in memory: what the epoch would take without any reading
    model = build_model(cfg, args.dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x = std(bags[1].features)
    model.train()
    t0 = time.perf_counter()
    k = 20
    for _ in range(k):
        loss = bag_loss(model, x, 1, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / k
    print(json.dumps({"what": f"one epoch, {args.bags} bags of {args.instances} x {args.dim}", "memory_budget_gb": args.memory_budget_gb,
                      "bags_in_memory": n_cached, "bags_read_from_stores_per_epoch": args.bags - n_cached,
                      "standardise_pass_s": round(t_std, 1), "cache_fill_s": round(t_cache, 1), "epoch_s": round(epoch_s, 1),
                      "fit_total_s": round(t_fit, 1), "compute_only_step_s": round(step_s, 3), "compute_only_epoch_s": round(step_s * args.bags, 1),
                      "peak_rss_gb": round(peak_rss_gb(), 2)}), flush=True)

    devices = [d for d in args.devices.split(",") if d]
    if len(devices) > 1:  # the same epoch on each device, side by side
        seconds = {}
        for dev in devices:
            _, _, hist, _ = fit(bags, [], cfg.model_copy(update={"device": dev}), memory_budget_gb=args.memory_budget_gb)
            seconds[dev] = round(float(hist.seconds.iloc[0]), 2)
        print(json.dumps({"what": "one epoch by device", "epoch_s": seconds,
                          "ratio_to_first": {d: round(seconds[devices[0]] / seconds[d], 2) for d in devices}}), flush=True)

    big = torch.from_numpy(make_bag(10**6 + 1, args.big, args.dim).astype(np.float32))
    model.train()
    t0 = time.perf_counter()
    loss = bag_loss(model, big, 1, loss_fn)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    t1 = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        out = model(big[None])
    t2 = time.perf_counter()
    assert out.attention.shape == (1, args.big) and torch.isfinite(out.attention).all()
    print(json.dumps({"what": f"one bag of {args.big} x {args.dim}", "train_step_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2),
                      "bag_gb_float32": round(big.numel() * 4 / 2**30, 2), "peak_rss_gb": round(peak_rss_gb(), 2)}), flush=True)


if __name__ == "__main__":
    main()
