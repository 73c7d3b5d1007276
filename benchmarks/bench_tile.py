"""Benchmark ``wsimil tile`` against a straightforward per-tile approach.

Generates (once, cached) synthetic pyramidal slides of 10,000 and 50,000 px square with
``wsimil.synth`` in CACHE_DIR, then measures, each in a fresh subprocess:

- ``wsimil``: open the slide, tissue mask on a low-resolution level, grid, tile fractions,
  Zarr store and QC image (what ``run_tile`` does per slide);
- ``per-tile``: open the slide, read every candidate tile at level 0 and keep it when at least
  half its pixels are saturated (the usual naive loop).

Prints seconds (total, and beyond opening the slide), peak resident memory (ru_maxrss) and
tiles kept, and the per-tile / wsimil time ratio measured in the same run.

Usage::

    nice python benchmarks/bench_tile.py CACHE_DIR [--sizes 10000,50000] [--naive-sizes 10000,50000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
approach, path, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from wsimil.config import TileConfig
from wsimil.slide import open_slide
from wsimil.store import config_hash
from wsimil.tile import _write_tile_store, grid_coords, tile_geometry, tile_settings, tile_slide, write_qc_image
import PIL.Image, scipy.ndimage, skimage.color, skimage.filters, skimage.morphology, skimage.segmentation, zarr  # noqa
cfg = TileConfig()  # modules above are imported once per worker, not per slide: not timed
t0 = time.perf_counter()
slide = open_slide(path)
t1 = time.perf_counter()
if approach == "wsimil":
    res = tile_slide(slide, cfg)
    write_qc_image(slide, res, out / "bench.qc.png", max_px=cfg.qc_px)
    _write_tile_store(out / "bench.zarr", slide, res, cfg, config_hash(tile_settings(cfg)), "bench")
    n = len(res["coords"])
else:
    geom = tile_geometry(slide, cfg)
    w0, h0 = slide.dimensions
    coords = grid_coords(w0, h0, tile_px=geom.tile_px_level0, stride_px=geom.stride_px_level0)
    kept = []
    for x, y in coords:
        t = slide.read_region((int(x), int(y)), 0, (geom.tile_px_level0, geom.tile_px_level0)).astype(np.int16)
        hi, lo = t.max(axis=2), t.min(axis=2)
        sat = (hi - lo) / np.maximum(hi, 1)
        if ((sat > 0.15) & (hi > 40)).mean() >= cfg.tissue_threshold:
            kept.append((x, y))
    n = len(kept)
t2 = time.perf_counter()
slide.close()
print(json.dumps({"open_s": t1 - t0, "total_s": t2 - t0, "beyond_open_s": t2 - t1,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tiles": n}))
"""


def ensure_slide(cache: Path, size: int) -> Path:
    from wsimil.synth import write_synthetic_slide

    path = cache / f"bench_{size}.tiff"
    if not path.exists():
        t = time.perf_counter()
        tmp = path.with_name(path.stem + ".partial.tiff")
        write_synthetic_slide(tmp, width_px=size, height_px=size, mpp=0.5, positive=True, seed=7)
        tmp.replace(path)
        print(f"generated {path.name} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def measure(approach: str, slide: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", CHILD, approach, str(slide), str(work)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--sizes", default="10000,50000")
    ap.add_argument("--naive-sizes", default="10000,50000", help="sizes on which to also run the per-tile approach")
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    naive = {int(s) for s in args.naive_sizes.split(",") if s}
    print(f"{'slide':>14} {'approach':>9} {'total s':>8} {'beyond open s':>14} {'peak MB':>8} {'tiles':>6}")
    for size in sizes:
        slide = ensure_slide(args.cache_dir, size)
        rows = {}
        for approach in ("wsimil", "per-tile") if size in naive else ("wsimil",):
            m = measure(approach, slide, args.cache_dir / f"work_{size}_{approach}")
            rows[approach] = m
            print(f"{size:>6} x {size:<6} {approach:>9} {m['total_s']:8.2f} {m['beyond_open_s']:14.3f} {m['peak_mb']:8.0f} {m['tiles']:6d}", flush=True)
        if len(rows) == 2:
            ratio = rows["per-tile"]["beyond_open_s"] / rows["wsimil"]["beyond_open_s"]
            print(f"{'':>14} per-tile / wsimil time beyond opening: {ratio:.1f}x", flush=True)


if __name__ == "__main__":
    main()
