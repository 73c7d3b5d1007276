"""The cohort, the decode check and the measured modes of ``gpu_check.py``."""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np


def cpu_seconds() -> float:
    """CPU seconds of this process and its joined children (the loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def base_dir(args) -> Path:
    return Path(args.out) / "work" / f"base_{args.slides}x{args.size_px}"


def tile_config(args):
    from wsimil.config import TileConfig

    if args.quick:  # read 256 px at level 0, resized to the encoder's 224: the resize is used
        return TileConfig(target_mpp=1.0, tile_px=128)
    return TileConfig(target_mpp=0.5, tile_px=224)


def prepare(args) -> None:
    """Write (once) the distinct synthetic slides and their tiles."""
    from wsimil.manifest import read_manifest
    from wsimil.synth import make_cohort
    from wsimil.tile import run_tile

    base = base_dir(args)
    if (base / "done").exists():
        return
    shutil.rmtree(base, ignore_errors=True)
    manifest = make_cohort(
        base, n_slides=args.slides, width_px=args.size_px, height_px=args.size_px, seed=1
    )
    res = run_tile(read_manifest(manifest), base, tile_config(args))
    if not (res.status == "ok").all():
        raise RuntimeError(f"tiling the synthetic slides failed: {res.message.tolist()}")
    (base / "done").write_text("ok\n")


def _base_slides(args) -> list[tuple[str, Path, int]]:
    """(slide_id, slide file, n_tiles) of the distinct slides."""
    from wsimil.manifest import read_manifest
    from wsimil.store import open_store

    base = base_dir(args)
    df = read_manifest(base / "manifest.csv")
    return [
        (sid, Path(path), int(open_store(base / "tiles" / f"{sid}.zarr").attrs["n_tiles"]))
        for sid, path in zip(df.slide_id, df.path, strict=True)
    ]


def cohort_rows(args) -> str:
    slides = _base_slides(args)
    tiles = sum(n for *_, n in slides)
    return f"{len(slides)} distinct {args.size_px} px slides, {tiles} tiles (repeated as needed)"


def copies_run(args, name: str, n_tiles: int):
    """A run folder whose manifest repeats the distinct slides (symlinks) to ``n_tiles`` tiles."""
    import pandas as pd

    from wsimil.manifest import read_manifest

    slides = _base_slides(args)
    per_copy = max(1, sum(n for *_, n in slides))
    copies = max(1, math.ceil(n_tiles / per_copy))
    run = Path(args.out) / "work" / name
    shutil.rmtree(run, ignore_errors=True)
    (run / "slides").mkdir(parents=True)
    (run / "tiles").mkdir()
    rows = []
    for c in range(copies):
        for sid, path, _ in slides:
            new = f"{sid}_c{c}"
            os.symlink(path.resolve(), run / "slides" / f"{new}{path.suffix}")
            os.symlink(
                (base_dir(args) / "tiles" / f"{sid}.zarr").resolve(), run / "tiles" / f"{new}.zarr"
            )
            rows.append({"slide_id": new, "path": f"slides/{new}{path.suffix}", "label": 0})
    pd.DataFrame(rows).to_csv(run / "manifest.csv", index=False)
    return run, read_manifest(run / "manifest.csv")


def build(args, encoder: str):
    import torch

    from wsimil.encoders import create_encoder

    if args.device == "cpu":
        torch.set_num_threads(max(1, args.cpus - args.workers if args.cpus > 2 else args.cpus))
    torch.backends.cudnn.benchmark = True
    return create_encoder(encoder, pretrained=False)


def _amp(args):
    import torch

    return torch.bfloat16 if args.device == "cuda" else None


def mode_model(args, encoder: str, _n: int) -> dict:
    """Random uint8 tiles already on the device -> normalise -> encoder -> host."""
    import torch

    from wsimil.encoders import normalise

    enc = build(args, encoder).to(args.device).to(memory_format=torch.channels_last)
    s, b = enc.config.input_px, args.batch_size
    x = torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, device=args.device)
    amp, min_s, min_batches = _amp(args), (0.0 if args.quick else 5.0), (2 if args.quick else 10)

    def step():
        y = normalise(x.permute(0, 3, 1, 2), enc.config).contiguous(
            memory_format=torch.channels_last
        )
        with torch.autocast(args.device, dtype=amp or torch.float32, enabled=amp is not None):
            return enc(y).float().cpu()

    with torch.inference_mode():
        for _ in range(1 if args.quick else 3):
            step()
        n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
        while n < min_batches or time.perf_counter() - t0 < min_s:
            step()
            n += 1
        dt = time.perf_counter() - t0
    return {"tiles": n * b, "seconds": dt, "cpu_s": cpu_seconds() - c0}


def _e2e(args, encoder: str, n_tiles: int, decode: str) -> dict:
    from wsimil.config import EmbedConfig
    from wsimil.embed import run_embed

    enc = build(args, encoder)
    cfg = EmbedConfig(
        encoder=encoder,
        pretrained=False,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        decode=decode,
        precision="bfloat16" if args.device == "cuda" else "float32",
    )
    if not args.quick:  # the model on the device and its kernels chosen before timing
        warm, wdf = copies_run(args, f"warm_{decode}", 1)
        run_embed(wdf.iloc[:1], warm, cfg, encoder=enc)
    run, df = copies_run(args, f"e2e_{decode}", max(n_tiles, 1))
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = run_embed(df, run, cfg, encoder=enc)
    dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if not (res.status == "ok").all():
        bad = res[res.status != "ok"]
        raise RuntimeError(f"{len(bad)} slides failed: {bad.message.iloc[0]}")
    return {
        "tiles": int(res.n_tiles.sum()),
        "seconds": dt,
        "cpu_s": cpu,
        "note": f"{len(df)} slide ids",
    }


def mode_e2e_pixels(args, encoder: str, n: int) -> dict:
    return _e2e(args, encoder, n, "pixels")


def mode_e2e_cpu(args, encoder: str, n: int) -> dict:
    return _e2e(args, encoder, n, "cpu")


def mode_e2e_gpu(args, encoder: str, n: int) -> dict:
    return _e2e(args, encoder, n, "gpu")


class PerTile:
    """The common per-tile loader: one OpenSlide ``read_region`` per item, float32 tensors."""

    def __init__(self, items, level: int, size: int, transform):
        self.items, self.level, self.size, self.tf = items, level, size, transform
        self.handles: dict = {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import openslide

        path, (x, y) = self.items[i]
        if path not in self.handles:
            self.handles[path] = openslide.OpenSlide(path)
        img = self.handles[path].read_region((int(x), int(y)), self.level, (self.size,) * 2)
        return self.tf(img.convert("RGB"))


def mode_baseline(args, encoder: str, n_tiles: int) -> dict:
    import torch
    from torchvision import transforms

    from wsimil.store import open_store

    enc = build(args, encoder).to(args.device)
    c = enc.config
    items, level, read_px = [], 0, 0
    for sid, path, _ in _base_slides(args):
        g = open_store(base_dir(args) / "tiles" / f"{sid}.zarr")
        level, read_px = int(g.attrs["read_level"]), int(g.attrs["read_px"])
        items += [(str(path), xy) for xy in g["coords"][...]]
    items = (items * (n_tiles // max(len(items), 1) + 1))[:n_tiles]
    tf = transforms.Compose(
        [
            transforms.Resize((c.input_px,) * 2),
            transforms.ToTensor(),
            transforms.Normalize(c.mean, c.std),
        ]
    )
    dl = torch.utils.data.DataLoader(
        PerTile(items, level, read_px, tf),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=args.device == "cuda",
    )
    amp = _amp(args)
    total, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    with torch.inference_mode():
        for batch in dl:
            with torch.autocast(args.device, dtype=amp or torch.float32, enabled=amp is not None):
                enc(batch.to(args.device, non_blocking=True)).float().cpu()
            total += len(batch)
    del dl  # its workers are joined (their CPU time counted)
    return {"tiles": total, "seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}


MODES = {
    "model": mode_model,
    "e2e_pixels": mode_e2e_pixels,
    "e2e_cpu": mode_e2e_cpu,
    "e2e_gpu": mode_e2e_gpu,
    "baseline": mode_baseline,
}


def decode_check(args) -> dict:
    """Tiles decoded by the compressed path (CPU, and GPU when there) vs OpenSlide's pixels."""
    from wsimil.slide import OpenSlideReader, TiffReader
    from wsimil.synth.aperio_jpeg import write_aperio_jpeg_tiff

    sid, path, _ = _base_slides(args)[0]
    with TiffReader(path) as t:
        side = 600 if args.quick else 2000
        w, h = min(t.dimensions[0], side), min(t.dimensions[1], side)
        aperio = write_aperio_jpeg_tiff(
            Path(args.out) / "work" / "aperio.tiff", t.read_region((0, 0), 0, (w, h))
        )
    out = {}
    for name, f in (("synthetic YCbCr JPEG", path), ("Aperio-style RGB JPEG + tables", aperio)):
        with OpenSlideReader(f) as osr:
            ref = _tiles_ref(osr, 224, 8 if args.quick else 32)
        for device in ["cpu"] + (["cuda"] if args.device == "cuda" else []):
            out[f"{name}, decoded on {device}, vs OpenSlide"] = _compare(f, ref, device)
    return out


def _tiles_ref(osr, r: int, n: int):
    rng = np.random.default_rng(0)
    w, h = osr.dimensions
    coords = np.stack([rng.integers(-30, w - r // 2, n), rng.integers(-30, h - r // 2, n)], 1)
    ref = np.stack([osr.read_region(tuple(map(int, c)), 0, (r, r)) for c in coords])
    return coords, ref


def _compare(path, ref, device: str) -> dict:
    """Decoded tiles vs OpenSlide; on CUDA also without the CPU guard (nvJPEG alone)."""
    from wsimil.jpeg_tiles import JpegTileReader, decode_packet, jpeg_levels

    coords, pixels = ref
    reader = JpegTileReader(path, jpeg_levels(path))
    out = {}
    try:
        packet = reader.packet(coords, 0, pixels.shape[1])
        for guard in (True, False) if device == "cuda" else (True,):
            tiles = decode_packet(packet, device, size=pixels.shape[1], guard=guard)
            d = np.abs(tiles.cpu().numpy().astype(int) - pixels.astype(int))
            key = "" if guard else "nvjpeg_alone_"
            out |= {f"{key}max": int(d.max()), f"{key}mean": round(float(d.mean()), 3)}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        reader.close()
    # libjpeg-turbo on both sides agrees to the bit; nvJPEG rounds its IDCT and chroma
    # upsampling differently, so the GPU is held to a mean difference only (a colour-space
    # mistake gives means above 10; the guard then decodes such tiles on the CPU).
    cpu = device == "cpu"
    out["ok"] = bool(out["mean"] < 0.5 and out["max"] <= 2 if cpu else out["mean"] < 2.0)
    return out
