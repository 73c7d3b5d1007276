"""``wsimil embed``: a frozen encoder over every slide's tiles, features into Zarr.

Tiles are read straight from the slide by DataLoader worker processes (each with its own slide
handle; no tile image files), resized to the encoder's input size, and normalised on the
device. Writes ``features/<encoder>/<slide_id>.zarr`` with ``features`` (N, D) float16 and the
tile ``coords`` (N, 2) int32, streamed into a temporary store that is renamed into place only
when the slide is complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .config import EmbedConfig, save_config
from .manifest import mpp_override
from .slide import SlideError, TiffReader, open_slide
from .store import (
    PendingStore,
    StatusLog,
    config_hash,
    open_store,
    remove_stale_temps,
    store_status,
    zstd_compressors,
)


@dataclass
class SlideJob:
    """What a worker needs to read one slide's tiles."""

    slide_id: str
    path: str
    mpp: float | None
    coords: np.ndarray  # (N, 2) int32, level 0
    read_level: int
    read_px: int
    tile_attrs: dict
    step_px_level0: int = 0  # grid step; tiles are read in row runs when ``group_reads``
    group_reads: bool = False
    reader: str = "openslide"  # or "tifffile": decode stored TIFF tiles directly (see pick_reader)


def encoder_dir_name(name: str) -> str:
    """Folder name for an encoder (``hf-hub:org/model`` -> ``hf-hub_org_model``)."""
    return name.replace(":", "_").replace("/", "_")


class TileBatches:
    """Map-style dataset whose item ``i`` is one batch of tiles of one slide.

    Each item is a dict: ``job`` (index into ``jobs``), ``start`` (first tile index), ``tiles``
    uint8 tensor (B, S, S, 3) and ``error`` ('' or a one-line message). Read errors are
    returned, not raised, so one corrupt slide does not stop the loader.
    """

    def __init__(
        self,
        jobs: list[SlideJob],
        *,
        batch_size: int,
        input_px: int,
        interpolation: str = "bilinear",
    ):
        self.jobs = jobs
        self.input_px = input_px
        self.interpolation = interpolation
        self.items = [
            (j, s) for j, job in enumerate(jobs) for s in range(0, len(job.coords), batch_size)
        ]
        self.batch_size = batch_size
        self._open: tuple[int, object] | None = None  # per-process slide handle

    def __len__(self) -> int:
        return len(self.items)

    def _slide(self, j: int):
        if self._open is None or self._open[0] != j:
            if self._open is not None:
                self._open[1].close()
            self._open = None
            job = self.jobs[j]
            self._open = (
                j,
                TiffReader(job.path)
                if job.reader == "tifffile"
                else open_slide(job.path, mpp=job.mpp),
            )
        return self._open[1]

    def __getitem__(self, i: int) -> dict:
        import torch

        j, start = self.items[i]
        job = self.jobs[j]
        coords = job.coords[start : start + self.batch_size]
        try:
            tiles = read_tiles(
                self._slide(j), coords, job, size=self.input_px, interpolation=self.interpolation
            )
        except SlideError as exc:
            return {"job": j, "start": start, "tiles": torch.empty(0), "error": str(exc)}
        except Exception as exc:
            return {
                "job": j,
                "start": start,
                "tiles": torch.empty(0),
                "error": f"{job.path}: {type(exc).__name__}: {exc}",
            }
        return {"job": j, "start": start, "tiles": torch.from_numpy(tiles), "error": ""}


def row_runs(coords: np.ndarray, *, step_px: int, max_run: int) -> list[tuple[int, int]]:
    """Split tiles into runs of horizontal neighbours (same y, x advancing by ``step_px``).

    Returns
    -------
    list of (first index, length), covering ``coords`` in order.
    """
    runs = []
    i, n = 0, len(coords)
    while i < n:
        k = 1
        while (
            i + k < n
            and k < max_run
            and coords[i + k, 1] == coords[i, 1]
            and coords[i + k, 0] == coords[i, 0] + k * step_px
        ):
            k += 1
        runs.append((i, k))
        i += k
    return runs


def read_tiles(
    slide,
    coords: np.ndarray,
    job: SlideJob,
    *,
    size: int,
    interpolation: str = "bilinear",
    max_run: int = 16,
) -> np.ndarray:
    """Read and resize the tiles at ``coords`` of one slide.

    Horizontal neighbours are read as one region (one call, each stored JPEG tile decoded once)
    when the grid allows it exactly; the pixels are the same as tile-by-tile reads.

    Returns
    -------
    ndarray, shape (N, size, size, 3), uint8
    """
    out = np.empty((len(coords), size, size, 3), np.uint8)
    r = job.read_px
    if job.group_reads:
        for first, k in row_runs(coords, step_px=job.step_px_level0, max_run=max_run):
            x, y = coords[first]
            strip = slide.read_region((int(x), int(y)), job.read_level, (k * r, r))
            for t in range(k):
                out[first + t] = resize_tile(
                    strip[:, t * r : (t + 1) * r], size, interpolation=interpolation
                )
    else:
        for t, (x, y) in enumerate(coords):
            region = slide.read_region((int(x), int(y)), job.read_level, (r, r))
            out[t] = resize_tile(region, size, interpolation=interpolation)
    return out


def resize_tile(region: np.ndarray, size: int, *, interpolation: str = "bilinear") -> np.ndarray:
    """Resize an (h, w, 3) uint8 tile to (size, size, 3) with antialiasing (Pillow)."""
    if region.shape[0] == size and region.shape[1] == size:
        return region
    from PIL import Image

    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    return np.asarray(Image.fromarray(region).resize((size, size), resample))


class RowWriter:
    """Append rows to a Zarr array one whole chunk at a time (no read-modify-write of chunks)."""

    def __init__(self, array):
        self.array = array
        self.chunk_rows = array.chunks[0]
        self.rows = 0  # rows appended so far
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def append(self, block: np.ndarray) -> None:
        self._buf.append(block)
        self._buffered += len(block)
        self.rows += len(block)
        if self._buffered >= self.chunk_rows:
            self._write(whole_chunks_only=True)

    def flush(self) -> None:
        self._write(whole_chunks_only=False)

    def _write(self, *, whole_chunks_only: bool) -> None:
        if not self._buf:
            return
        data = np.concatenate(self._buf)
        start = self.rows - len(data)
        n = (len(data) // self.chunk_rows) * self.chunk_rows if whole_chunks_only else len(data)
        if n:
            self.array[start : start + n] = data[:n]
        rest = data[n:]
        self._buf = [rest] if len(rest) else []
        self._buffered = len(rest)


def can_group_reads(tile_attrs: dict) -> bool:
    """Whether neighbouring tiles can be read as one region with identical pixels.

    True when tiles do not overlap and a tile is a whole number of pixels of the read level.
    """
    tile0 = int(tile_attrs["tile_px_level0"])
    ds = float(tile_attrs["read_downsample"])
    return (
        int(tile_attrs["stride_px_level0"]) == tile0
        and abs(tile0 / ds - int(tile_attrs["read_px"])) < 1e-9
    )


def pick_reader(path: str, choice: str, *, mpp: float | None = None) -> str:
    """The reader the embed workers use for one slide: ``"openslide"`` or ``"tifffile"``.

    ``auto`` takes tifffile (each stored JPEG tile decoded once per row of tiles, about 2-3x
    cheaper than OpenSlide region reads) for TIFF-based files whose pyramid tifffile sees with
    the same level sizes as ``open_slide``; anything else stays with ``open_slide``.
    """
    if choice == "openslide":
        return "openslide"
    suffix = Path(path).suffix.lower()
    if choice == "auto" and suffix not in {".tif", ".tiff", ".svs", ".btf"}:
        return "openslide"
    try:
        with open_slide(path, mpp=mpp) as ref, TiffReader(Path(path)) as fast:
            same = ref.level_dimensions == fast.level_dimensions
    except Exception:
        same = False
    if not same and choice == "tifffile":
        raise SlideError(
            f"{path}: tifffile does not see the same pyramid as OpenSlide; use --reader openslide"
        )
    return "tifffile" if same else "openslide"


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return name


def autocast_dtype(precision: str, preferred: str, device: str):
    """The autocast dtype for ``precision`` (None = plain float32).

    ``auto`` is the encoder's preferred dtype on CUDA (bf16 or fp16) and float32 on the CPU;
    ``bfloat16`` also works on CPUs that support it. Features are stored as float16 either way.
    """
    import torch

    choice = preferred if precision == "auto" and device == "cuda" else precision
    if choice == "auto" or choice == "float32":
        return None
    if device == "cpu" and choice == "float16":
        raise ValueError("--precision float16 needs CUDA; use bfloat16 or float32 on the CPU")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def embed_on_devices(devices: list[str], argv: list[str]) -> int:
    """Run one ``wsimil embed`` process per device, each on its own share of the cohort.

    Parameters
    ----------
    devices : list of str
        GPU indices (``"0"``, ``"1"``, ...; each process sees only its GPU through
        ``CUDA_VISIBLE_DEVICES``) or ``"cpu"`` entries (CPU worker processes).
    argv : list of str
        The ``wsimil embed`` arguments without ``--devices``, ``--device`` and ``--shard``.

    Returns
    -------
    int
        0 when every process succeeded, else the first non-zero exit status.
    """
    import os
    import subprocess
    import sys

    procs = []
    n = len(devices)
    for i, dev in enumerate(devices):
        env = dict(os.environ)
        if dev == "cpu":
            device = "cpu"
        else:
            env["CUDA_VISIBLE_DEVICES"] = dev
            device = "cuda"
        cmd = [
            sys.executable,
            "-m",
            "wsimil.cli",
            "embed",
            *argv,
            "--device",
            device,
            "--shard",
            f"{i}/{n}",
        ]
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def embed_settings(encoder_attrs: dict, tiles_hash: str) -> dict:
    """Settings that shape a feature store (hashed into its attrs)."""
    return {"stage": "embed", "encoder": encoder_attrs, "tiles_config_hash": tiles_hash}


def run_embed(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    cfg: EmbedConfig,
    *,
    overwrite: bool = False,
    console=None,
    encoder=None,
) -> pd.DataFrame:
    """Embed the tiles of every slide of ``manifest`` (tiled in ``out_dir/tiles``).

    ``encoder`` may be passed pre-built (an :class:`wsimil.encoders.Encoder`), otherwise it is
    created from ``cfg``.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, n_tiles, seconds, message.
    """
    import torch

    from .encoders import create_encoder, normalise
    from .progress import progress_bar

    out_dir = Path(out_dir)
    device = pick_device(cfg.device)
    if encoder is None:
        encoder = create_encoder(cfg.encoder, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    ecfg = encoder.config
    enc_attrs = ecfg.to_attrs()
    feat_dir = out_dir / "features" / encoder_dir_name(cfg.encoder)
    feat_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, feat_dir / "config.yaml")
    remove_stale_temps(feat_dir)
    log = StatusLog(feat_dir / "status.jsonl")

    rows: dict[str, dict] = {}
    jobs: list[SlideJob] = []
    for rec in manifest.itertuples(index=False):
        sid = rec.slide_id
        row = {"slide_id": sid, "status": "", "n_tiles": 0, "seconds": 0.0, "message": ""}
        rows[sid] = row
        tstore = out_dir / "tiles" / f"{sid}.zarr"
        if not tstore.exists():
            row.update(
                status="error",
                message=f"{sid}: no tile store at {tstore}; run `wsimil tile` first (or see tiles/status.jsonl)",
            )
            continue
        tg = open_store(tstore)
        tattrs = dict(tg.attrs)
        chash = config_hash(embed_settings(enc_attrs, tattrs["config_hash"]))
        fstore = feat_dir / f"{sid}.zarr"
        state = store_status(fstore, chash)
        if state == "complete" and not overwrite:
            row.update(
                status="skipped", message="complete store exists", n_tiles=int(tattrs["n_tiles"])
            )
            continue
        if state == "changed" and not overwrite:
            row.update(
                status="error",
                message=f"{fstore}: made from other tiles or encoder settings; pass --overwrite to redo it",
            )
            continue
        mpp = mpp_override(rec)
        jobs.append(
            SlideJob(
                slide_id=sid,
                path=str(rec.path),
                mpp=mpp,
                coords=np.asarray(tg["coords"][...], dtype=np.int32),
                read_level=int(tattrs["read_level"]),
                read_px=int(tattrs["read_px"]),
                tile_attrs={**tattrs, "config_hash_embed": chash},
                step_px_level0=int(tattrs["stride_px_level0"]),
                group_reads=cfg.group_reads and can_group_reads(tattrs),
                reader=pick_reader(str(rec.path), cfg.reader, mpp=mpp),
            )
        )

    # Slides with no tiles get an empty store right away (later stages see status "empty").
    for job in [j for j in jobs if len(j.coords) == 0]:
        pending = _begin_store(feat_dir, job, ecfg.feature_dim, enc_attrs, device)
        pending.commit()
        rows[job.slide_id].update(
            status="empty", message=f"{job.slide_id}: 0 tiles (see tiles/status.jsonl)"
        )
    jobs = [j for j in jobs if len(j.coords) > 0]

    if jobs:
        dataset = TileBatches(
            jobs,
            batch_size=cfg.batch_size,
            input_px=ecfg.input_px,
            interpolation=ecfg.interpolation,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=cfg.num_workers,
            pin_memory=device == "cuda",
            worker_init_fn=_worker_init if cfg.num_workers else None,
            prefetch_factor=4 if cfg.num_workers else None,
            persistent_workers=False,
        )
        # channels_last is faster for convolutions on both CUDA and CPU (about 2x here for
        # efficientnet_lite0 on 2 cores).
        model = encoder.to(device).to(memory_format=torch.channels_last)
        if cfg.compile:
            model = torch.compile(model)
        amp_dtype = autocast_dtype(cfg.precision, ecfg.preferred_dtype, device)
        pending: dict[int, PendingStore] = {}
        writers: dict[int, RowWriter] = {}
        failed: set[int] = set()
        started: dict[int, float] = {}
        total = sum(len(j.coords) for j in jobs)
        with (
            progress_bar(console, f"embed ({ecfg.name}, {device})", total) as advance,
            torch.inference_mode(),
        ):
            for item in loader:
                j = item["job"]
                job = jobs[j]
                started.setdefault(j, time.perf_counter())
                n_batch = len(job.coords[item["start"] : item["start"] + cfg.batch_size])
                advance(n_batch)
                if j in failed:
                    continue
                if item["error"]:
                    failed.add(j)
                    if j in pending:
                        pending.pop(j).abort()
                    rows[job.slide_id].update(status="error", message=item["error"])
                    continue
                if j not in pending:
                    pending[j] = _begin_store(feat_dir, job, ecfg.feature_dim, enc_attrs, device)
                    writers[j] = RowWriter(pending[j].group["features"])
                x = item["tiles"].to(device, non_blocking=True).permute(0, 3, 1, 2)
                x = normalise(x, ecfg).contiguous(memory_format=torch.channels_last)
                if amp_dtype is not None:
                    with torch.autocast(device, dtype=amp_dtype):
                        f = model(x)
                else:
                    f = model(x)
                feats = f.float().cpu().numpy()
                if not np.all(np.isfinite(feats)):
                    pending.pop(j).abort()
                    failed.add(j)
                    rows[job.slide_id].update(
                        status="error",
                        message=f"{job.path}: non-finite features; check the encoder and its weights",
                    )
                    continue
                writers[j].append(feats.astype(np.float16))
                if writers[j].rows == len(job.coords):
                    writers.pop(j).flush()
                    pending.pop(j).commit()
                    rows[job.slide_id].update(
                        status="ok",
                        n_tiles=len(job.coords),
                        seconds=round(time.perf_counter() - started[j], 3),
                    )
        for p in pending.values():  # only reachable if the loader stopped early
            p.abort()

    for sid, row in rows.items():
        if row["status"] != "skipped":
            log.write(sid, row["status"], row["message"], row["seconds"], n_tiles=row["n_tiles"])
        if row["status"] == "error" and console is not None:
            console.print(f"[red]error[/red] {row['message']}")
    return pd.DataFrame(list(rows.values()))


def _begin_store(
    feat_dir: Path, job: SlideJob, dim: int, enc_attrs: dict, device: str
) -> PendingStore:
    n = len(job.coords)
    pending = PendingStore(feat_dir / f"{job.slide_id}.zarr")
    g = pending.group
    chunk = max(1, min(n, 4096))
    g.create_array(
        "features",
        shape=(n, dim),
        dtype="float16",
        chunks=(chunk, dim),
        compressors=zstd_compressors(),
    )
    coords = g.create_array(
        "coords", shape=(n, 2), dtype="int32", chunks=(chunk, 2), compressors=zstd_compressors()
    )
    if n:
        coords[...] = job.coords
    tattrs = dict(job.tile_attrs)
    chash = tattrs.pop("config_hash_embed")
    g.attrs.update(
        {
            "slide_id": job.slide_id,
            "n_tiles": n,
            "feature_dim": dim,
            "encoder": enc_attrs,
            "tiles": {k: tattrs[k] for k in sorted(tattrs)},
            "config_hash": chash,
            "device": device,
            "wsimil_version": __version__,
        }
    )
    return pending
