"""Training at scale on the CPU: epoch time and peak memory for big bags.

Usage::

    python benchmarks/scale_train.py [--bags 1000] [--instances 10000] [--dim 1024] [--measure-bags 20] [--big 200000]

The 1,000 bags of 10,000 x 1,024 float16 (~20 GB) are not stored: bag ``i`` is generated on
the fly from ``numpy.random.default_rng(i)`` (deterministic per bag), in a background thread
that prefetches the next bag while the current one trains. ``--measure-bags`` training steps
(one bag per step, gated attention, f = 1024->256) are timed and the epoch time is
extrapolated to ``--bags``; data time (waiting for the prefetch) is reported beside compute
time. Then one bag of ``--big`` instances takes one training step and one evaluation pass.
Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from queue import Queue

import numpy as np
import torch

from wsimil.mil import create_mil


def make_bag(i: int, n: int, d: int) -> tuple[torch.Tensor, float]:
    """Bag ``i``: (n, d) float16 features -> float32 tensor; label i % 2 (positives shifted)."""
    rng = np.random.default_rng(i)
    x = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)
    y = float(i % 2)
    if y:
        x[: n // 100, :8] += 2.0
    return torch.from_numpy(x).float(), y


def prefetch(ids, n, d, depth=2):
    q: Queue = Queue(maxsize=depth)

    def work():
        for i in ids:
            q.put(make_bag(i, n, d))
        q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not None:
        yield item


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bags", type=int, default=1000)
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--measure-bags", type=int, default=20)
    ap.add_argument("--big", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_mil("gated_attention", args.dim, hidden_dim=256, attention_dim=128, dropout=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    wait = comp = 0.0
    t_end = time.perf_counter()
    for x, y in prefetch(range(args.measure_bags), args.instances, args.dim):
        t0 = time.perf_counter()
        wait += t0 - t_end
        loss = loss_fn(model(x[None]).logits, torch.tensor([y]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t_end = time.perf_counter()
        comp += t_end - t0
    per_bag = (wait + comp) / args.measure_bags
    gen0 = time.perf_counter()
    make_bag(0, args.instances, args.dim)
    gen = time.perf_counter() - gen0
    print(json.dumps({"what": f"{args.measure_bags} steps of {args.instances} x {args.dim}", "step_s": round(comp / args.measure_bags, 3),
                      "data_wait_s_per_bag": round(wait / args.measure_bags, 3), "generate_one_bag_s": round(gen, 3),
                      "epoch_s_extrapolated": round(per_bag * args.bags, 1), "bags_per_epoch": args.bags, "peak_rss_gb": round(peak_rss_gb(), 2)}), flush=True)

    x, y = make_bag(10**6, args.big, args.dim)
    t0 = time.perf_counter()
    loss = loss_fn(model(x[None]).logits, torch.tensor([y]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    t1 = time.perf_counter()
    model.eval()
    with torch.inference_mode():
        out = model(x[None])
    t2 = time.perf_counter()
    assert out.attention.shape == (1, args.big)
    print(json.dumps({"what": f"one bag of {args.big} x {args.dim}", "train_step_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2),
                      "bag_gb_float32": round(x.numel() * 4 / 2**30, 2), "peak_rss_gb": round(peak_rss_gb(), 2)}), flush=True)


if __name__ == "__main__":
    main()
