"""Compressed JPEG tiles of TIFF pyramids, decoded a batch at a time on the device (``--decode``).

For a JPEG-tiled TIFF pyramid (SVS, generic TIFF: what ``--reader tifffile`` reads), a loader
worker reads the *compressed* stored tiles that cover a batch of requested tiles
(:meth:`JpegTileReader.packet`: each stored tile once per batch, one flat byte buffer) instead of
pixels. :func:`decode_packet` decodes the batch with ``torchvision.io.decode_jpeg`` on ``device``
(nvJPEG or libjpeg-turbo: one code path), cuts each requested tile out of the stored tiles it
overlaps with one gather, paints outside the level white (as OpenSlide), resizes antialiased.

Colour: OpenSlide follows the TIFF PhotometricInterpretation, not the stream's markers, so each
stream is rewritten: JPEGTables (DQT/DHT, kept apart by SVS) spliced in, JFIF/Adobe markers
dropped, an Adobe marker with the TIFF's colour transform put first (0 = RGB, 1 = YCbCr).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .slide import SlideError

_JPEG = 7
_PHOTOMETRIC = {2: 0, 6: 1}  # TIFF photometric RGB / YCbCr -> Adobe colour transform


@dataclass(frozen=True)
class JpegLevel:
    """One pyramid level as stored: JPEG tiles of ``tile_w`` x ``tile_h``, row-major."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # (n_tiles,) int64 file offsets
    counts: np.ndarray  # (n_tiles,) int64 byte counts
    tables: bytes  # the JPEGTables stream (b'' when every tile is a complete stream)
    transform: int  # Adobe colour transform: 0 RGB samples, 1 YCbCr

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_h)


def jpeg_levels(path: str | Path) -> list[JpegLevel] | None:
    """The levels of a JPEG-tiled TIFF pyramid, or None when the file is not one this path reads.

    Read: every level one tiled page of 8-bit, 3-sample, interleaved JPEG, photometric RGB or
    YCbCr. Anything else (stripped pages, LZW/JPEG 2000, z-stacks, OME channels, files tifffile
    cannot parse) gives None, and the caller keeps the pixel path.
    """
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            return [_level(lvl) for lvl in tif.series[0].levels]
    except Exception:  # _NotJpeg, or a file tifffile cannot parse
        return None


class _NotJpeg(Exception):
    pass


def _level(series) -> JpegLevel:
    import tifffile

    if len(series.pages) != 1 or not isinstance(series.pages[0], tifffile.TiffPage):
        raise _NotJpeg
    p = series.pages[0]
    ok = (
        p.is_tiled
        and p.compression == _JPEG
        and int(p.photometric) in _PHOTOMETRIC
        and p.samplesperpixel == 3
        and p.bitspersample == 8
        and p.planarconfig == 1
        and p.imagedepth == 1
        and p.tiledepth == 1
    )
    if not ok:
        raise _NotJpeg
    lvl = JpegLevel(
        width=int(p.imagewidth),
        height=int(p.imagelength),
        tile_w=int(p.tilewidth),
        tile_h=int(p.tilelength),
        offsets=np.asarray(p.dataoffsets, np.int64),
        counts=np.asarray(p.databytecounts, np.int64),
        tables=bytes(p.jpegtables or b""),
        transform=_PHOTOMETRIC[int(p.photometric)],
    )
    if len(lvl.offsets) != lvl.tiles_across * lvl.tiles_down:
        raise _NotJpeg
    return lvl


def _segments(stream: bytes, where: str, *, tables: bool = False) -> tuple[list[bytes], int]:
    """Marker segments of a JPEG header up to (not including) SOS, and where SOS starts.

    ``tables``: an abbreviated table-specification stream (JPEGTables), which ends at EOI.
    """
    if stream[:2] != b"\xff\xd8":
        raise SlideError(f"{where}: corrupt JPEG tile (no start-of-image marker)")
    segs, i, n = [], 2, len(stream)
    while True:
        while i + 1 < n and stream[i] == 0xFF and stream[i + 1] == 0xFF:
            i += 1  # fill bytes
        if tables and stream[i : i + 2] == b"\xff\xd9":
            return segs, i
        if i + 4 > n or stream[i] != 0xFF:
            raise SlideError(f"{where}: corrupt JPEG tile (bad marker at byte {i})")
        marker = stream[i + 1]
        if marker == 0xDA:  # start of scan: header ends here
            return segs, i
        if marker == 0xD9:
            raise SlideError(f"{where}: corrupt JPEG tile (no image data)")
        length = int.from_bytes(stream[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > n:
            raise SlideError(f"{where}: corrupt JPEG tile (bad segment length at byte {i})")
        segs.append(stream[i : i + 2 + length])
        i += 2 + length


def _adobe(transform: int) -> bytes:
    """An Adobe APP14 segment stating the colour transform (0 RGB, 1 YCbCr)."""
    return b"\xff\xee\x00\x0eAdobe" + bytes([0, 100, 0, 0, 0, 0, transform])


def splice_stream(tile: bytes, tables: bytes, transform: int, where: str) -> bytes:
    """A complete JPEG stream for one stored tile that any decoder reads as OpenSlide does.

    JPEGTables segments first (the tile's own tables, if any, come later and win), no JFIF or
    Adobe markers of the file's own, and an Adobe marker with the TIFF's colour transform.
    """
    head, sos = _segments(tile, where)
    extra = _segments(tables, where, tables=True)[0] if tables else []
    keep = [s for s in extra + head if s[1] not in (0xE0, 0xEE)]
    return b"".join([b"\xff\xd8", _adobe(transform), *keep, tile[sos:]])


class JpegTileReader:
    """A worker's handle on one slide's stored JPEG tiles (see :meth:`packet`)."""

    def __init__(self, path: str | Path, levels: list[JpegLevel]):
        self.path = str(path)
        self.levels = levels
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self._fd)

    def _stream(self, level: int, t: int) -> bytes:
        lv = self.levels[level]
        off, count = int(lv.offsets[t]), int(lv.counts[t])
        where = f"{self.path}: level {level} tile {t}"
        if count <= 0:
            raise SlideError(f"{where}: corrupt JPEG tile (empty)")
        data = os.pread(self._fd, count, off)
        if len(data) != count:
            raise SlideError(f"{where}: corrupt JPEG tile (file ends inside it; truncated copy?)")
        return splice_stream(data, lv.tables, lv.transform, f"{self.path}: level {level}")

    def packet(self, coords: np.ndarray, level: int, read_px: int) -> dict:
        """The compressed stored tiles under ``coords`` (level 0) and how to cut tiles from them.

        Returns
        -------
        dict of numpy arrays: ``data`` (uint8, the streams back to back), ``lengths`` (U,),
        ``grid`` (B, gy, gx) int32 slot of the stored tile at each grid cell of a requested
        tile (-1: outside the level), ``origin`` (B, 2) int32 (y, x) of the tile inside its
        first stored tile, ``box`` (B, 2) int32 level pixels (y, x) of the tile's corner, and
        ``meta`` (read_px, tile_h, tile_w, height, width) of the level and its colour
        ``transform`` (1,).
        """
        lv = self.levels[level]
        ds = lv_downsample(self.levels, level)
        x0 = np.floor(coords[:, 0] / ds).astype(np.int64)
        y0 = np.floor(coords[:, 1] / ds).astype(np.int64)
        gx, gy = read_px // lv.tile_w + 2, read_px // lv.tile_h + 2
        grid = np.full((len(coords), gy, gx), -1, np.int32)
        slots: dict[int, int] = {}
        streams: list[bytes] = []
        for b in range(len(coords)):
            c0, r0 = x0[b] // lv.tile_w, y0[b] // lv.tile_h
            c1 = (x0[b] + read_px - 1) // lv.tile_w
            r1 = (y0[b] + read_px - 1) // lv.tile_h
            for r in range(max(r0, 0), min(r1, lv.tiles_down - 1) + 1):
                for c in range(max(c0, 0), min(c1, lv.tiles_across - 1) + 1):
                    t = int(r * lv.tiles_across + c)
                    if t not in slots:
                        slots[t] = len(streams)
                        streams.append(self._stream(level, t))
                    grid[b, r - r0, c - c0] = slots[t]
        origin = np.stack([y0 - (y0 // lv.tile_h) * lv.tile_h, x0 - (x0 // lv.tile_w) * lv.tile_w])
        return {
            "data": np.frombuffer(b"".join(streams), np.uint8).copy(),
            "lengths": np.array([len(s) for s in streams], np.int64),
            "grid": grid,
            "origin": origin.T.astype(np.int32),
            "box": np.stack([y0, x0], 1).astype(np.int32),
            "meta": np.array([read_px, lv.tile_h, lv.tile_w, lv.height, lv.width], np.int64),
            "transform": np.array([lv.transform], np.int64),
        }


def lv_downsample(levels: list[JpegLevel], level: int) -> float:
    """Level-0 pixels per pixel of ``level`` (width ratio, as :class:`wsimil.slide.TiffReader`)."""
    return levels[0].width / levels[level].width


def decode_packet(
    packet: dict,
    device: str,
    *,
    size: int,
    interpolation: str = "bilinear",
    where: str = "",
    guard: bool = True,
):
    """Decode a :meth:`JpegTileReader.packet` on ``device``: (B, size, size, 3) uint8 tiles.

    ``guard``: on CUDA, the first stream of each colour transform is also decoded on the CPU
    (libjpeg-turbo, as OpenSlide); should the GPU decoder disagree (mean difference of 2 grey
    levels or more, e.g. RGB-coded JPEG read as YCbCr), streams of that transform are decoded
    on the CPU from then on, with one warning, and the tiles still go to ``device``.

    Raises
    ------
    SlideError
        A stream the decoder refuses (one line naming ``where``, the slide file).
    """
    import torch

    data = torch.as_tensor(packet["data"])  # a worker's (pinned) tensor, or numpy
    packet = {k: np.asarray(v) for k, v in packet.items() if k != "data"}  # host tensors: views
    r, th, tw, lh, lw = (int(v) for v in packet["meta"])
    streams = list(torch.split(data, [int(n) for n in packet["lengths"]]))
    on = device
    if guard and streams and torch.device(device).type == "cuda":
        transform = int(packet.get("transform", [1])[0])
        on = device if _gpu_agrees(streams[0], transform, device, where) else "cpu"
    imgs = _decode(streams, on, where)
    # Stored tiles (U + 1, th, tw, 3), the last one white. The CPU decoder's (3, h, w) images
    # are views of (h, w, 3) memory: numpy stacks them as plain copies (torch's threaded copy
    # was 10x slower on a busy 2-core machine).
    if torch.device(on).type == "cpu":
        white = np.full((th, tw, 3), 255, np.uint8)
        hwc = [_fit(img.permute(1, 2, 0).numpy(), th, tw, white) for img in imgs]
        tiles = torch.from_numpy(assemble(np.stack([*hwc, white]), packet)).to(device)
    else:
        white = torch.full((th, tw, 3), 255, dtype=torch.uint8, device=torch.device(on))
        stored = torch.stack([_fit(img.permute(1, 2, 0), th, tw, white) for img in imgs] + [white])
        keys = ("grid", "origin", "box")
        tiles = gather(stored, {k: torch.as_tensor(packet[k]) for k in keys}, r, lh, lw)
    return resize_tiles(tiles, size, interpolation)


def _decode(streams: list, device: str, where: str) -> list:
    """torchvision's batch JPEG decoder; a refused stream is a one-line SlideError."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return []
    if device != "cpu":  # its stream does not wait for ours (NaN features; pytorch/vision#9606)
        torch.cuda.current_stream(device).synchronize()
    try:
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; pinned here
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        line = line.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1]  # torchvision's source location
        raise SlideError(f"{where}: corrupt JPEG tile: {line}") from exc


_GPU_AGREES: dict[tuple[int, str], bool] = {}  # (colour transform, device) -> GPU decoder agrees


def _gpu_agrees(stream, transform: int, device: str, where: str) -> bool:
    """Whether the GPU decoder reads streams of ``transform`` as the CPU decoder does."""
    key = (transform, device)
    if key not in _GPU_AGREES:
        try:
            gpu = _decode([stream], device, where)[0].cpu().int()
            cpu = _decode([stream], "cpu", where)[0].int()
        except SlideError:
            return True  # a corrupt stream: the batch decode reports it
        agrees = gpu.shape == cpu.shape and float((gpu - cpu).abs().float().mean()) < 2.0
        _GPU_AGREES[key] = agrees
        if not agrees:
            import warnings

            kind = "RGB" if transform == 0 else "YCbCr"
            warnings.warn(
                f"the GPU JPEG decoder reads {kind}-coded tiles unlike OpenSlide; "
                "decoding those on the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
    return _GPU_AGREES[key]


def resize_tiles(tiles, size: int, interpolation: str = "bilinear"):
    """(B, r, r, 3) uint8 -> (B, size, size, 3) uint8, antialiased, on the tiles' device."""
    import torch

    if tiles.shape[1] == size:
        return tiles
    mode = "bicubic" if interpolation == "bicubic" else "bilinear"
    x = tiles.permute(0, 3, 1, 2)  # channels_last (B, 3, r, r): the CPU's fast uint8 kernel
    if tiles.device.type == "cpu":
        y = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, antialias=True)
    else:  # CUDA interpolates floats only
        y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode=mode, antialias=True)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1)


def _fit(img, th: int, tw: int, white):
    """A decoded stored tile as (th, tw, 3): a stream of another size is cut or padded white."""
    if img.shape[:2] == (th, tw):
        return img
    out = white.copy() if isinstance(white, np.ndarray) else white.clone()
    h, w = min(th, img.shape[0]), min(tw, img.shape[1])
    out[:h, :w] = img[:h, :w]
    return out


def assemble(stored: np.ndarray, packet: dict) -> np.ndarray:
    """Cut the requested tiles from decoded stored tiles with block copies (the CPU's way).

    ``stored`` is (U + 1, th, tw, 3) uint8; returns (B, r, r, 3) uint8, white outside the level.
    """
    r, th, tw, lh, lw = (int(v) for v in packet["meta"])
    grid, origin, box = packet["grid"], packet["origin"], packet["box"]
    out = np.full((len(grid), r, r, 3), 255, np.uint8)
    for b in range(len(grid)):
        oy, ox = int(origin[b, 0]), int(origin[b, 1])
        for gi, gj in zip(*np.nonzero(grid[b] >= 0), strict=True):
            ty, tx = gi * th - oy, gj * tw - ox  # the stored tile's corner in the output tile
            ys, ye, xs, xe = max(ty, 0), min(ty + th, r), max(tx, 0), min(tx + tw, r)
            if ye > ys and xe > xs:
                out[b, ys:ye, xs:xe] = stored[grid[b, gi, gj], ys - ty : ye - ty, xs - tx : xe - tx]
        y0, x0 = int(box[b, 0]), int(box[b, 1])
        out[b, max(lh - y0, 0) :] = 255  # a stored edge tile's padding beyond the level
        out[b, :, max(lw - x0, 0) :] = 255
    return out


def gather(stored, t: dict, r: int, lh: int, lw: int):
    """Cut (B, r, r, 3) tiles from ``stored`` (U + 1, th, tw, 3) with one gather (the GPU's way).

    Gives the same tiles as :func:`assemble` (tested on the CPU).
    """
    import torch

    dev = stored.device
    th, tw = stored.shape[1], stored.shape[2]
    white = stored.shape[0] - 1
    grid, origin, box = (t[k].to(dev, non_blocking=True).long() for k in ("grid", "origin", "box"))
    grid = torch.where(grid < 0, white, grid)
    b = torch.arange(grid.shape[0], device=dev)
    ar = torch.arange(r, device=dev)
    rows = origin[:, 0:1] + ar  # (B, r) rows counted from the first stored tile's top
    cols = origin[:, 1:2] + ar
    slot = grid[b[:, None, None], (rows // th)[:, :, None], (cols // tw)[:, None, :]]
    y, x = box[:, 0:1] + ar, box[:, 1:2] + ar  # level pixel rows / columns of each tile
    inside = ((y >= 0) & (y < lh))[:, :, None] & ((x >= 0) & (x < lw))[:, None, :]
    slot = torch.where(inside, slot, white)
    flat = (slot * th + (rows % th)[:, :, None]) * tw + (cols % tw)[:, None, :]
    return stored.view(-1, 3).index_select(0, flat.view(-1)).view(len(b), r, r, 3)


def pick_decode(path: str, choice: str, device: str, *, same_pyramid: bool) -> str:
    """Where one slide's tiles are decoded: ``"pixels"`` (the reader path), ``"cpu"`` or ``"gpu"``.

    ``cpu`` / ``gpu`` take the compressed-tile path for JPEG TIFF pyramids whose levels
    tifffile sees as OpenSlide does (``same_pyramid``); ``auto`` takes ``gpu`` when the
    encoder runs on CUDA, ``pixels`` never. Any other slide keeps the pixel path, without an
    error.
    """
    if choice == "gpu" and device != "cuda":
        raise ValueError("--decode gpu needs the encoder on CUDA (--device cuda or auto on a GPU)")
    if choice == "pixels" or (choice == "auto" and device != "cuda"):
        return "pixels"
    if not same_pyramid or Path(path).suffix.lower() not in {".tif", ".tiff", ".svs", ".btf"}:
        return "pixels"
    if jpeg_levels(path) is None:
        return "pixels"
    return "cpu" if choice == "cpu" else "gpu"
