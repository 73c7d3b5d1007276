"""A one-level TIFF laid out as Aperio SVS stores JPEG: a test file for colour handling.

Aperio writes photometric RGB, JPEG tiles whose samples are R, G, B (no colour transform) with
no JFIF or Adobe marker and component ids 0, 1, 2, and the quantisation and Huffman tables
once in JPEGTables, not in each tile. A decoder that reads only the JPEG stream takes such
samples for YCbCr (its default without markers); OpenSlide and libtiff follow the TIFF tag.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _segments(stream: bytes) -> tuple[list[bytes], bytes]:
    """Header segments before SOS, and the scan (SOS to EOI)."""
    segs, i = [], 2
    while stream[i + 1] != 0xDA:
        n = int.from_bytes(stream[i + 2 : i + 4], "big")
        segs.append(stream[i : i + 2 + n])
        i += 2 + n
    return segs, stream[i:]


def _aperio_tile(tile: np.ndarray, quality: int) -> tuple[bytes, bytes]:
    """(tables, abbreviated tile stream) of one RGB-coded tile."""
    import imagecodecs

    full = imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB")
    segs, scan = _segments(bytes(full))
    tables = [s for s in segs if s[1] in (0xDB, 0xC4)]  # DQT, DHT
    sof = bytearray(next(s for s in segs if s[1] == 0xC0))
    for k in range(3):
        sof[10 + 3 * k] = k  # component ids 0, 1, 2 (R, G, B ids would give the colours away)
    sos = bytearray(scan[: 2 + int.from_bytes(scan[2:4], "big")])
    for k in range(3):
        sos[5 + 2 * k] = k
    body = bytes(sos) + scan[len(sos) :]
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + bytes(sof) + body


def write_aperio_jpeg_tiff(
    path: str | Path, image: np.ndarray, *, tile_px: int = 240, quality: int = 90
) -> Path:
    """Write ``image`` (H, W, 3) uint8 as an Aperio-style JPEG TIFF (see the module notes)."""
    import tifffile

    path = Path(path)
    h, w = image.shape[:2]
    pad = np.full((-(-h // tile_px) * tile_px, -(-w // tile_px) * tile_px, 3), 255, np.uint8)
    pad[:h, :w] = image
    tables, tiles = b"", []
    for y in range(0, pad.shape[0], tile_px):
        for x in range(0, pad.shape[1], tile_px):
            tables, tile = _aperio_tile(pad[y : y + tile_px, x : x + tile_px], quality)
            tiles.append(tile)  # same quality: the same tables for every tile
    tifffile.imwrite(
        path,
        data=iter(tiles),
        shape=(h, w, 3),
        dtype=np.uint8,
        tile=(tile_px, tile_px),
        compression="jpeg",
        photometric="rgb",
        jpegtables=tables,
        metadata=None,
    )
    with tifffile.TiffFile(path, mode="r+b") as tif:  # tifffile records YCbCr for JPEG RGB
        tif.pages[0].tags["PhotometricInterpretation"].overwrite(2)
    return path
