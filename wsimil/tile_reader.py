"""Reading an encoder's tiles straight from the slide, for the embed stage's loader.

DataLoader worker processes each hold their own slide handle and read the tiles of a
:class:`SlideJob` (no tile image files): horizontal neighbours as one region when the grid
allows it exactly, resized to the encoder's input size with antialiasing. With ``--decode cpu``
or ``gpu`` (:mod:`wsimil.jpeg_tiles`) they read the compressed stored JPEG tiles instead:
``cpu`` decodes them in the worker, ``gpu`` hands the compressed batch to the main process,
which decodes it on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .jpeg_tiles import JpegTileReader, decode_packet, jpeg_levels
from .slide import SlideError, TiffReader, open_slide


@dataclass
class SlideJob:
    """What a worker needs to read one slide's tiles."""

    slide_id: str
    path: str
    mpp: float | None
    coords: np.ndarray  # (N, 2) int32, level 0
    read_level: int
    read_px: int
    tile_attrs: dict
    step_px_level0: int = 0  # grid step; tiles are read in row runs when ``group_reads``
    group_reads: bool = False
    reader: str = "openslide"  # or "tifffile": decode stored TIFF tiles directly (see pick_reader)
    decode: str = "pixels"  # or "cpu" / "gpu": compressed JPEG tiles (see jpeg_tiles.pick_decode)


class TileBatches:
    """Map-style dataset whose item ``i`` is one batch of ``batch_size`` tiles, across slides.

    Each item is ``{"parts": [...]}``, one part per slide of the batch in order (a batch takes
    the next tiles of the window's slides, so small slides still fill batches; ``cross_slide``
    off: every batch holds one slide). A part is a dict: ``job`` (index into ``jobs``),
    ``start`` (its first tile index in the slide), ``tiles`` uint8 tensor (n, S, S, 3) and
    ``error`` ('' or a one-line message); for a ``decode="gpu"`` job, ``tiles`` is empty and
    ``packet`` holds the compressed tiles (:meth:`wsimil.jpeg_tiles.JpegTileReader.packet`,
    decoded by the main process). Read errors are returned, not raised, so one corrupt slide
    does not stop the loader.
    """

    def __init__(
        self,
        jobs: list[SlideJob],
        *,
        batch_size: int,
        input_px: int,
        interpolation: str = "bilinear",
        cross_slide: bool = True,
    ):
        self.jobs = jobs
        self.input_px = input_px
        self.interpolation = interpolation
        self.items = batch_parts([len(job.coords) for job in jobs], batch_size, cross_slide)
        self.batch_size = batch_size
        self._open: tuple[int, object] | None = None  # per-process slide handle

    def __len__(self) -> int:
        return len(self.items)

    def _slide(self, j: int):
        if self._open is None or self._open[0] != j:
            if self._open is not None:
                self._open[1].close()
            self._open = None
            self._open = (j, _open_handle(self.jobs[j]))
        return self._open[1]

    def __getitem__(self, i: int) -> dict:
        return {"parts": [self._part(j, start, n) for j, start, n in self.items[i]]}

    def _part(self, j: int, start: int, n: int) -> dict:
        import torch

        job = self.jobs[j]
        coords = job.coords[start : start + n]
        try:
            if job.decode != "pixels":
                return self._compressed(j, start, coords)
            tiles = read_tiles(
                self._slide(j), coords, job, size=self.input_px, interpolation=self.interpolation
            )
        except SlideError as exc:
            return {"job": j, "start": start, "tiles": torch.empty(0), "error": str(exc)}
        except Exception as exc:
            return {
                "job": j,
                "start": start,
                "tiles": torch.empty(0),
                "error": f"{job.path}: {type(exc).__name__}: {exc}",
            }
        return {"job": j, "start": start, "tiles": torch.from_numpy(tiles), "error": ""}

    def _compressed(self, j: int, start: int, coords: np.ndarray) -> dict:
        """Compressed tiles: decoded here (``cpu``) or by the main process (``gpu``)."""
        import torch

        job = self.jobs[j]
        packet = self._slide(j).packet(coords, job.read_level, job.read_px)
        item = {"job": j, "start": start, "tiles": torch.empty(0), "error": ""}
        if job.decode == "gpu":
            item["packet"] = {k: torch.from_numpy(v) for k, v in packet.items()}
        else:
            item["tiles"] = decode_packet(
                packet, "cpu", size=self.input_px, interpolation=self.interpolation, where=job.path
            ).contiguous()
        return item


def batch_parts(sizes: list[int], batch_size: int, cross_slide: bool = True) -> list[list]:
    """Batches of ``batch_size`` tiles over slides of ``sizes`` tiles, in order.

    Returns
    -------
    list of batches, each a list of (slide index, first tile, n tiles); every batch but the
    last holds ``batch_size`` tiles when ``cross_slide``, else each batch holds one slide.
    """
    batches, current, room = [], [], batch_size
    for j, size in enumerate(sizes):
        start = 0
        while start < size:
            n = min(room, size - start)
            current.append((j, start, n))
            start, room = start + n, room - n
            if room == 0 or (not cross_slide and start == size):
                batches.append(current)
                current, room = [], batch_size
    if current:
        batches.append(current)
    return batches


def _open_handle(job: SlideJob):
    """A worker's handle on ``job``'s slide: pixels (a reader) or stored JPEG tiles."""
    if job.decode != "pixels":
        levels = jpeg_levels(job.path)
        if levels is None:
            raise SlideError(f"{job.path}: not a JPEG-tiled TIFF pyramid any more; re-run")
        return JpegTileReader(job.path, levels)
    if job.reader == "tifffile":
        return TiffReader(job.path)
    return open_slide(job.path, mpp=job.mpp)


def row_runs(coords: np.ndarray, *, step_px: int, max_run: int) -> list[tuple[int, int]]:
    """Split tiles into runs of horizontal neighbours (same y, x advancing by ``step_px``).

    Returns
    -------
    list of (first index, length), covering ``coords`` in order.
    """
    runs = []
    i, n = 0, len(coords)
    while i < n:
        k = 1
        while (
            i + k < n
            and k < max_run
            and coords[i + k, 1] == coords[i, 1]
            and coords[i + k, 0] == coords[i, 0] + k * step_px
        ):
            k += 1
        runs.append((i, k))
        i += k
    return runs


def read_tiles(
    slide,
    coords: np.ndarray,
    job: SlideJob,
    *,
    size: int,
    interpolation: str = "bilinear",
    max_run: int = 16,
) -> np.ndarray:
    """Read and resize the tiles at ``coords`` of one slide.

    Horizontal neighbours are read as one region (one call, each stored JPEG tile decoded once)
    when the grid allows it exactly; the pixels are the same as tile-by-tile reads.

    Returns
    -------
    ndarray, shape (N, size, size, 3), uint8
    """
    out = np.empty((len(coords), size, size, 3), np.uint8)
    r = job.read_px
    if job.group_reads:
        for first, k in row_runs(coords, step_px=job.step_px_level0, max_run=max_run):
            x, y = coords[first]
            strip = slide.read_region((int(x), int(y)), job.read_level, (k * r, r))
            for t in range(k):
                out[first + t] = resize_tile(
                    strip[:, t * r : (t + 1) * r], size, interpolation=interpolation
                )
    else:
        for t, (x, y) in enumerate(coords):
            region = slide.read_region((int(x), int(y)), job.read_level, (r, r))
            out[t] = resize_tile(region, size, interpolation=interpolation)
    return out


def resize_tile(region: np.ndarray, size: int, *, interpolation: str = "bilinear") -> np.ndarray:
    """Resize an (h, w, 3) uint8 tile to (size, size, 3) with antialiasing (Pillow)."""
    if region.shape[0] == size and region.shape[1] == size:
        return region
    from PIL import Image

    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    return np.asarray(Image.fromarray(region).resize((size, size), resample))


def can_group_reads(tile_attrs: dict) -> bool:
    """Whether neighbouring tiles can be read as one region with identical pixels.

    True when tiles do not overlap and a tile is a whole number of pixels of the read level.
    """
    tile0 = int(tile_attrs["tile_px_level0"])
    ds = float(tile_attrs["read_downsample"])
    return (
        int(tile_attrs["stride_px_level0"]) == tile0
        and abs(tile0 / ds - int(tile_attrs["read_px"])) < 1e-9
    )


def pick_reader(path: str, choice: str, *, mpp: float | None = None) -> str:
    """The reader the embed workers use for one slide: ``"openslide"`` or ``"tifffile"``.

    ``auto`` takes tifffile (each stored JPEG tile decoded once per row of tiles, about 2-3x
    cheaper than OpenSlide region reads) for TIFF-based files whose pyramid tifffile sees with
    the same level sizes as ``open_slide``; anything else stays with ``open_slide``.
    """
    if choice == "openslide":
        return "openslide"
    suffix = Path(path).suffix.lower()
    if choice == "auto" and suffix not in {".tif", ".tiff", ".svs", ".btf"}:
        return "openslide"
    try:
        with open_slide(path, mpp=mpp) as ref, TiffReader(Path(path)) as fast:
            same = ref.level_dimensions == fast.level_dimensions
    except Exception:
        same = False
    if not same and choice == "tifffile":
        raise SlideError(
            f"{path}: tifffile does not see the same pyramid as OpenSlide; use --reader openslide"
        )
    return "tifffile" if same else "openslide"
