"""Benchmark ``wsimil tile`` against a straightforward per-tile approach.

Generates (once, cached) synthetic pyramidal slides of 10,000 and 50,000 px square with
``wsimil.synth`` in CACHE_DIR, then measures, each in a fresh subprocess:

- ``wsimil``: open the slide, tissue mask on a low-resolution level, grid, tile fractions,
  Zarr store and QC image (what ``run_tile`` does per slide);
- ``per-tile``: open the slide, read every candidate tile at level 0 and keep it when at least
  half its pixels are saturated (the usual naive loop).

Prints seconds (total, and beyond opening the slide), peak resident memory (ru_maxrss) and
tiles kept, and the per-tile / wsimil time ratio measured in the same run. With ``--peer clam``
it also prints the process CPU seconds beyond opening (all threads), steadier than wall time on a
shared machine.

With ``--peer clam`` it runs CLAM's ``create_patches_fp.py`` steps instead of the per-tile
loop, side by side and alternating with wsimil, ``--repeats`` times per slide: segmentation
(``segmentTissue`` at the level nearest a 64x downsample), the mask image (``visWSI``) and
patching to h5 (``process_contours``; patch 256, step 256, level 0), with CLAM's default
parameters on synthetic slides and its ``bwh_biopsy`` preset on ``--real`` slides, in a
process that imports what ``create_patches_fp.py`` imports (as wsimil's imports what ``wsimil
tile`` does: pandas for the manifest in both, so peak memory compares real runs). It
installs nothing: give a CLAM checkout (``--clam-dir``) and a Python with CLAM's dependencies
(``--clam-python``: numpy, pandas, opencv, openslide, h5py, matplotlib, pillow, tqdm). For the
``--real`` slides it also reports coverage: the share of tissue pixels at full resolution (a
neutral rule: saturation ``(max - min) / max`` >= 0.1 and the darkest channel below 230) that
lie inside kept tiles.

Usage::

    nice python benchmarks/bench_tile.py CACHE_DIR [--sizes 10000,50000] [--naive-sizes 10000,50000]
    nice python benchmarks/bench_tile.py CACHE_DIR --peer clam --clam-dir CLAM --clam-python VENV/bin/python \
        --sizes 10000,30000 --real /work/shared/data/slides/cmu_small_region.svs --repeats 3
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
import PIL.Image, scipy.ndimage, zarr  # noqa
cfg = TileConfig()  # modules above are imported once per worker, not per slide: not timed
t0 = time.perf_counter()
slide = open_slide(path)
t1, c1 = time.perf_counter(), time.process_time()
if approach == "wsimil":
    res = tile_slide(slide, cfg)
    write_qc_image(slide, res, out / "bench.qc.png", max_px=cfg.qc_px)
    _write_tile_store(out / "bench.zarr", slide, res, cfg, config_hash(tile_settings(cfg)), "bench")
    n = len(res["coords"])
    np.save(out / "coords.npy", res["coords"])
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
t2, c2 = time.perf_counter(), time.process_time()
slide.close()
print(json.dumps({"open_s": t1 - t0, "total_s": t2 - t0, "beyond_open_s": t2 - t1, "cpu_s": c2 - c1,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tiles": n}))
"""


CLAM_CHILD = r"""
import json, os, resource, sys, time
path, out, clam_dir, preset = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, clam_dir)
import numpy as np, h5py
from wsi_core.WholeSlideImage import WholeSlideImage
import pandas, tqdm, wsi_core.wsi_utils, wsi_core.batch_process_utils  # the rest of create_patches_fp.py's imports
seg = {"sthresh": 8, "mthresh": 7, "close": 4, "use_otsu": False}   # create_patches_fp defaults
filt = {"a_t": 100, "a_h": 16, "max_n_holes": 8}
line = 500
if preset == "biopsy":                                                  # presets/bwh_biopsy.csv
    seg, filt, line = {"sthresh": 15, "mthresh": 11, "close": 2, "use_otsu": False}, {"a_t": 1, "a_h": 1, "max_n_holes": 2}, 50
t0 = time.perf_counter()
wsi = WholeSlideImage(path)
t1, c1 = time.perf_counter(), time.process_time()
level = 0 if len(wsi.level_dim) == 1 else wsi.wsi.get_best_level_for_downsample(64)
wsi.segmentTissue(seg_level=level, **seg, filter_params=filt, keep_ids=[], exclude_ids=[])
wsi.visWSI(vis_level=level, line_thickness=line).save(os.path.join(out, "mask.jpg"))
wsi.process_contours(save_path=out, patch_level=0, patch_size=256, step_size=256, use_padding=True, contour_fn="four_pt")
h5 = os.path.join(out, str(wsi.name) + ".h5")  # where process_contours writes
t2, c2 = time.perf_counter(), time.process_time()
coords = np.zeros((0, 2), np.int64)
if h5 and os.path.exists(h5):
    with h5py.File(h5, "r") as f:
        coords = f["coords"][:]
np.save(os.path.join(out, "coords.npy"), coords)
print(json.dumps({"open_s": t1 - t0, "total_s": t2 - t0, "beyond_open_s": t2 - t1, "cpu_s": c2 - c1,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tiles": int(len(coords))}))
"""


def coverage(slide_path: Path, coords, tile_px: int) -> float:
    """Share of level-0 tissue pixels (saturation >= 0.1, darkest channel < 230) inside the tiles."""
    import numpy as np

    from wsimil.slide import open_slide

    with open_slide(str(slide_path)) as s:
        w0, h0 = s.dimensions
        rgb = s.read_region((0, 0), 0, (w0, h0))
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    tissue = ((hi - lo) >= 0.1 * np.maximum(hi, 1)) & (lo < 230)
    inside = np.zeros_like(tissue)
    for x, y in np.asarray(coords, dtype=np.int64):
        inside[max(y, 0) : y + tile_px, max(x, 0) : x + tile_px] = True
    return float((tissue & inside).sum() / max(int(tissue.sum()), 1))


def measure_clam(slide: Path, work: Path, clam_dir: Path, clam_python: str, preset: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.h5"):
        old.unlink()  # CLAM appends to an existing h5
    r = subprocess.run([clam_python, "-c", CLAM_CHILD, str(slide), str(work), str(clam_dir), preset],
                       capture_output=True, text=True, check=True, cwd=clam_dir)  # fmt: skip
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_peer(args) -> None:
    """wsimil and CLAM alternately on each slide, ``--repeats`` times; medians and ratios."""
    import numpy as np

    slides = [(ensure_slide(args.cache_dir, int(s)), "default") for s in args.sizes.split(",") if s]
    slides += [(Path(p), "biopsy") for p in args.real]
    print(f"{'slide':>24} {'tool':>7} {'beyond open s':>14} {'CPU s':>7} {'peak MB':>8} {'tiles':>6} {'coverage':>9}")
    for slide, preset in slides:
        runs = {"wsimil": [], "clam": []}
        for _ in range(args.repeats):
            runs["wsimil"].append(measure("wsimil", slide, args.cache_dir / "work_wsimil"))
            runs["clam"].append(measure_clam(slide, args.cache_dir / "work_clam", args.clam_dir,
                                             args.clam_python, preset))  # fmt: skip
        med = {}
        for tool, rs in runs.items():
            m = {k: float(np.median([r[k] for r in rs])) for k in ("beyond_open_s", "cpu_s", "peak_mb")}
            m["tiles"] = rs[-1]["tiles"]
            cov = ""
            if preset == "biopsy":
                work = args.cache_dir / f"work_{tool}"
                m["coverage"] = coverage(slide, np.load(work / "coords.npy"), 256)
                cov = f"{m['coverage']:9.3f}"
            med[tool] = m
            print(f"{slide.name:>24} {tool:>7} {m['beyond_open_s']:14.3f} {m['cpu_s']:7.3f} {m['peak_mb']:8.0f} {m['tiles']:6d} {cov}", flush=True)
        ratio = med["wsimil"]["beyond_open_s"] / med["clam"]["beyond_open_s"]
        cpu = med["wsimil"]["cpu_s"] / med["clam"]["cpu_s"]
        print(json.dumps({"slide": slide.name, "repeats": args.repeats, "wsimil": med["wsimil"], "clam": med["clam"],
                          "wsimil_over_clam_time": round(ratio, 3), "wsimil_over_clam_cpu": round(cpu, 3)}), flush=True)  # fmt: skip


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
    import shutil

    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "bench.zarr", ignore_errors=True)  # a fresh store, as CLAM's fresh h5
    r = subprocess.run([sys.executable, "-c", CHILD, approach, str(slide), str(work)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--sizes", default="10000,50000")
    ap.add_argument("--naive-sizes", default="10000,50000", help="sizes on which to also run the per-tile approach")
    ap.add_argument("--peer", choices=["clam"], default=None, help="compare with CLAM instead of the per-tile loop")
    ap.add_argument("--clam-dir", type=Path, help="a CLAM checkout (with create_patches_fp.py)")
    ap.add_argument("--clam-python", default="python", help="a Python with CLAM's dependencies")
    ap.add_argument("--real", nargs="*", default=[], help="real slides (CLAM's biopsy preset; coverage reported)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    if args.peer == "clam":
        run_peer(args)
        return
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
