"""Features in from CLAM and TRIDENT, and out to TRIDENT (``wsimil import-features`` /
``export-features``).

Import reads, for every slide of the run's manifest (ids from the manifest only, never from
the files), one HDF5 file and writes the slide's feature store where ``wsimil embed`` would:
``features/<encoder>/<slide_id>.zarr`` with ``features`` (N, D) float16, ``coords`` (N, 2)
int32 and attrs holding the encoder and the tile geometry, so train, predict and heatmap use it
as they use embedded features. Layouts read (as CLAM and TRIDENT write them with h5py):

- CLAM (``extract_features_fp.py``): ``h5_files/<slide>.h5`` with ``features`` (N, D) float32
  and ``coords`` (N, 2) int32, no attrs (``pt_files/<slide>.pt`` holds the same features
  without coordinates and is only cross-checked). The tile geometry comes from flags:
  ``target_mpp`` and ``tile_px`` (and ``tile_px_level0`` when not ``tile_px * target_mpp /
  slide mpp``).
- TRIDENT (``features_<encoder>/<slide>.h5``): ``features`` (N, D) with attrs ``name``,
  ``encoder``; ``coords`` (N, 2) int64 with attrs ``patch_size`` (px at the target
  magnification), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap``, ``name``, ``level0_width``, ``level0_height``. ``target_mpp`` is
  ``10 / target_magnification`` (20x = 0.5 µm/px) unless given.

A bad file (unreadable, a missing dataset, lengths that differ, another slide's file, wrong
dtype or shape, coordinates outside the slide) fails that slide with one line naming the file
and what to do; the other slides go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .layout import RunLayout, check_slide_id
from .manifest import mpp_override
from .runner import SlideOutcome, SlideStage, run_slides
from .slide import SlideError
from .store import atomic_store, config_hash, store_status, write_array

FORMATS = ("clam", "trident")
#: TRIDENT's encoder names -> wsimil's named encoders (the same models)
TRIDENT_NAMES = {
    "uni_v1": "uni", "uni_v2": "uni2-h", "virchow2": "virchow2", "hoptimus0": "h-optimus-0",
    "hoptimus1": "h-optimus-1", "gigapath": "prov-gigapath", "phikon_v2": "phikon-v2",
    "conch_v15": "conch-v1.5", "resnet50": "resnet50_trunc",
}  # fmt: skip


@dataclass(frozen=True)
class Geometry:
    """Flags for files without geometry attrs (CLAM), or overriding TRIDENT's."""

    target_mpp: float | None = None
    tile_px: int | None = None
    tile_px_level0: int | None = None


def source_folder(src: Path, fmt: str) -> tuple[Path, str | None]:
    """The folder holding ``<slide_id>.h5`` and, for TRIDENT, its encoder name (from the name)."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src}: not a folder; give the {fmt} output folder")
    if fmt == "clam":
        return (src / "h5_files" if (src / "h5_files").is_dir() else src), None
    if src.name.startswith("features_"):
        return src, src.name[len("features_") :]
    found = sorted(p for p in [*src.glob("features_*"), *src.glob("*/features_*")] if p.is_dir())
    if len(found) != 1:
        what = ", ".join(str(p) for p in found[:5]) if found else "none"
        raise ValueError(
            f"{src}: expected one features_<encoder> folder, found {what}; pass that folder itself"
        )
    return found[0], found[0].name[len("features_") :]


def _attr(value):
    """An HDF5 attribute as plain Python (bytes -> str, numpy scalars -> numbers)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_h5(path: Path, slide_id: str, fmt: str) -> dict:
    """Features, coords and attrs of one file, validated; ValueError (one line) otherwise."""
    import h5py

    fix = f"re-export it with {fmt.upper()} or remove it"
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("features", "coords") if k not in f]
            if missing:
                raise ValueError(f"{path}: no {' or '.join(map(repr, missing))} dataset; {fix}")
            feats, coords = f["features"], f["coords"]
            fattrs = {k: _attr(v) for k, v in feats.attrs.items()}
            cattrs = {k: _attr(v) for k, v in coords.attrs.items()}
            empty = feats.shape == (0,)  # TRIDENT's file of a slide without tiles
            if (feats.ndim != 2 and not empty) or feats.dtype.kind != "f":
                raise ValueError(
                    f"{path}: 'features' is {feats.dtype} {feats.shape}, expected (N, D) floats; {fix}"
                )
            if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype.kind not in "iu":
                raise ValueError(
                    f"{path}: 'coords' is {coords.dtype} {coords.shape}, expected (N, 2) integers; {fix}"
                )
            if feats.shape[0] != coords.shape[0]:
                raise ValueError(
                    f"{path}: {feats.shape[0]} features but {coords.shape[0]} coords; {fix}"
                )
            x, xy = np.asarray(feats[...]), np.asarray(coords[...], dtype=np.int64)
            x = x.reshape(0, 0) if empty else x
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc}); {fix}") from exc
    for where, attrs in (("features", fattrs), ("coords", cattrs)):
        name = attrs.get("name")
        if name is not None and str(name) != slide_id:
            raise ValueError(
                f"{path}: {where} attr name={name!r}, a file of another slide than {slide_id!r}; "
                "check the file names against the manifest's slide ids"
            )
    x16 = x.astype(np.float16)
    if not np.isfinite(x16).all():
        raise ValueError(f"{path}: non-finite features (or beyond float16); {fix}")
    return {"features": x16, "coords": xy, "features_attrs": fattrs, "coords_attrs": cattrs}


def _geometry(data: dict, fmt: str, flags: Geometry, slide_mpp: float | None, path: Path) -> dict:
    """tile_px, tile_px_level0, stride_px_level0, target_mpp for one file; ValueError (one line
    naming the file) for attrs that are missing, not numbers or not positive."""
    try:
        geom = _geometry_of(data["coords_attrs"], fmt, flags, slide_mpp, path)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ValueError(
            f"{path}: coords attrs are not usable numbers ({exc}); pass --tile-px, "
            "--tile-px-level0 and --target-mpp"
        ) from exc
    if min(geom["tile_px"], geom["tile_px_level0"], geom["stride_px_level0"]) <= 0 or not (
        geom["target_mpp"] > 0
    ):
        raise ValueError(f"{path}: tile geometry {geom} is not positive; check the flags or attrs")
    return geom


def _geometry_of(a: dict, fmt: str, flags: Geometry, slide_mpp, path: Path) -> dict:
    if fmt == "trident" and flags.tile_px is None:
        need = [
            k for k in ("patch_size", "patch_size_level0", "target_magnification") if k not in a
        ]
        if need:
            raise ValueError(
                f"{path}: coords attrs lack {', '.join(need)}; pass --tile-px, --tile-px-level0 "
                "and --target-mpp"
            )
    tile_px = flags.tile_px or (int(a["patch_size"]) if fmt == "trident" else None)
    target_mpp = flags.target_mpp
    if target_mpp is None and fmt == "trident" and a.get("target_magnification"):
        target_mpp = round(10.0 / float(a["target_magnification"]), 6)
    if tile_px is None or target_mpp is None:
        raise ValueError(
            f"{path}: CLAM files carry no tile geometry; pass --target-mpp and --tile-px"
        )
    level0 = flags.tile_px_level0 or (
        int(a["patch_size_level0"]) if "patch_size_level0" in a else None
    )
    if level0 is None:
        if not slide_mpp:
            raise ValueError(
                f"{path}: the slide has no mpp; pass --tile-px-level0 (or an mpp column)"
            )
        level0 = int(round(tile_px * target_mpp / slide_mpp))
    overlap = int(a.get("overlap", 0) or 0) if fmt == "trident" else 0
    stride = level0 - int(round(overlap * level0 / tile_px))
    return {"tile_px": tile_px, "tile_px_level0": level0, "stride_px_level0": stride,
            "target_mpp": float(target_mpp)}  # fmt: skip


def _check_slide(data: dict, info, path: Path, tile_px_level0: int) -> None:
    """The file belongs to this slide: its size attrs and coordinates fit the slide."""
    a, (w, h) = data["coords_attrs"], (info.width_px, info.height_px)
    size = (a.get("level0_width"), a.get("level0_height"))
    if None not in size and (int(size[0]), int(size[1])) != (w, h):
        raise ValueError(
            f"{path}: made on a {size[0]} x {size[1]} px slide, the manifest's slide is {w} x {h}; "
            "a file of another slide? check the file names against the manifest's slide ids"
        )
    xy = data["coords"]
    if len(xy) and (xy.min() < 0 or xy[:, 0].max() >= w or xy[:, 1].max() >= h):
        raise ValueError(
            f"{path}: coordinates outside the {w} x {h} px slide; a file of another slide, or "
            "coordinates not at level 0"
        )
    if xy.size and np.abs(xy).max() > np.iinfo(np.int32).max - tile_px_level0:
        raise ValueError(f"{path}: coordinates beyond int32")


def feature_width(folder: Path, slide_ids) -> int:
    """Width of the first file (in manifest order) with features: what an encoder wsimil does not
    know gives; read from the datasets' shapes only (0 when no file has any)."""
    import h5py

    for sid in slide_ids:
        try:
            with h5py.File(folder / f"{check_slide_id(str(sid))}.h5", "r") as f:
                shape = f["features"].shape
        except (OSError, KeyError, ValueError):
            continue
        if len(shape) == 2 and shape[0]:
            return int(shape[1])
    return 0


def encoder_attrs(name: str, fmt: str, dim: int) -> dict:
    """What the store says about the encoder: a named encoder's config (its input size,
    normalisation, width), or the name and the files' width."""
    from .encoders import pathology
    from .encoders.recipes import recipes

    weights_id = f"imported:{fmt}"
    table = recipes()
    if name in table:
        return pathology.encoder_config(table[name], weights_id).to_attrs()
    if name in ("resnet50_trunc", "efficientnet_lite0"):
        from .encoders import create_encoder

        cfg = create_encoder(name, pretrained=False).config.to_attrs()
        return {**cfg, "weights_id": weights_id}
    return {"name": name, "weights_id": weights_id, "input_px": None, "mean": None,
            "std": None, "interpolation": None, "feature_dim": dim, "preferred_dtype": None}  # fmt: skip


class ImportStage(SlideStage):
    """One HDF5 file -> one feature store, per slide of the manifest."""

    name = "import"
    columns = {"n_tiles": 0}
    changed = "another import (format, source or geometry)"

    def __init__(self, layout: RunLayout, folder: Path, fmt: str, encoder: str, flags: Geometry,
                 enc_attrs: dict):  # fmt: skip
        super().__init__(layout.features(encoder))
        self.layout, self.src, self.fmt, self.encoder, self.flags = (
            layout,
            folder,
            fmt,
            encoder,
            flags,
        )
        self.settings = {"stage": "import", "format": fmt, "source": str(folder.resolve()),
                         "encoder": encoder, "flags": vars(flags)}  # fmt: skip
        self._enc_attrs = enc_attrs

    def outputs(self, row):
        return [self.layout.feature_store(self.encoder, row["slide_id"])]

    def state(self, row):
        return store_status(self.outputs(row)[0], config_hash(self.settings)), {}

    def source(self, sid: str) -> Path:
        """``<folder>/<slide_id>.h5``, refused if a link leads it out of the folder."""
        path = self.src / f"{check_slide_id(sid)}.h5"
        if path.exists() and not path.resolve().is_relative_to(self.src.resolve()):
            raise SlideError(f"{path}: links outside {self.src}; copy the file instead")
        return path

    def check(self, row):
        sid = row["slide_id"]
        if not self.source(sid).is_file():
            raise SlideError(f"{sid}: no {self.fmt.upper()} features at {self.source(sid)}")
        mpp_override(row)

    def plan(self, row):
        from .slide import open_slide

        sid, path = row["slide_id"], self.source(row["slide_id"])
        data = read_h5(path, sid, self.fmt)
        if self.fmt == "clam":
            _check_pt(self.src.parent / "pt_files" / f"{sid}.pt", data, path)
        with open_slide(row["path"], mpp=mpp_override(row)) as slide:
            info = slide.info()
        geom = _geometry(data, self.fmt, self.flags, info.mpp, path)
        _check_slide(data, info, path, geom["tile_px_level0"])
        dim = data["features"].shape[1]
        if dim != self._enc_attrs["feature_dim"] and len(data["features"]):
            raise ValueError(
                f"{path}: {dim} features per tile, encoder {self.encoder!r} gives "
                f"{self._enc_attrs['feature_dim']}; pass the --encoder that made them"
            )
        tiles = {"slide_id": sid, "slide_path": str(row["path"]), "width_px": info.width_px,
                 "height_px": info.height_px, "slide_mpp": info.mpp, **geom,
                 "n_tiles": len(data["coords"]), "source": str(path), "format": self.fmt}  # fmt: skip
        return {"row": row, "data": data, "tiles": tiles}

    def run_one(self, job) -> SlideOutcome:
        sid, data = job["row"]["slide_id"], job["data"]
        n, feats = len(data["coords"]), data["features"]
        if n == 0:  # as embed writes a slide without tiles: (0, D)
            feats = np.zeros((0, int(self._enc_attrs["feature_dim"] or 1)), np.float16)
        with atomic_store(self.outputs(job["row"])[0]) as g:
            write_array(g, "features", feats)
            write_array(g, "coords", data["coords"].astype(np.int32))
            g.attrs.update({
                "slide_id": sid, "n_tiles": n, "feature_dim": int(feats.shape[1]),
                "encoder": self._enc_attrs, "tiles": job["tiles"],
                "config_hash": config_hash(self.settings), "device": "imported",
                "imported": {"format": self.fmt, "file": job["tiles"]["source"],
                             "attrs": {k: str(v) for k, v in data["coords_attrs"].items()}},
                "wsimil_version": __version__,
            })  # fmt: skip
        return SlideOutcome("ok" if n else "empty", "" if n else f"{sid}: 0 tiles", {"n_tiles": n})


def _check_pt(pt: Path, data: dict, h5: Path) -> None:
    """CLAM's pt_files copy, when present, must hold the same number of features."""
    if not pt.is_file():
        return
    import torch

    try:
        t = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{pt}: not a readable tensor file ({type(exc).__name__}); remove it"
        ) from exc
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != data["features"].shape:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"{pt}: {shape} does not match {h5} {data['features'].shape}; re-extract or remove it"
        )


def run_import(manifest: pd.DataFrame, run_dir: str | Path, src: str | Path, fmt: str, *,
               encoder: str | None = None, flags: Geometry = Geometry(), overwrite: bool = False,
               console=None) -> pd.DataFrame:  # fmt: skip
    """Import a CLAM or TRIDENT feature folder into ``run_dir``'s feature stores.

    ``encoder`` names the features (``features/<encoder>/``): by default TRIDENT's encoder as
    wsimil names it (``uni_v2`` -> ``uni2-h``...; others ``trident-<name>``) and, for CLAM,
    ``resnet50_trunc`` (CLAM's default extractor).

    Returns
    -------
    DataFrame, one row per slide: slide_id, status, message, seconds, n_tiles.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    folder, trident_name = source_folder(Path(src), fmt)
    if encoder is None:
        encoder = (TRIDENT_NAMES.get(trident_name, f"trident-{trident_name}") if trident_name
                   else "resnet50_trunc")  # fmt: skip
    width = feature_width(folder, manifest["slide_id"])
    stage = ImportStage(RunLayout(run_dir), folder, fmt, encoder, flags,
                        encoder_attrs(encoder, fmt, width))  # fmt: skip
    label = f"import-features ({fmt} -> {encoder})"
    return run_slides(stage, manifest, overwrite=overwrite, console=console, label=label)
