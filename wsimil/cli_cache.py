"""``wsimil cache``: the tile stage's tiles as uint8 pixels, for end-to-end training
(library code in :mod:`wsimil.tile_cache`)."""

from __future__ import annotations

import click

from .cli_common import (
    CONFIG,
    MANIFEST,
    OVERWRITE,
    RUN_DIR,
    SHARD,
    SLIDES,
    _console,
    _finish,
    _load,
    _select,
)
from .cli_options import section_options
from .config import CacheConfig


@click.command()
@RUN_DIR
@MANIFEST
@CONFIG
@OVERWRITE
@SHARD
@SLIDES
@section_options(CacheConfig, "cache")
def cache(run_dir, manifest, config_file, overwrite, shard, slides, overrides):
    """Write every slide's tiles as uint8 pixels, px x px -> RUN_DIR/tile_cache/<px>px/<slide_id>.zarr.

    For training a CNN with the MIL pooling end to end: epochs read the cache, not the slides.
    """
    from .tile_cache import run_cache

    cfg, df = _load(run_dir, manifest, config_file, overrides=overrides)
    if cfg.cache.px is None:
        raise click.UsageError("--px is required: the side of the cached tiles, 8..1024 pixels")
    console = _console()
    try:
        result = run_cache(
            _select(df, shard, slides), run_dir, **cfg.cache.model_dump(), overwrite=overwrite,
            console=console,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    _finish(console, result, f"cache ({cfg.cache.px}px)", ["n_tiles"])
