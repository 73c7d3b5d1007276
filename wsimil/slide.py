"""Reading whole-slide images: one :func:`open_slide` that picks a reader.

Coordinates are level-0 pixels ``(x, y)``; sizes are ``(width, height)``; pixel arrays are
``(H, W, 3)`` uint8 RGB. Transparent or blank areas read as white background.

Readers
-------
- :class:`OpenSlideReader` for everything OpenSlide opens (SVS, NDPI, MRXS, SCN, BIF, VMS,
  generic tiled TIFF, DICOM folders).
- :class:`TiffReader` (tifffile) for TIFF layouts OpenSlide refuses (OME pyramids in SubIFDs,
  plain tiled or stripped TIFF).
- :class:`ImageReader` (Pillow) for small PNG/JPEG images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = {".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class SlideError(RuntimeError):
    """A slide that cannot be opened or read; the message names the file and the reason."""


@dataclass(frozen=True)
class SlideInfo:
    """Geometry of a slide, as stored next to every per-slide output."""

    width_px: int
    height_px: int
    mpp: float | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    reader: str


class Slide:
    """Base class of the readers. Use :func:`open_slide` to get one."""

    reader_name = "base"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.mpp: float | None = None
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()

    # -- geometry ---------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size ``(width, height)`` in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def info(self) -> SlideInfo:
        return SlideInfo(
            width_px=int(self.dimensions[0]),
            height_px=int(self.dimensions[1]),
            mpp=self.mpp,
            level_dimensions=tuple((int(w), int(h)) for w, h in self.level_dimensions),
            level_downsamples=tuple(float(d) for d in self.level_downsamples),
            reader=self.reader_versions(),
        )

    def reader_versions(self) -> str:
        return self.reader_name

    def best_level_at_or_finer(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is <= ``downsample`` (+0.5% slack)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.005 and d >= self.level_downsamples[best]:
                best = i
        return best

    def best_level_for_thumbnail(self, max_px: int) -> int:
        """Coarsest level that is still at least ``max_px`` on its long side (or level 0)."""
        best = 0
        for i, (w, h) in enumerate(self.level_dimensions):
            if max(w, h) >= max_px:
                best = i
        return best

    # -- pixels -----------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """Read pixels.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in level-0 pixels. May lie partly outside the slide.
        level : int
            Pyramid level to read from.
        size : (w, h)
            Size in pixels of ``level``.

        Returns
        -------
        ndarray, shape (h, w, 3), uint8
            RGB; areas outside the slide or transparent are white.
        """
        raise NotImplementedError

    def read_level(self, level: int) -> np.ndarray:
        """Read a whole (low-resolution) level, shape (H, W, 3). Refuses large levels."""
        w, h = self.level_dimensions[level]
        if w * h > 64_000_000:
            raise SlideError(
                f"{self.path}: refusing to read level {level} of {w} x {h} px into memory; "
                "use a coarser level"
            )
        return self.read_region((0, 0), level, (w, h))

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """A thumbnail whose long side is at most ``max_px``.

        Returns
        -------
        image : ndarray, shape (h, w, 3), uint8
        downsample : float
            Level-0 pixels per thumbnail pixel (same in x and y up to rounding).
        """
        from skimage.transform import resize

        level = self.best_level_for_thumbnail(max_px)
        img = self.read_level(level)
        w0, h0 = self.dimensions
        scale = max_px / max(w0, h0)
        if scale < 1:
            tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
            if (tw, th) != (img.shape[1], img.shape[0]):
                img = resize(img, (th, tw), order=1, anti_aliasing=True, preserve_range=True)
                img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        return img, w0 / img.shape[1]

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _rgba_to_rgb_white(arr: np.ndarray) -> np.ndarray:
    """Composite an (H, W, 4) premultiplied RGBA array over white -> (H, W, 3) uint8.

    OpenSlide returns premultiplied colour, so ``rgb + (255 - alpha)`` is the composite. Opaque
    pixels (almost all of a slide) take a fast path.
    """
    rgb = np.ascontiguousarray(arr[..., :3])
    alpha = arr[..., 3]
    if alpha.min() == 255:
        return rgb
    clear = alpha < 255
    rgb[clear] = np.minimum(rgb[clear].astype(np.uint16) + (255 - alpha[clear, None]), 255).astype(
        np.uint8
    )
    return rgb


class OpenSlideReader(Slide):
    reader_name = "openslide"

    def __init__(self, path: Path):
        import openslide

        super().__init__(path)
        self._osr = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple(self._osr.level_dimensions)
        self.level_downsamples = tuple(self._osr.level_downsamples)
        props = self._osr.properties
        self.mpp = _openslide_mpp(props)
        self.vendor = props.get("openslide.vendor", "unknown")

    def reader_versions(self) -> str:
        import openslide

        return f"openslide-python {openslide.__version__}, OpenSlide {openslide.__library_version__} ({self.vendor})"

    def read_region(self, location, level, size):
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        try:
            img = self._osr.read_region((int(location[0]), int(location[1])), int(level), (w, h))
        except Exception as exc:  # openslide raises OpenSlideError on corrupt tiles
            raise SlideError(
                f"{self.path}: cannot read region {tuple(location)} level {level}: {exc}"
            ) from exc
        return _rgba_to_rgb_white(np.asarray(img))

    def close(self):
        self._osr.close()


def _openslide_mpp(props) -> float | None:
    """mpp from OpenSlide properties: ``openslide.mpp-x``, else the TIFF resolution tags."""
    try:
        mpp = float(props.get("openslide.mpp-x") or 0)
    except ValueError:
        mpp = 0.0
    if mpp > 0:
        return mpp
    try:
        res = float(props.get("tiff.XResolution") or 0)
    except ValueError:
        res = 0.0
    um_per_unit = {"inch": 25_400.0, "centimeter": 10_000.0}.get(
        props.get("tiff.ResolutionUnit", "")
    )
    if res > 1 and um_per_unit:
        return um_per_unit / res
    return None


class TiffReader(Slide):
    """tifffile reader for pyramids OpenSlide refuses (OME SubIFDs, plain tiled/stripped TIFF)."""

    reader_name = "tifffile"

    def __init__(self, path: Path):
        import tifffile
        import zarr

        super().__init__(path)
        self._tif = tifffile.TiffFile(str(path))
        series = self._tif.series[0]
        self._levels = []
        dims = []
        for lvl in series.levels:
            shape = lvl.shape
            axes = lvl.axes
            if "Y" not in axes or "X" not in axes:
                raise SlideError(f"{path}: TIFF series has no Y/X axes ({axes})")
            h, w = shape[axes.index("Y")], shape[axes.index("X")]
            dims.append((int(w), int(h)))
            self._levels.append(lvl)
        self._axes = series.levels[0].axes
        self._arrays = [
            zarr.open(self._tif.aszarr(series=0, level=i), mode="r") for i in range(len(dims))
        ]
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(dims[0][0] / d[0] for d in dims)
        self.mpp = _tiff_mpp(self._tif)

    def reader_versions(self) -> str:
        import tifffile

        return f"tifffile {tifffile.__version__}"

    def read_region(self, location, level, size):
        w, h = int(size[0]), int(size[1])
        ds = self.level_downsamples[level]
        x0 = int(math.floor(location[0] / ds))
        y0 = int(math.floor(location[1] / ds))
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, np.uint8)
        xs, ys = max(x0, 0), max(y0, 0)
        xe, ye = min(x0 + w, lw), min(y0 + h, lh)
        if xe <= xs or ye <= ys:
            return out
        arr = self._arrays[level]
        sl = []
        for ax in self._axes:
            sl.append({"Y": slice(ys, ye), "X": slice(xs, xe)}.get(ax, slice(None)))
        try:
            data = np.asarray(arr[tuple(sl)])
        except Exception as exc:
            raise SlideError(
                f"{self.path}: cannot read region {tuple(location)} level {level}: {exc}"
            ) from exc
        data = _to_hwc(data, [a for a in self._axes if a in "YXCS"])
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = data
        return out

    def close(self):
        self._tif.close()


def _to_hwc(data: np.ndarray, axes: list[str]) -> np.ndarray:
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim == 2:
        data = np.repeat(data[..., None], 3, axis=2)
    elif data.ndim == 3 and data.shape[0] in (3, 4) and data.shape[2] not in (3, 4):
        data = np.moveaxis(data, 0, 2)
    if data.dtype != np.uint8:
        lo, hi = float(np.min(data)), float(np.max(data))
        data = ((data.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    if data.shape[2] == 4:
        data = _rgba_to_rgb_white(data)
    return data[..., :3]


def _tiff_mpp(tif) -> float | None:
    """mpp from TIFF resolution tags (or an OME/Aperio description), else None."""
    import re

    page = tif.pages[0]
    desc = page.description or ""
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if m:
        return float(m.group(1))
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', desc)
    if m:
        return float(m.group(1))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den:
            per_unit = num / den
            um_per_unit = {2: 25_400.0, 3: 10_000.0}.get(unit)
            if um_per_unit and per_unit > 1:
                return um_per_unit / per_unit
    return None


class ImageReader(Slide):
    """Small PNG/JPEG images, held in memory (one level)."""

    reader_name = "pillow"
    max_pixels = 200_000_000

    def __init__(self, path: Path):
        from PIL import Image

        super().__init__(path)
        with Image.open(path) as im:
            if im.width * im.height > self.max_pixels:
                raise SlideError(
                    f"{path}: {im.width} x {im.height} px is too large for a plain image; convert it to a tiled pyramidal TIFF"
                )
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                self._img = _rgba_to_rgb_white(_premultiply(np.asarray(im)))
            else:
                self._img = np.asarray(im.convert("RGB"))
        self.level_dimensions = ((self._img.shape[1], self._img.shape[0]),)
        self.level_downsamples = (1.0,)

    def read_region(self, location, level, size):
        w, h = int(size[0]), int(size[1])
        x0, y0 = int(location[0]), int(location[1])
        H, W = self._img.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        xs, ys, xe, ye = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        if xe > xs and ye > ys:
            out[ys - y0 : ye - y0, xs - x0 : xe - x0] = self._img[ys:ye, xs:xe]
        return out


def _premultiply(rgba: np.ndarray) -> np.ndarray:
    out = rgba.astype(np.float32)
    out[..., :3] *= out[..., 3:4] / 255.0
    return out.astype(np.uint8)


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a slide with the best reader for it.

    Parameters
    ----------
    path : str or Path
        Slide file (or DICOM folder).
    mpp : float, optional
        Microns per level-0 pixel; overrides the slide's metadata (e.g. from the manifest).

    Raises
    ------
    SlideError
        One line naming the file and the reason when no reader can open it.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found; fix the path in the manifest")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path}: file is empty (0 bytes); re-copy the slide")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffixes else ""
    last = path.suffix.lower()
    slide: Slide | None = None
    reasons = []
    if last in IMAGE_SUFFIXES:
        try:
            slide = ImageReader(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"{path}: cannot open as an image: {exc}") from exc
    else:
        try:
            slide = OpenSlideReader(path)
        except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as exc:
            reasons.append(f"OpenSlide: {str(exc) or type(exc).__name__}")
        is_tiff = last in TIFF_SUFFIXES or suffix in TIFF_SUFFIXES
        if slide is not None and is_tiff and slide.level_count == 1:
            # OpenSlide reads an OME pyramid in SubIFDs as one level: prefer tifffile's pyramid.
            try:
                alt = TiffReader(path)
            except Exception:
                alt = None
            if alt is not None and alt.level_count > 1:
                slide.close()
                slide = alt
            elif alt is not None:
                alt.close()
        if slide is None and is_tiff:
            try:
                slide = TiffReader(path)
            except Exception as exc:
                reasons.append(f"tifffile: {exc}")
    if slide is None:
        why = "; ".join(reasons) or "unsupported file type"
        raise SlideError(f"{path}: cannot open slide ({why})")
    if mpp is not None and not (isinstance(mpp, float) and math.isnan(mpp)):
        slide.mpp = float(mpp)
    return slide
