"""Heatmap outputs for one very large slide: seconds and peak memory.

Writes (once, into ``--cache``) a cheap mostly-background pyramidal TIFF of SIZE x SIZE px: an
elliptic "tissue" region made of a few pre-encoded textured JPEG tiles, white elsewhere, with
2x-reduced levels (a few seconds even at 100,000 px, unlike ``write_synthetic_slide``). Then,
in a child process, runs :func:`wsimil.export.export_slide` on it with synthetic attention
for every tissue tile (overlay + thumbnail, QuPath GeoJSON, pyramidal heatmap TIFF, top-k
crops) and reports the child's peak RSS next to that of a child that only imports the same
modules, plus the level-0 size the outputs were never allowed to materialise.

    python benchmarks/bench_heatmap.py --cache /tmp/bench_cache --size 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 512


def _ellipse(xs, ys, w, h):
    return ((xs - 0.5 * w) / (0.42 * w)) ** 2 + ((ys - 0.5 * h) / (0.36 * h)) ** 2 <= 1.0


def write_cheap_slide(path: Path, size: int, *, mpp: float = 0.25) -> None:
    """Pyramidal JPEG BigTIFF, white with an elliptic textured region; tiles are encoded once."""
    import imagecodecs
    import tifffile

    rng = np.random.default_rng(0)
    enc = dict(level=85, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))
    white = imagecodecs.jpeg8_encode(np.full((TILE, TILE, 3), 255, np.uint8), **enc)
    tissue = []
    for _ in range(8):
        t = np.empty((TILE, TILE, 3), np.uint8)
        base = rng.normal(0, 12, (TILE, TILE))
        t[..., 0] = np.clip(225 + base, 0, 255)
        t[..., 1] = np.clip(150 + base, 0, 255)
        t[..., 2] = np.clip(200 + base, 0, 255)
        tissue.append(imagecodecs.jpeg8_encode(t, **enc))
    levels, d = [], 1
    while True:
        levels.append((-(-size // d), d))
        if -(-size // d) <= 1024:
            break
        d *= 2

    def tiles(n, d):
        for ty in range(0, n, TILE):
            for tx in range(0, n, TILE):
                cx, cy = (tx + TILE / 2) * d, (ty + TILE / 2) * d
                yield tissue[(tx // TILE * 7 + ty // TILE * 3) % 8] if _ellipse(cx, cy, size, size) else white

    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, (n, d) in enumerate(levels):
            tw.write(
                data=tiles(n, d), shape=(n, n, 3), dtype=np.uint8, photometric="rgb", compression="jpeg", subsampling=(2, 2),
                tile=(TILE, TILE), resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0, metadata=None,
            )
    tmp.replace(path)


def child(slide_path: str, out_dir: str, tile_px_level0: int, only_imports: bool) -> None:
    """Run in a subprocess: export every heatmap output; print JSON with timings and peak RSS."""
    import importlib

    import openslide
    import pandas as pd

    from wsimil.config import HeatmapConfig
    from wsimil.export import export_slide
    from wsimil.heatmap import minmax, percentile_rank
    from wsimil.slide import open_slide

    for mod in ("imagecodecs", "matplotlib", "openslide", "PIL.Image", "scipy.ndimage", "tifffile"):
        importlib.import_module(mod)  # the same imports as the real run, for the baseline
    if only_imports:
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    t0 = time.perf_counter()
    with open_slide(slide_path) as slide:
        w, h = slide.dimensions
        gx, gy = np.meshgrid(np.arange(0, w - tile_px_level0 + 1, tile_px_level0), np.arange(0, h - tile_px_level0 + 1, tile_px_level0))
        coords = np.stack([gx.ravel(), gy.ravel()], 1)
        keep = _ellipse(coords[:, 0] + tile_px_level0 / 2, coords[:, 1] + tile_px_level0 / 2, w, h)
        coords = coords[keep]
        rng = np.random.default_rng(1)
        # attention: a few hot spots plus noise, softmax over the bag
        centres = rng.uniform(0.3, 0.7, (4, 2)) * (w, h)
        d2 = ((coords[:, None, :] - centres[None]) ** 2).sum(-1).min(1)
        logits = -d2 / (2 * (0.03 * w) ** 2) * 4 + rng.normal(0, 0.3, len(coords))
        att = np.exp(logits - logits.max())
        att /= att.sum()
        table = pd.DataFrame(
            {"x": coords[:, 0], "y": coords[:, 1], "attention": att.astype(np.float32), "attention_scaled": minmax(att), "rank": percentile_rank(att),
             "instance_score": np.full(len(att), np.nan, np.float32)}
        )
        tissue = (_ellipse(*np.meshgrid(np.arange(0, w, 64) + 32, np.arange(0, h, 64) + 32), w, h)).astype(np.uint8), 64.0
        res = export_slide(slide, table, slide_id="big", tile_px_level0=tile_px_level0, out_dir=out_dir, cfg=HeatmapConfig(), title="big", tissue=tissue)
    total = time.perf_counter() - t0

    s = openslide.OpenSlide(Path(out_dir) / res["tiff"])
    print(
        json.dumps(
            {
                "slide_px": [w, h],
                "n_tiles": len(table),
                "seconds": {k: round(v, 2) for k, v in res["seconds"].items()},
                "total_seconds": round(total, 2),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "tiff_openslide_dims": list(s.dimensions),
                "tiff_levels": s.level_count,
                "tiff_mpp": float(s.properties.get("openslide.mpp-x", "nan")),
                "sizes_mb": {p.name: round(p.stat().st_size / 2**20, 2) for p in Path(out_dir).iterdir() if p.is_file()},
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True, help="folder for the generated slide (kept between runs)")
    ap.add_argument("--size", type=int, default=100_000, help="slide width and height in px")
    ap.add_argument("--tile-px-level0", type=int, default=448)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--only-imports", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]), a.only_imports)
        return
    a.cache.mkdir(parents=True, exist_ok=True)
    slide = a.cache / f"cheap_{a.size}.tiff"
    if not slide.exists():
        t0 = time.perf_counter()
        write_cheap_slide(slide, a.size)
        print(f"generated {slide} ({slide.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory(dir=a.cache) as out:
        cmd = [sys.executable, __file__, "--cache", str(a.cache), "--child", str(slide), out, str(a.tile_px_level0)]
        base = json.loads(subprocess.run([*cmd, "--only-imports"], capture_output=True, text=True, check=True).stdout)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
    w, h = res["slide_px"]
    level0_gb = w * h * 3 / 2**30
    print(f"slide {w:,} x {h:,} px (level 0 as RGB would be {level0_gb:.1f} GiB), {res['n_tiles']:,} tiles of {a.tile_px_level0} px")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in res["seconds"].items()) + f"; total {res['total_seconds']:.2f}")
    print(f"peak RSS: {res['peak_rss_mb']:.0f} MB (imports alone {base['peak_rss_mb']:.0f} MB); level-0 RGB / peak RSS = {level0_gb * 1024 / res['peak_rss_mb']:.0f}x")
    print(f"heatmap TIFF: OpenSlide dims {tuple(res['tiff_openslide_dims'])}, {res['tiff_levels']} levels, mpp {res['tiff_mpp']:.3f}")
    print("output sizes (MB): " + ", ".join(f"{k} {v}" for k, v in sorted(res["sizes_mb"].items())))


if __name__ == "__main__":
    main()
