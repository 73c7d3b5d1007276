"""Heatmap exports for review tools: QuPath GeoJSON, a pyramidal heatmap TIFF, top-tile crops.

Every writer is memory-bounded by the number of tiles or by one output tile, never by the
slide's level-0 size: the pyramidal TIFF is generated tile by tile from a small grid image
(one cell per tile-grid step), and identical output tiles (background, tiles inside one grid
cell) are JPEG-encoded once and reused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MEASUREMENTS = ("attention", "attention_scaled", "rank", "instance_score")


def write_geojson(path: str | Path, table, *, tile_px_level0: int, slide_id: str = "") -> int:
    """Write one QuPath ``tile`` object per tile as a GeoJSON FeatureCollection.

    Parameters
    ----------
    path : str or Path
        Output ``.geojson`` (written under a temporary name, then renamed).
    table : DataFrame, N rows
        Columns ``x``, ``y`` (level-0 top-left) and any of :data:`MEASUREMENTS`.
    tile_px_level0 : int
        Tile side in level-0 pixels.

    Returns
    -------
    int
        Number of features written.

    Notes
    -----
    QuPath reads ``properties.objectType`` and the ``properties.measurements`` dict; polygons
    are in level-0 pixel coordinates, closed rings, counter-clockwise in image axes.
    NaN measurements (e.g. ``instance_score`` for attention models) are left out.
    """
    path = Path(path)
    t = int(tile_px_level0)
    cols = [c for c in MEASUREMENTS if c in table.columns]
    xs = table["x"].to_numpy(np.int64)
    ys = table["y"].to_numpy(np.int64)
    vals = {c: table[c].to_numpy(np.float64) for c in cols}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [\n')
        for i in range(len(xs)):
            x, y = int(xs[i]), int(ys[i])
            meas = {c: round(float(vals[c][i]), 6) for c in cols if math.isfinite(vals[c][i])}
            feat = {
                "type": "Feature",
                "id": f"{slide_id}-{i}" if slide_id else str(i),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "name": f"tile {i}",
                    "isLocked": True,
                    "measurements": meas,
                },
            }
            fh.write(("," if i else "") + json.dumps(feat, separators=(",", ":")) + "\n")
        fh.write("]}\n")
    tmp.replace(path)
    return len(xs)


def grid_step(coords: np.ndarray, tile_px_level0: int) -> int:
    """Level-0 px per cell of a grid on which every tile edge falls (gcd of coords and tile size).

    Capped below at ``tile_px_level0 // 16`` so unaligned tiles still give a small grid.
    """
    g = int(tile_px_level0)
    if len(coords):
        g = math.gcd(g, int(np.gcd.reduce(np.asarray(coords, np.int64).ravel())))
    return max(g, max(1, int(tile_px_level0) // 16))


def colour_lut(cmap: str) -> np.ndarray:
    """The colormap as a (256, 3) uint8 table."""
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def _level_sizes(
    width: int, height: int, *, min_long_side: int = 1024
) -> list[tuple[int, int, int]]:
    """(width, height, downsample) per level: halving until the long side is <= min_long_side."""
    out, d = [(width, height, 1)], 1
    while max(-(-width // d), -(-height // d)) > min_long_side:
        d *= 2
        out.append((-(-width // d), -(-height // d), d))
    return out


def write_heatmap_tiff(
    path: str | Path,
    values: np.ndarray,
    coords: np.ndarray,
    *,
    tile_px_level0: int,
    width_px: int,
    height_px: int,
    mpp: float | None,
    cmap: str = "turbo",
    tile_px: int = 512,
    quality: int = 90,
) -> dict:
    """Write the tile values as a pyramidal, tiled, JPEG RGB BigTIFF with the slide's geometry.

    Level 0 is ``width_px`` x ``height_px`` (the slide's level 0), reduced levels halve the size
    and are separate pages with ``subfiletype=1`` so OpenSlide and QuPath see one multi-level
    image; resolution tags carry the mpp. Tissue without tiles and background are white.

    Parameters
    ----------
    values : ndarray, shape (N,)
        Per-tile values in [0, 1] (overlapping tiles are averaged).
    coords : ndarray, shape (N, 2)
        Level-0 (x, y) of each tile's top-left corner.
    mpp : float or None
        Microns per level-0 pixel; None writes no resolution.

    Returns
    -------
    dict: ``levels`` [(w, h), ...], ``grid_step`` (level-0 px per grid cell), ``tiles_encoded``
    (distinct JPEG tiles), ``tiles_written``.

    Notes
    -----
    Memory: the grid image is (height / step, width / step) and one output tile is built at a
    time, so a 100,000 x 100,000 px slide needs megabytes, not the 30 GB of its level 0.
    """
    import imagecodecs
    import tifffile

    from .heatmap import paint_tiles

    path = Path(path)
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16, got {tile_px}")
    step = grid_step(coords, tile_px_level0)
    gh, gw = -(-int(height_px) // step), -(-int(width_px) // step)
    heat, covered = paint_tiles(
        np.asarray(values, np.float64),
        np.asarray(coords),
        tile_px_level0=tile_px_level0,
        downsample=step,
        shape=(gh, gw),
    )
    lut = colour_lut(cmap)
    # grid colour index: 0..255 colour, 256 = white background
    idx = np.where(covered, np.clip(np.rint(heat * 255), 0, 255).astype(np.int16), 256).astype(
        np.int16
    )
    palette = np.concatenate([lut, np.full((1, 3), 255, np.uint8)])
    cache: dict = {}
    stats = {"tiles_encoded": 0, "tiles_written": 0}

    def encode(tile: np.ndarray) -> bytes:
        stats["tiles_encoded"] += 1
        return imagecodecs.jpeg8_encode(
            tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
        )

    def level_tiles(w: int, h: int, d: int) -> Iterator[bytes]:
        for ty in range(0, h, tile_px):
            gy = np.minimum((np.arange(ty, ty + tile_px, dtype=np.int64) * d) // step, gh - 1)
            for tx in range(0, w, tile_px):
                gx = np.minimum((np.arange(tx, tx + tile_px, dtype=np.int64) * d) // step, gw - 1)
                block = idx[gy[0] : gy[-1] + 1, gx[0] : gx[-1] + 1]
                first = block.flat[0]
                if (block == first).all():
                    key = ("const", int(first))
                else:
                    key = None
                if key is not None and key in cache:
                    data = cache[key]
                else:
                    # gy/gx are runs of equal cells: repeat the small block instead of gathering
                    _, cy = np.unique(gy, return_counts=True)
                    _, cx = np.unique(gx, return_counts=True)
                    data = encode(np.repeat(np.repeat(palette[block], cy, axis=0), cx, axis=1))
                    if key is not None:
                        cache[key] = data
                stats["tiles_written"] += 1
                yield data

    levels = _level_sizes(int(width_px), int(height_px))
    common = dict(
        photometric="rgb",
        compression="jpeg",
        subsampling=(2, 2),
        tile=(tile_px, tile_px),
        dtype=np.uint8,
        metadata=None,
        software="wsimil.heatmap",
    )
    tmp = path.with_name(f".{path.name}.tmp.tiff")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, (w, h, d) in enumerate(levels):
            extra = (
                {}
                if mpp is None
                else dict(
                    resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER"
                )
            )
            tw.write(
                data=level_tiles(w, h, d),
                shape=(h, w, 3),
                subfiletype=1 if k else 0,
                **extra,
                **common,
            )
    tmp.replace(path)
    return {"levels": [(w, h) for w, h, _ in levels], "grid_step": step, **stats}


def write_top_crops(
    slide,
    table,
    out_dir: str | Path,
    *,
    k: int,
    tile_px_level0: int,
    crop_px: int = 256,
    prefix: str = "",
) -> list[dict]:
    """Save the ``k`` highest-attention tiles as JPEG crops read from the slide.

    Parameters
    ----------
    slide : wsimil.slide.Slide
    table : DataFrame
        Columns ``x``, ``y``, ``attention`` (+ ``attention_scaled``, ``rank``).
    out_dir : Path
        Folder for the crops (created).
    crop_px : int
        Side of each saved crop; read from the finest level at or coarser than needed.

    Returns
    -------
    list of dict: ``file`` (name in ``out_dir``), ``rank`` (1 = highest), ``x``, ``y``, ``attention``,
    ``attention_scaled``.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-table["attention"].to_numpy(np.float64), kind="stable")[: max(0, int(k))]
    level = slide.best_level_at_or_finer(tile_px_level0 / crop_px)
    ds = float(slide.level_downsamples[level])
    side = max(1, int(math.ceil(tile_px_level0 / ds)))
    out = []
    for r, i in enumerate(order, start=1):
        x, y = int(table["x"].iloc[i]), int(table["y"].iloc[i])
        img = slide.read_region((x, y), level, (side, side))
        im = Image.fromarray(img)
        if side != crop_px:
            im = im.resize((crop_px, crop_px), Image.Resampling.LANCZOS)
        name = f"{prefix}top{r:02d}_x{x}_y{y}.jpg"
        im.save(out_dir / name, quality=90)
        rec = {
            "file": name,
            "rank": r,
            "x": x,
            "y": y,
            "attention": float(table["attention"].iloc[i]),
        }
        if "attention_scaled" in table.columns:
            rec["attention_scaled"] = float(table["attention_scaled"].iloc[i])
        out.append(rec)
    return out
