"""``wsimil cache``: every slide's tiles as uint8 pixels in one Zarr store, written once.

Training a CNN jointly with the MIL pooling (end to end, from tile pixels) reads each tile
every epoch; decoding the slides again each time would dominate. This stage reads, once, the
tiles the ``tile`` stage chose (``tiles/<slide_id>.zarr``: their coordinates, read level and
read size), with the embed stage's reader (:class:`wsimil.tile_reader.TileBatches` in
DataLoader workers), resizes each to ``px`` x ``px`` with the same antialiased resize
(:func:`wsimil.tile_reader.resize_tile`, bilinear) and writes

    tile_cache/<px>px/<slide_id>.zarr   tiles (N, px, px, 3) uint8, one chunk per tile (256
                                        per shard file), rows in the tile store's order;
                                        coords (N, 2) as the tile store's; self-describing attrs

batch by batch (memory is bounded by a few batches, never the whole slide), compressed with
LZ4, which decodes fastest (``tiles[i]`` reads one tile). The store is written under its
partial name and renamed into place when complete (:mod:`wsimil.store`); slides run through
:func:`wsimil.runner.run_slides` (locks, ``status.jsonl``, skip and resume, one error line per
bad slide). :func:`open_cache` opens a slide's store for training and refuses one made from
other tiles than the current tile store's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .config import CacheConfig
from .devices import spare_cpus
from .earlier import FromTileStore, before_embed
from .layout import RunLayout, check_px
from .manifest import mpp_override
from .runner import SlideOutcome, SlideStage, run_slides
from .slide import SlideError
from .store import (
    RowWriter,
    atomic_store,
    config_hash,
    fast_compressors,
    open_store,
    store_attrs,
    tile_store_coords,
    write_array,
)
from .tile_reader import SlideJob, TileBatches, can_group_reads, pick_reader

FORMAT = "wsimil-tile-cache"
FORMAT_VERSION = 1
SHARD_TILES = 256  # tiles per shard file: a slide of 20,000 tiles is 79 files, not 20,000
INTERPOLATION = "bilinear"  # resize_tile's antialiased default, as the embed stage's encoders


def coords_sha256(coords: np.ndarray) -> str:
    """SHA-256 of a tile store's ``coords`` as int32 (N, 2) bytes: which tiles a cache holds."""
    return hashlib.sha256(np.ascontiguousarray(coords, dtype=np.int32).tobytes()).hexdigest()


def cache_settings(px: int, tile_attrs: dict, coords_sha: str) -> dict:
    """Settings that shape a cache store (hashed into its ``config_hash``)."""
    return {
        "stage": "cache",
        "format_version": FORMAT_VERSION,
        "px": px,
        "interpolation": INTERPOLATION,
        "tiles_config_hash": tile_attrs.get("config_hash"),
        "coords_sha256": coords_sha,
    }


def cache_attrs(row: dict, px: int, tile_attrs: dict, coords: np.ndarray) -> dict:
    """The attributes of a slide's cache store (without opening the slide)."""
    sha = coords_sha256(coords)
    tile_px, mpp = int(tile_attrs["tile_px"]), float(tile_attrs["target_mpp"])
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "slide_id": str(row["slide_id"]),
        "source": str(row["path"]),
        "n_tiles": int(len(coords)),
        "px": px,
        "tile_px": tile_px,
        "mpp": mpp,
        "cache_mpp": mpp * tile_px / px,
        "interpolation": INTERPOLATION,
        "coords_sha256": sha,
        "tile_config_hash": tile_attrs.get("config_hash"),
        "tiles": {k: tile_attrs[k] for k in sorted(tile_attrs)},
        # what an end-to-end model reads, in the feature stores' terms (deploy.feature_signature)
        "encoder": {"name": "pixels", "px": px},
        "config_hash": config_hash(cache_settings(px, tile_attrs, sha)),
        "wsimil_version": __version__,
    }


def auto_workers(setting: int) -> int:
    """Reader processes: ``setting``, or (0) every usable CPU but the writer's, up to 16."""
    return setting if setting > 0 else spare_cpus()


class CacheStage(FromTileStore, SlideStage):
    """``wsimil cache`` for :func:`wsimil.runner.run_slides`: one slide = one cache store."""

    name = "cache"
    columns = {"n_tiles": 0}
    changed = "other tiles (the tile stage was re-run with other settings or masks)"

    def __init__(self, layout: RunLayout, cfg: CacheConfig):
        super().__init__(layout.tile_cache(cfg.px))
        self.layout, self.cfg, self.px = layout, cfg, check_px(cfg.px)
        self.earlier = before_embed(layout)  # like embed, the cache needs only the tile stage

    def outputs(self, row):
        return [self.layout.tile_cache_store(self.px, row["slide_id"])]

    def state(self, row):
        attrs = store_attrs(self.outputs(row)[0])
        tiles = tile_store_coords(self.layout, row["slide_id"]) if attrs is not None else None
        if tiles is None:  # no cache, or no tile store to check it against (check() says so)
            return "missing", {}
        expected = config_hash(cache_settings(self.px, tiles[0], coords_sha256(tiles[1])))
        if attrs.get("config_hash") != expected:
            return "changed", {}
        return "complete", {"n_tiles": int(attrs.get("n_tiles", 0))}

    def plan(self, row) -> SlideJob:
        sid, path = row["slide_id"], str(row["path"])
        tattrs, coords = self.tile_input(sid)
        mpp = mpp_override(row)
        return SlideJob(
            slide_id=sid,
            path=path,
            mpp=mpp,
            coords=coords,
            read_level=int(tattrs["read_level"]),
            read_px=int(tattrs["read_px"]),
            tile_attrs=cache_attrs(row, self.px, tattrs, coords),
            step_px_level0=int(tattrs["stride_px_level0"]),
            group_reads=can_group_reads(tattrs),  # same pixels as tile-by-tile reads
            reader=pick_reader(path, self.cfg.reader, mpp=mpp),
        )

    def where(self, job) -> str:
        return job.path if isinstance(job, SlideJob) else super().where(job)

    def run_one(self, job: SlideJob) -> SlideOutcome:
        n = write_cache(self.outputs({"slide_id": job.slide_id})[0], job, self._batches(job))
        if n == 0:
            return SlideOutcome("empty", f"{job.slide_id}: 0 tiles (see tiles/status.jsonl)")
        return SlideOutcome("ok", "", {"n_tiles": n})

    def _batches(self, job: SlideJob):
        """The slide's tiles, (n, px, px, 3) uint8 arrays in tile order, read by workers."""
        if len(job.coords) == 0:
            return
        import torch

        from .embed import _worker_init

        dataset = TileBatches(
            [job],
            batch_size=self.cfg.batch_size,
            input_px=self.px,
            interpolation=INTERPOLATION,
            cross_slide=False,
        )
        workers = min(auto_workers(self.cfg.workers), len(dataset))
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            worker_init_fn=_worker_init,
            prefetch_factor=2,
        )
        for item in loader:
            for part in item["parts"]:
                if part["error"]:
                    raise SlideError(part["error"])
                yield part["tiles"].numpy()


def write_cache(path: Path, job: SlideJob, batches, *, shard_tiles: int = SHARD_TILES) -> int:
    """Write ``batches`` (uint8 tile blocks in order) as ``path``'s ``tiles``; returns N.

    Whole shard files (``shard_tiles`` tiles) are written as the batches come: memory holds
    at most a shard and a batch.

    The store appears at ``path`` only when all N tiles are written; on any failure nothing
    is left there (nor at its partial name).
    """
    n, attrs = len(job.coords), job.tile_attrs
    px = int(attrs["px"])
    with atomic_store(path) as group:
        tiles = group.create_array(
            "tiles",
            shape=(n, px, px, 3),
            dtype="uint8",
            chunks=(1, px, px, 3),  # a tile per chunk, SHARD_TILES chunks per file
            shards=(max(1, min(shard_tiles, n)), px, px, 3),
            compressors=fast_compressors(),
        )
        writer = RowWriter(tiles)
        for block in batches:
            if writer.rows + len(block) > n or block.shape[1:] != (px, px, 3):
                raise RuntimeError(f"{job.path}: the reader gave more or other tiles than {n}")
            writer.append(np.ascontiguousarray(block, dtype=np.uint8))
        writer.flush()
        if writer.rows != n:
            raise RuntimeError(f"{job.path}: the reader gave {writer.rows} tiles of {n}")
        write_array(group, "coords", job.coords)  # (N, 2) level-0 x, y: heatmaps place tiles
        group.update_attributes(attrs)  # last: a store with attrs has all its tiles
    return n


def run_cache(
    manifest: pd.DataFrame,
    out_dir: str | Path,
    *,
    px: int,
    overwrite: bool = False,
    workers: int = 0,
    batch_size: int = 64,
    reader: str = "auto",
    console=None,
) -> pd.DataFrame:
    """Cache the tiles of every slide of ``manifest`` (tiled in ``out_dir/tiles``) at ``px``.

    Slides whose complete cache exists with the same settings and tiles are skipped; one made
    from other tiles is an error unless ``overwrite``. Several processes can share a cohort.

    Parameters
    ----------
    px : int
        Side of the cached tiles (8..1024); each tile is resized from the tile stage's size.
    workers : int
        Reader processes (0: auto).
    batch_size : int
        Tiles read, resized and written per batch.
    reader : {"auto", "openslide", "tifffile"}
        As ``wsimil embed --reader``.

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, message, seconds, n_tiles.

    Raises
    ------
    ValueError
        A bad setting (one line), e.g. ``px`` outside 8..1024.
    """
    from pydantic import ValidationError

    check_px(px)
    try:
        cfg = CacheConfig(px=px, workers=workers, batch_size=batch_size, reader=reader)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(
            f"cache.{err['loc'][0]} = {err['input']!r}: {err['msg'].lower()}"
        ) from None
    stage = CacheStage(RunLayout(out_dir), cfg)
    return run_slides(
        stage, manifest, overwrite=overwrite, console=console, label=f"cache ({px}px)", settings=cfg
    )


def open_cache(
    layout: RunLayout,
    px: int,
    slide_id: str,
    *,
    coords: np.ndarray | None = None,
    tile_store_attrs: dict | None = None,
):
    """A slide's complete tile cache (``tiles``, a read-only Zarr array (N, px, px, 3) uint8).

    Checks that it belongs to the current tiles: its ``coords_sha256`` against ``coords`` (by
    default the tile store's coords) and, when ``tile_store_attrs`` is given, its
    ``tile_config_hash`` against theirs.

    Raises
    ------
    FileNotFoundError
        No complete cache store (or no tile store to check it against); one line.
    ValueError
        The store is not a tile cache of this format, or was made from other tiles; one line.
    """
    path = layout.tile_cache_store(px, slide_id)
    redo = f"run `wsimil cache {layout.root} --px {px}"
    attrs = store_attrs(path)
    if attrs is None:
        raise FileNotFoundError(f"{path}: no complete tile cache; {redo}`")
    if attrs.get("format") != FORMAT or attrs.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: not a {FORMAT} store of format version {FORMAT_VERSION}; {redo} --overwrite`"
        )
    if coords is None:
        tiles = tile_store_coords(layout, slide_id)
        if tiles is None:
            raise FileNotFoundError(
                f"{path}: no tile store {layout.tile_store(slide_id)} to check it against; "
                "run `wsimil tile` first"
            )
        coords = tiles[1]
    stale = coords_sha256(coords) != attrs.get("coords_sha256")
    if tile_store_attrs is not None:
        stale |= tile_store_attrs.get("config_hash") != attrs.get("tile_config_hash")
    if stale:
        raise ValueError(
            f"{path}: made from other tiles than the current tile store "
            f"{layout.tile_store(slide_id)}; {redo} --overwrite`"
        )
    tiles = open_store(path)["tiles"]
    if tiles.shape != (len(coords), px, px, 3) or tiles.dtype != np.uint8:
        raise ValueError(f"{path}: tiles are {tiles.shape} {tiles.dtype}; {redo} --overwrite`")
    return tiles
