"""User-provided tissue masks: a mask image or a GeoJSON of annotations, per slide.

``--mask`` takes a folder (``<slide_id>.geojson``, ``.json``, ``.png``, ``.tif``, ``.tiff``,
``.jpg`` are looked for in it) or a template containing ``{slide_id}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

MASK_SUFFIXES = (".geojson", ".json", ".png", ".tif", ".tiff", ".jpg", ".jpeg")


class MaskError(ValueError):
    """A mask file that cannot be used; the message names the file and what to fix."""


def resolve_mask_path(source: str, slide_id: str) -> Path:
    """The mask file of ``slide_id`` for a ``--mask`` folder or ``{slide_id}`` template."""
    if "{slide_id}" in source:
        path = Path(source.replace("{slide_id}", slide_id))
        if not path.is_file():
            raise MaskError(f"{path}: mask file for slide {slide_id} not found; check --mask")
        return path
    folder = Path(source)
    for suffix in MASK_SUFFIXES:
        path = folder / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    raise MaskError(
        f"{folder}: no mask for slide {slide_id} (looked for {slide_id}{{{','.join(MASK_SUFFIXES)}}}); "
        "add it or use a --mask template with {slide_id}"
    )


def load_mask(path: str | Path, *, width_px: int, height_px: int, downsample: float) -> np.ndarray:
    """Rasterise a mask file onto the slide's mask grid.

    Parameters
    ----------
    path : path
        GeoJSON (FeatureCollection, a list of features, a Feature or a geometry; Polygon and
        MultiPolygon in level-0 px, holes honoured) or an image whose non-zero pixels are
        tissue, covering the whole slide at any scale.
    width_px, height_px : int
        Slide level-0 size.
    downsample : float
        Level-0 px per mask px.

    Returns
    -------
    ndarray, shape (ceil(height_px / downsample), ceil(width_px / downsample)), bool
    """
    path = Path(path)
    shape = (max(1, math.ceil(height_px / downsample)), max(1, math.ceil(width_px / downsample)))
    if path.suffix.lower() in (".geojson", ".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MaskError(
                f"{path}: cannot read GeoJSON ({exc}); export annotations from QuPath as GeoJSON"
            ) from exc
        polygons = list(_polygons(data))
        if not polygons:
            raise MaskError(f"{path}: no Polygon or MultiPolygon annotations found")
        return rasterise_polygons(polygons, shape=shape, downsample=downsample)
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except Exception as exc:
        raise MaskError(
            f"{path}: cannot read mask image ({exc}); give a PNG/TIFF with tissue non-zero"
        ) from exc
    from .raster import resize_mask

    return resize_mask(arr > 0, shape)


def _polygons(obj):
    """Yield each polygon as a list of rings (exterior first), each an (K, 2) array."""
    if isinstance(obj, list):
        for item in obj:
            yield from _polygons(item)
        return
    if not isinstance(obj, dict):
        return
    kind = obj.get("type")
    if kind == "FeatureCollection":
        yield from _polygons(obj.get("features", []))
    elif kind == "Feature":
        yield from _polygons(obj.get("geometry"))
    elif kind == "GeometryCollection":
        yield from _polygons(obj.get("geometries", []))
    elif kind == "Polygon":
        yield [np.asarray(r, float)[:, :2] for r in obj["coordinates"] if len(r) >= 3]
    elif kind == "MultiPolygon":
        for poly in obj["coordinates"]:
            yield [np.asarray(r, float)[:, :2] for r in poly if len(r) >= 3]


def rasterise_polygons(
    polygons: list[list[np.ndarray]], *, shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """Fill polygons (level-0 px rings, exterior then holes) on a ``shape`` (h, w) grid."""
    from skimage.draw import polygon as fill

    mask = np.zeros(shape, bool)
    for rings in polygons:
        if not rings:
            continue
        part = np.zeros(shape, bool)
        for i, ring in enumerate(rings):
            rr, cc = fill(ring[:, 1] / downsample - 0.5, ring[:, 0] / downsample - 0.5, shape=shape)
            part[rr, cc] = i == 0
        mask |= part
    return mask
