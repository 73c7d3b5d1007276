"""A slide's heatmap outputs: the overlay and thumbnail (:func:`export_slide`), and exports for
review tools: QuPath GeoJSON, a pyramidal heatmap TIFF, top-tile crops.

Every writer is memory-bounded by the number of tiles or by one output tile, never by the
slide's level-0 size: the pyramidal TIFF is generated tile by tile from a small grid image
(one cell per tile-grid step), and identical output tiles (background, tiles inside one grid
cell) are JPEG-encoded once and reused.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .layout import HeatmapFiles
from .overlay import render_overlay, scale_values
from .pyramid import IndexedGridTiles, PyramidLevel, level_sizes, write_tiff_pyramid
from .raster import colour_lut, mask_outline, paint_tiles, smooth_heat

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


def _level_sizes(
    width: int, height: int, *, min_long_side: int = 1024
) -> list[tuple[int, int, int]]:
    """(width, height, downsample) per level: halving until the long side is <= min_long_side."""
    return level_sizes(width, height, factor=2, max_long_side=min_long_side)


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
    tiles = IndexedGridTiles(idx, palette, step=step, tile_px=tile_px, jpeg_quality=quality)
    levels = _level_sizes(int(width_px), int(height_px))
    write_tiff_pyramid(
        path,
        [PyramidLevel(w, h, tiles.level(w, h, d), downsample=d) for w, h, d in levels],
        tile_px=tile_px,
        mpp=mpp,
        jpeg_quality=quality,
        software="wsimil.heatmap",
        atomic=True,
    )
    return {
        "levels": [(w, h) for w, h, _ in levels],
        "grid_step": step,
        "tiles_encoded": tiles.tiles_encoded,
        "tiles_written": tiles.tiles_written,
    }


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
    order = top_order(table["attention"].to_numpy(np.float64), k)
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


LEGEND = {"rank": "rank in slide", "minmax": "min-max in slide"}


def top_order(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest values, highest first (ties: first row first)."""
    return np.argsort(-np.asarray(values, np.float64), kind="stable")[: max(0, int(k))]


def _top_boxes(table, k: int, tile_px_level0: int, ds: float) -> list[tuple[int, int, int, int]]:
    """Thumbnail-pixel boxes of the ``k`` highest-attention tiles, best first."""
    boxes = []
    for i in top_order(table["attention"].to_numpy(np.float64), k):
        x, y = float(table["x"].iloc[i]) / ds, float(table["y"].iloc[i]) / ds
        t = tile_px_level0 / ds
        boxes.append((int(x), int(y), int(math.ceil(x + t)) - 1, int(math.ceil(y + t)) - 1))
    return boxes


def _class_overlays(table, thumb, ds, coords, files, cfg, tile_px_level0, *, title, draw):
    """One overlay per class for models with a map per class (``map_<class>`` columns, each
    scaled on its own): ``<slide_id>.class<k>.png``, k the class's position (class names never
    reach a file name). Returns class name -> file name."""
    from PIL import Image

    out = {}
    for k, col in enumerate(c for c in table.columns if c.startswith("map_")):
        name = col[len("map_") :]
        heat, covered = paint_tiles(scale_values(table[col].to_numpy(np.float64), cfg.scale),
                                    coords, tile_px_level0=tile_px_level0, downsample=ds,
                                    shape=thumb.shape[:2])  # fmt: skip
        heat = smooth_heat(heat, covered, sigma_px=cfg.smooth_tiles * tile_px_level0 / ds)
        img = render_overlay(thumb, heat, covered, title=f"{title}  evidence for {name}",
                             legend=f"evidence for {name}, {LEGEND[cfg.scale]}",
                             **draw)  # fmt: skip
        path = files.folder / f"{files.slide_id}.class{k}.png"
        Image.fromarray(img).save(path)
        out[name] = path.name
    return out


def export_slide(
    slide,
    table,
    *,
    slide_id: str,
    tile_px_level0: int,
    out_dir: str | Path,
    cfg,
    title: str = "",
    tissue: tuple[np.ndarray, float] | None = None,
) -> dict:
    """Write the overlay, thumbnail and review-tool exports of one slide into ``out_dir``.

    Parameters
    ----------
    slide : wsimil.slide.Slide
        The open slide (thumbnail, crops, geometry).
    table : DataFrame, N rows
        ``x``, ``y`` and the per-tile scores of :func:`wsimil.heatmap.slide_scores`.
    out_dir : path
        The slide's (partial) output folder; files are named as :class:`wsimil.layout.HeatmapFiles`.
    tissue : (mask, mask_downsample), optional
        Tissue mask from the tile store, for the outline.

    Returns
    -------
    dict: ``overlay``, ``thumbnail``, ``geojson``, ``tiff`` (file names or None), ``top`` (list of
    crop records, see :func:`write_top_crops`, files under ``top/``), ``seconds`` per output.
    """
    from PIL import Image

    files = HeatmapFiles(Path(out_dir), slide_id)
    secs: dict[str, float] = {}
    res: dict = {"overlay": files.overlay.name, "thumbnail": files.thumbnail.name,
                 "geojson": None, "tiff": None, "top": []}  # fmt: skip
    coords = table[["x", "y"]].to_numpy(np.int64)
    scaled = scale_values(table["attention"].to_numpy(np.float64), cfg.scale)

    t0 = time.perf_counter()
    thumb, ds = slide.thumbnail(cfg.thumbnail_px)
    heat, covered = paint_tiles(
        scaled, coords, tile_px_level0=tile_px_level0, downsample=ds, shape=thumb.shape[:2]
    )
    heat = smooth_heat(heat, covered, sigma_px=cfg.smooth_tiles * tile_px_level0 / ds)
    outline = None
    if tissue is not None and cfg.tissue_outline:
        outline = mask_outline(tissue[0], thumb.shape[:2])
    um_per_px = slide.mpp * ds if slide.mpp else None
    draw = dict(cmap=cfg.cmap, alpha=cfg.alpha, outline=outline, um_per_px=um_per_px,
                scale=cfg.scale,
                boxes=_top_boxes(table, cfg.top_k, tile_px_level0, ds))  # fmt: skip
    img = render_overlay(thumb, heat, covered, title=title,
                         legend=f"attention, {LEGEND[cfg.scale]}", **draw)  # fmt: skip
    Image.fromarray(img).save(files.overlay)
    Image.fromarray(thumb).save(files.thumbnail, quality=85)
    res["class_overlays"] = _class_overlays(table, thumb, ds, coords, files, cfg, tile_px_level0,
                                            title=title, draw=draw)  # fmt: skip
    secs["overlay"] = time.perf_counter() - t0

    if cfg.geojson:
        t0 = time.perf_counter()
        write_geojson(files.geojson, table, tile_px_level0=tile_px_level0, slide_id=slide_id)
        res["geojson"], secs["geojson"] = files.geojson.name, time.perf_counter() - t0
    if cfg.pyramid_tiff:
        t0 = time.perf_counter()
        w, h = slide.dimensions
        write_heatmap_tiff(
            files.tiff, scaled, coords, tile_px_level0=tile_px_level0, width_px=w,
            height_px=h, mpp=slide.mpp, cmap=cfg.cmap,
        )  # fmt: skip
        res["tiff"], secs["tiff"] = files.tiff.name, time.perf_counter() - t0
    if cfg.top_k > 0:
        t0 = time.perf_counter()
        res["top"] = write_top_crops(
            slide, table, files.top_dir, k=cfg.top_k, tile_px_level0=tile_px_level0,
            crop_px=cfg.crop_px,
        )  # fmt: skip
        secs["top"] = time.perf_counter() - t0
    res["seconds"] = secs
    return res
