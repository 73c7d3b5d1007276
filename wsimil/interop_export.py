"""``wsimil export-features RUN --format trident``: a run's feature stores as TRIDENT files.

Writes ``OUT/features_<encoder>/<slide_id>.h5`` for every slide of the manifest with a feature
store, as TRIDENT's ``save_h5`` lays them out: ``features`` (N, D) float32 (the stored float16
values, exactly) with attrs ``name``, ``savetodir``, ``encoder``; ``coords`` (N, 2) int64 with
``patch_size``, ``patch_size_level0``, ``level0_magnification``, ``target_magnification``
(10 / mpp: 0.5 µm/px = 20x), ``overlap``, ``name``, ``savetodir``, ``level0_width``,
``level0_height``; chunks of one row, unlimited first axis. Importing the files again gives the
same features, coordinates and geometry (tested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .layout import RunLayout, check_name
from .store import atomic_output, open_store, store_attrs


def _write_h5(
    path: Path, feats: np.ndarray, coords: np.ndarray, fattrs: dict, cattrs: dict
) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for key, val, attrs in (("features", feats, fattrs), ("coords", coords, cattrs)):
            d = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                 chunks=(1,) + val.shape[1:], dtype=val.dtype)  # fmt: skip
            d[:] = val
            for k, v in attrs.items():
                d.attrs[k] = v


def export_trident(manifest: pd.DataFrame, run_dir: str | Path, encoder: str,
                   out_dir: str | Path | None = None) -> pd.DataFrame:  # fmt: skip
    """Write the TRIDENT files of every slide with features; one row per slide (status, message).

    A slide without a feature store is reported (``missing``), not fatal.
    """
    layout = RunLayout(run_dir)
    out = Path(out_dir) if out_dir else layout.exports("trident")
    folder = out / f"features_{check_name(encoder, what='encoder')}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for sid in manifest["slide_id"].astype(str):
        store = layout.feature_store(encoder, sid)
        attrs = store_attrs(store)
        if attrs is None:
            rows.append({"slide_id": sid, "status": "missing",
                         "message": f"{sid}: no features at {store}; run wsimil embed first"})  # fmt: skip
            continue
        g, t = open_store(store), attrs["tiles"]
        tile0, tile_px = int(t["tile_px_level0"]), int(t["tile_px"])
        stride = int(t.get("stride_px_level0", tile0))
        cattrs = {
            "patch_size": tile_px,
            "patch_size_level0": tile0,
            "level0_magnification": round(10.0 / float(t["slide_mpp"]), 6)
            if t.get("slide_mpp")
            else "None",
            "target_magnification": round(10.0 / float(t["target_mpp"]), 6),
            "overlap": int(round((tile0 - stride) * tile_px / tile0)),
            "name": sid,
            "savetodir": str(out),
            "level0_width": int(t["width_px"]),
            "level0_height": int(t["height_px"]),
        }
        fattrs = {"name": sid, "savetodir": str(folder), "encoder": encoder}
        feats = np.asarray(g["features"][...]).astype(np.float32)
        coords = np.asarray(g["coords"][...]).astype(np.int64).reshape(-1, 2)
        with atomic_output(folder / f"{sid}.h5") as partial:
            _write_h5(partial, feats, coords, fattrs, cattrs)
        rows.append({"slide_id": sid, "status": "ok", "message": str(folder / f"{sid}.h5")})
    return pd.DataFrame(rows, columns=["slide_id", "status", "message"])
