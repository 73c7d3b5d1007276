"""Damaging a slide file on purpose, for the tests of what a bad slide does (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def corrupt_one_tissue_tile(slide_path: Path, coords: np.ndarray) -> None:
    """Overwrite with zeros the stored JPEG tile (level 0) under the middle one of ``coords``."""
    with tifffile.TiffFile(slide_path) as t:
        page = t.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        x, y = coords[len(coords) // 2]
        idx = (y // page.tilelength) * per_row + x // page.tilewidth
        offset, count = page.dataoffsets[idx], page.databytecounts[idx]
    with open(slide_path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)
