"""Embed-stage throughput, measured side by side in one run.

(a) model only: random uint8 tiles already on the device -> normalise -> encoder;
(b) end to end: ``wsimil.embed.run_embed`` from slide files to features on disk;
(c) baseline: the common per-tile approach, a DataLoader whose items are single tiles read
    with OpenSlide ``read_region``, converted with Pillow and torchvision transforms
    (Resize, ToTensor, Normalize), collated into float32 batches;
(d), (e) the two loaders alone (no model), where reading is the whole job (``--modes de``).

Each mode runs in its own subprocess (so peak RSS is per mode) with the same encoder, batch
size, device, worker count and tiles. Prints tiles/s, b/a and b/c, and peak memory.

Example::

    python benchmarks/bench_embed.py --cache /tmp/wsimil-bench --encoder efficientnet_lite0
    python benchmarks/bench_embed.py --cache /tmp/wsimil-bench --encoder mobilenetv3_small_050 --no-pretrained
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024


def prepare(args) -> Path:
    """Generate (once) the cohort and its tiles in ``args.cache``; returns the run folder."""
    from wsimil.config import TileConfig
    from wsimil.manifest import read_manifest
    from wsimil.synth import make_cohort
    from wsimil.tile import run_tile

    run = Path(args.cache) / f"cohort_{args.n_slides}x{args.size_px}"
    manifest = make_cohort(run, n_slides=args.n_slides, width_px=args.size_px, height_px=args.size_px, mpp=0.5, seed=1)
    run_tile(read_manifest(manifest), run, TileConfig(target_mpp=args.target_mpp, tile_px=args.tile_px))
    return run


def build_encoder(args):
    import torch

    from wsimil.encoders import create_encoder

    torch.set_num_threads(args.threads)
    enc = create_encoder(args.encoder, pretrained=not args.no_pretrained)
    return enc


def mode_model(args, run: Path) -> dict:
    import torch

    from wsimil.encoders import normalise
    from wsimil.manifest import read_manifest
    from wsimil.store import open_store

    n_tiles = sum(open_store(run / "tiles" / f"{s}.zarr")["coords"].shape[0] for s in read_manifest(run / "manifest.csv").slide_id)
    enc = build_encoder(args).to(args.device).to(memory_format=torch.channels_last)
    s = enc.config.input_px
    x = torch.randint(0, 256, (args.batch_size, s, s, 3), dtype=torch.uint8, device=args.device)
    with torch.inference_mode():
        for _ in range(2):
            enc(normalise(x.permute(0, 3, 1, 2), enc.config).contiguous(memory_format=torch.channels_last))
        n_batches = max(3, n_tiles // args.batch_size)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            f = enc(normalise(x.permute(0, 3, 1, 2), enc.config).contiguous(memory_format=torch.channels_last))
            f.float().cpu()
        dt = time.perf_counter() - t0
    return {"tiles": n_batches * args.batch_size, "seconds": dt}


def mode_end_to_end(args, run: Path) -> dict:
    import shutil

    from wsimil.config import EmbedConfig
    from wsimil.embed import run_embed
    from wsimil.manifest import read_manifest

    enc = build_encoder(args)
    out = Path(args.cache) / "e2e_out"
    shutil.rmtree(out, ignore_errors=True)
    (out / "tiles").parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run / "tiles", out / "tiles")
    cfg = EmbedConfig(encoder=args.encoder, pretrained=not args.no_pretrained, batch_size=args.batch_size, num_workers=args.workers, device=args.device)
    t0 = time.perf_counter()
    res = run_embed(read_manifest(run / "manifest.csv"), out, cfg, encoder=enc)
    dt = time.perf_counter() - t0
    assert (res.status == "ok").all(), res
    return {"tiles": int(res.n_tiles.sum()), "seconds": dt}


class PerTile:
    """The common approach: one item = one tile read with OpenSlide, float32 after transforms."""

    def __init__(self, path, coords, level, size, transform):
        self.path, self.coords, self.level, self.size, self.tf = path, coords, level, size, transform
        self.wsi = None

    def __len__(self):
        return len(self.coords)

    def __getitem__(self, i):
        import openslide

        if self.wsi is None:
            self.wsi = openslide.OpenSlide(self.path)
        x, y = self.coords[i]
        img = self.wsi.read_region((int(x), int(y)), self.level, (self.size, self.size)).convert("RGB")
        return self.tf(img)


def baseline_loaders(args, run: Path, cfg):
    """Yield (slide_id, DataLoader) of the per-tile baseline for each slide."""
    import torch
    from torchvision import transforms

    from wsimil.manifest import read_manifest
    from wsimil.store import open_store

    tf = transforms.Compose([transforms.Resize((cfg.input_px, cfg.input_px)), transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)])
    for rec in read_manifest(run / "manifest.csv").itertuples():
        g = open_store(run / "tiles" / f"{rec.slide_id}.zarr")
        ds = PerTile(rec.path, g["coords"][...], int(g.attrs["read_level"]), int(g.attrs["read_px"]), tf)
        yield rec.slide_id, torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, pin_memory=args.device == "cuda")


def mode_baseline(args, run: Path) -> dict:
    import numpy as np
    import torch

    enc = build_encoder(args).to(args.device)
    total, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for sid, dl in baseline_loaders(args, run, enc.config):
            feats = [enc(b.to(args.device, non_blocking=True)).cpu().numpy() for b in dl]
            np.save(Path(args.cache) / f"baseline_{sid}.npy", np.concatenate(feats).astype(np.float16))
            total += len(dl.dataset)
    return {"tiles": total, "seconds": time.perf_counter() - t0}


def mode_loader_only(args, run: Path) -> dict:
    """wsimil's tile loader alone (reading is the whole job): batches are read and dropped."""
    import torch

    from wsimil.embed import SlideJob, TileBatches, can_group_reads, pick_reader
    from wsimil.encoders import create_encoder
    from wsimil.manifest import read_manifest
    from wsimil.store import open_store

    cfg = create_encoder(args.encoder, pretrained=not args.no_pretrained).config
    jobs = []
    for rec in read_manifest(run / "manifest.csv").itertuples():
        g = open_store(run / "tiles" / f"{rec.slide_id}.zarr")
        a = dict(g.attrs)
        jobs.append(SlideJob(rec.slide_id, rec.path, None, g["coords"][...], a["read_level"], a["read_px"], a, a["stride_px_level0"], can_group_reads(a), pick_reader(rec.path, "auto")))
    ds = TileBatches(jobs, batch_size=args.batch_size, input_px=cfg.input_px, interpolation=cfg.interpolation)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    total, t0 = 0, time.perf_counter()
    for item in dl:
        total += sum(len(part["tiles"]) for part in item["parts"])
    return {"tiles": total, "seconds": time.perf_counter() - t0}


def mode_baseline_loader_only(args, run: Path) -> dict:
    """The per-tile baseline's loader alone."""
    from wsimil.encoders import create_encoder

    cfg = create_encoder(args.encoder, pretrained=not args.no_pretrained).config
    total, t0 = 0, time.perf_counter()
    for _, dl in baseline_loaders(args, run, cfg):
        for b in dl:
            total += len(b)
    return {"tiles": total, "seconds": time.perf_counter() - t0}


MODES = {"a": mode_model, "b": mode_end_to_end, "c": mode_baseline, "d": mode_loader_only, "e": mode_baseline_loader_only}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="folder for the generated cohort and outputs")
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-slides", type=int, default=2)
    p.add_argument("--size-px", type=int, default=10_000)
    p.add_argument("--target-mpp", type=float, default=0.5)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--modes", default="abc")
    p.add_argument("--_mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._mode:  # child process: one mode, JSON on stdout
        run = Path(args.cache) / f"cohort_{args.n_slides}x{args.size_px}"
        res = MODES[args._mode](args, run)
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return

    run = prepare(args)
    results = {}
    for m in args.modes:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--_mode", m]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"mode {m} failed:\n{out.stderr}")
        results[m] = json.loads(out.stdout.strip().splitlines()[-1])
    names = {"a": "model only", "b": "end to end (wsimil)", "c": "per-tile baseline", "d": "loader only (wsimil)", "e": "loader only (baseline)"}
    print(f"encoder {args.encoder}, batch {args.batch_size}, device {args.device}, workers {args.workers}, threads {args.threads}, "
          f"{args.n_slides} slides of {args.size_px} px, tiles {args.tile_px} px at {args.target_mpp} µm/px")
    for m, r in results.items():
        r["tiles_per_s"] = r["tiles"] / r["seconds"]
        print(f"  ({m}) {names[m]:22s} {r['tiles']:6d} tiles  {r['seconds']:7.1f} s  {r['tiles_per_s']:7.1f} tiles/s  peak RSS {r['peak_rss_mb']:6.0f} MB")
    if "a" in results and "b" in results:
        print(f"  b/a = {results['b']['tiles_per_s'] / results['a']['tiles_per_s']:.2f}")
    if "b" in results and "c" in results:
        print(f"  b/c = {results['b']['tiles_per_s'] / results['c']['tiles_per_s']:.2f}")
    if "d" in results and "e" in results:
        print(f"  d/e = {results['d']['tiles_per_s'] / results['e']['tiles_per_s']:.2f}  (reading is the whole job)")


if __name__ == "__main__":
    main()
