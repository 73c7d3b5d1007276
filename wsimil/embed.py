"""``wsimil embed``: a frozen encoder over every slide's tiles, features into Zarr.

Tiles are read straight from the slide by DataLoader worker processes (:mod:`wsimil.tile_reader`),
resized to the encoder's input size, and normalised on the device. Writes
``features/<encoder>/<slide_id>.zarr`` with ``features`` (N, D) float16 and the tile ``coords``
(N, 2) int32, streamed into a partial store that is renamed into place only when the slide is
complete. Slides are claimed by :mod:`wsimil.runner` a window at a time (several small slides
share the loader, so batches stay full); each ends with its own status line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .config import EmbedConfig
from .devices import loader_workers, pick_device
from .earlier import FromTileStore, before_embed
from .embed_books import SlideBooks, begin_feature_store
from .jpeg_tiles import decode_packet, pick_decode
from .layout import RunLayout
from .manifest import mpp_override
from .runner import SlideOutcome, SlideStage, error_outcome, run_slides
from .store import (
    PendingStore,
    config_hash,
    store_attrs,
    store_status,
)
from .tile_reader import (  # noqa: F401 - re-exported for callers of the embed stage
    SlideJob,
    TileBatches,
    can_group_reads,
    pick_reader,
    read_tiles,
    resize_tile,
    row_runs,
)


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


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


class EmbedStage(FromTileStore, SlideStage):
    """``wsimil embed`` for :func:`wsimil.runner.run_slides`: windows of slides through one loader."""

    name = "embed"
    columns = {"n_tiles": 0}
    changed = "other tiles or encoder settings"

    def __init__(self, layout: RunLayout, cfg: EmbedConfig, encoder, device: str):
        super().__init__(layout.features(cfg.encoder))
        self.layout, self.cfg, self.encoder, self.device = layout, cfg, encoder, device
        self.ecfg = encoder.config
        self.enc_attrs = self.ecfg.to_attrs()
        self._model = None
        self._host: list = [None, None]  # two pinned buffers for features coming back (CUDA)
        self._flip = 0
        self.earlier = before_embed(layout)

    def outputs(self, row):
        return [self.layout.feature_store(self.cfg.encoder, row["slide_id"])]

    def _hash(self, tile_attrs: dict) -> str:
        return config_hash(embed_settings(self.enc_attrs, tile_attrs["config_hash"]))

    def state(self, row):
        tattrs = store_attrs(self.layout.tile_store(row["slide_id"]))
        if tattrs is None:
            return "missing", {}
        state = store_status(self.outputs(row)[0], self._hash(tattrs))
        return state, ({"n_tiles": int(tattrs["n_tiles"])} if state == "complete" else {})

    def plan(self, row) -> SlideJob:
        sid = row["slide_id"]
        tattrs, coords = self.tile_input(sid)
        mpp = mpp_override(row)
        return SlideJob(
            slide_id=sid,
            path=str(row["path"]),
            mpp=mpp,
            coords=coords,
            read_level=int(tattrs["read_level"]),
            read_px=int(tattrs["read_px"]),
            tile_attrs={**tattrs, "config_hash_embed": self._hash(tattrs)},
            step_px_level0=int(tattrs["stride_px_level0"]),
            group_reads=self.cfg.group_reads and can_group_reads(tattrs),
            reader=pick_reader(str(row["path"]), self.cfg.reader, mpp=mpp),
            decode=self._decode(str(row["path"]), mpp),
        )

    def _decode(self, path: str, mpp) -> str:
        """``pixels``, ``cpu`` or ``gpu`` for one slide (see :func:`wsimil.jpeg_tiles.pick_decode`)."""
        if self.cfg.decode == "pixels" or (self.cfg.decode == "auto" and self.device != "cuda"):
            return "pixels"
        same = pick_reader(path, "auto", mpp=mpp) == "tifffile"
        return pick_decode(path, self.cfg.decode, self.device, same_pyramid=same)

    def where(self, job) -> str:
        return job.path if isinstance(job, SlideJob) else super().where(job)

    def window_full(self, jobs: list[SlideJob]) -> bool:
        tiles = sum(len(j.coords) for j in jobs)
        return len(jobs) >= 256 or tiles >= max(16_384, 64 * self.cfg.batch_size)

    def run(self, jobs: list[SlideJob]):
        for i, job in enumerate(jobs):  # slides without tiles get an empty store right away
            if len(job.coords) == 0:
                self._begin(job).commit()
                yield i, SlideOutcome("empty", f"{job.slide_id}: 0 tiles (see tiles/status.jsonl)")
        work = [i for i, job in enumerate(jobs) if len(job.coords)]
        if work:
            for k, outcome in self._embed([jobs[i] for i in work]):
                yield work[k], outcome

    def _begin(self, job: SlideJob) -> PendingStore:
        return begin_feature_store(
            self.outputs({"slide_id": job.slide_id})[0],
            job,
            self.ecfg.feature_dim,
            self.enc_attrs,
            self.device,
        )

    def _embed(self, jobs: list[SlideJob]):
        """Run the loader over ``jobs``; yield (index, outcome) as each slide completes or fails.

        One batch is in flight: its features come back to the host (pinned memory,
        non-blocking on CUDA) while the next batch is decoded and launched, then are written.
        """
        books = SlideBooks(jobs, self._begin)
        in_flight = None
        try:
            for item in self._loader(jobs):
                launched = yield from self._launch(jobs, item["parts"], books)
                if in_flight is not None:
                    yield from self._land(jobs, in_flight, books)
                in_flight = launched
            if in_flight is not None:
                yield from self._land(jobs, in_flight, books)
        finally:
            books.abort_all()

    def _launch(self, jobs: list[SlideJob], parts: list[dict], books: SlideBooks):
        """Start one batch (parts of one or more slides); returns what :meth:`_land` writes.

        Yields (index, outcome) for slides that fail here: a part that failed to read or
        decode fails its slide only; an error of the model fails the slides of the batch.
        """
        good = []  # (slide index, tiles)
        for part in parts:
            j = part["job"]
            if not books.start(j):
                continue
            if part["error"]:
                yield j, books.fail(j, SlideOutcome("error", part["error"]))
                continue
            try:
                good.append((j, self._device_tiles(jobs[j], part)))
            except Exception as exc:
                yield j, books.fail(j, error_outcome(exc, jobs[j].path, self.folder.path))
        if not good:
            return None
        try:
            host, event = self._features(_concat([t for _, t in good], self.device))
        except Exception as exc:  # e.g. out of memory: the slides of this batch fail
            for j, _ in good:
                yield j, books.fail(j, error_outcome(exc, jobs[j].path, self.folder.path))
            return None
        return [(j, len(t)) for j, t in good], host, event

    def _land(self, jobs: list[SlideJob], launched, books: SlideBooks):
        """Write a launched batch's features to each slide's store, in order; yield outcomes."""
        routes, host, event = launched
        try:
            if event is not None:
                event.synchronize()
            feats = host.numpy()
        except Exception as exc:  # an asynchronous CUDA error surfaces here
            for j, _ in routes:
                yield j, books.fail(j, error_outcome(exc, jobs[j].path, self.folder.path))
            return
        row = 0
        for j, n in routes:
            try:
                outcome = books.write(j, feats[row : row + n])
            except Exception as exc:  # e.g. a full disk: this slide fails, maybe the stage stops
                outcome = books.fail(j, error_outcome(exc, jobs[j].path, self.folder.path))
            row += n
            if outcome is not None:
                yield j, outcome

    def _device_tiles(self, job: SlideJob, part: dict):
        """A part's (n, S, S, 3) uint8 tiles; compressed ones are decoded here, on the device."""
        if "packet" not in part:
            return part["tiles"]
        return decode_packet(
            part["packet"],
            self.device,
            size=self.ecfg.input_px,
            interpolation=self.ecfg.interpolation,
            where=job.path,
        )

    def _loader(self, jobs: list[SlideJob]):
        import torch

        dataset = TileBatches(
            jobs,
            batch_size=self.cfg.batch_size,
            input_px=self.ecfg.input_px,
            interpolation=self.ecfg.interpolation,
        )
        workers = loader_workers(self.cfg.num_workers, self.device)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            pin_memory=self.device == "cuda",
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )

    def _features(self, tiles):
        """(B, S, S, 3) uint8 tiles -> (B, D) float32 features for the host, and a CUDA event.

        On CUDA the copy to the host is queued (into one of two pinned buffers) and the event
        says when it is done; on the CPU the features are there and the event is None.
        """
        import torch

        from .encoders import normalise

        if self._model is None:
            # channels_last is faster for convolutions on both CUDA and CPU (about 2x here for
            # efficientnet_lite0 on 2 cores).
            model = self.encoder.to(self.device).to(memory_format=torch.channels_last)
            self._model = torch.compile(model) if self.cfg.compile else model
            self._amp = autocast_dtype(self.cfg.precision, self.ecfg.preferred_dtype, self.device)
        with torch.inference_mode():
            x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            x = normalise(x, self.ecfg).contiguous(memory_format=torch.channels_last)
            if self._amp is not None:
                with torch.autocast(self.device, dtype=self._amp):
                    f = self._model(x)
            else:
                f = self._model(x)
            f = f.float()
            if f.device.type != "cuda":
                return f, None
            self._flip = 1 - self._flip  # the other buffer may still hold the batch in flight
            buf = self._host[self._flip]
            if buf is None or buf.shape[0] < len(f):
                buf = self._host[self._flip] = torch.empty(f.shape, dtype=f.dtype, pin_memory=True)
            host = buf[: len(f)]
            host.copy_(f, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host, event


def _concat(tiles: list, device: str):
    """One batch of tiles on ``device`` (a single part is passed as it is)."""
    import torch

    if len(tiles) == 1:
        return tiles[0]
    return torch.cat([t.to(device, non_blocking=True) for t in tiles])


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
    DataFrame, one row per slide: slide_id, status, message, seconds, n_tiles.
    """
    from .encoders import create_encoder

    device = pick_device(cfg.device)
    if cfg.decode == "gpu" and device != "cuda":
        raise RuntimeError("--decode gpu needs CUDA for the encoder; use --decode cpu or auto")
    if encoder is None:
        encoder = create_encoder(cfg.encoder, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    stage = EmbedStage(RunLayout(out_dir), cfg, encoder, device)
    label = f"embed ({encoder.config.name}, {device})"
    return run_slides(
        stage, manifest, overwrite=overwrite, console=console, label=label, settings=cfg
    )
