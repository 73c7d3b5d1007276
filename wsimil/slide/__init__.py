"""Reading whole-slide images: one :func:`open_slide` that picks a reader.

Coordinates are level-0 pixels ``(x, y)``; sizes are ``(width, height)``; pixel arrays are
``(H, W, 3)`` uint8 RGB. Transparent or blank areas read as white background.

Readers
-------
- :class:`OpenSlideReader` for everything OpenSlide opens (SVS, NDPI, MRXS, SCN, BIF, VMS,
  generic tiled TIFF, DICOM folders).
- :class:`TiffReader` (tifffile) for TIFF layouts OpenSlide refuses (OME pyramids in SubIFDs,
  plain tiled or stripped TIFF), and for every TIFF whose samples are not 8-bit RGB(A)
  (grayscale, 16-bit, float, palette, gray + alpha): OpenSlide reads 16-bit samples by their
  high byte and refuses floats, so those are never given to it.
- Sample layouts are converted to uint8 RGB in one place, :func:`.samples.to_rgb8`, which
  lists the layouts read and refused (CMYK, Lab, multichannel...: one-line SlideError).
- :class:`ImageReader` (Pillow) for small PNG/JPEG images.
"""

from __future__ import annotations

import math
from pathlib import Path

from .base import Slide, SlideError, SlideInfo
from .image_reader import ImageReader
from .openslide_reader import OpenSlideReader
from .samples import SampleLayout, tiff_layout, to_rgb8
from .tiff_reader import TiffReader

__all__ = [
    "ImageReader",
    "OpenSlideReader",
    "SampleLayout",
    "Slide",
    "SlideError",
    "SlideInfo",
    "TiffReader",
    "open_slide",
    "tiff_layout",
    "to_rgb8",
]

TIFF_SUFFIXES = {".tif", ".tiff", ".ome.tif", ".ome.tiff", ".btf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


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
        One line naming the file and the reason when no reader can open it (including a
        sample layout that cannot be converted to RGB, e.g. CMYK).
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found; fix the path in the manifest")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path}: file is empty (0 bytes); re-copy the slide")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffixes else ""
    last = path.suffix.lower()
    if last in IMAGE_SUFFIXES:
        try:
            slide: Slide = ImageReader(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"{path}: cannot open as an image: {exc}") from exc
    else:
        slide = _open_wsi(path, is_tiff=last in TIFF_SUFFIXES or suffix in TIFF_SUFFIXES)
    if mpp is not None and not (isinstance(mpp, float) and math.isnan(mpp)):
        slide.mpp = float(mpp)
    return slide


def _tiff_needs_tifffile(path: Path) -> bool:
    """True when a TIFF's samples are not plain 8-bit RGB(A) (see :mod:`.samples`).

    Raises the one-line SlideError of :func:`tiff_layout` for a layout no reader converts;
    False when tifffile cannot parse the file (OpenSlide may still open it).
    """
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            page = tif.series[0].keyframe
            layout = tiff_layout(page, path)
    except SlideError:
        raise
    except Exception:
        return False
    return not layout.plain_rgb8


def _open_wsi(path: Path, *, is_tiff: bool) -> Slide:
    """OpenSlide, or tifffile for TIFFs OpenSlide misreads, refuses or sees as one level."""
    import openslide

    if is_tiff and _tiff_needs_tifffile(path):
        try:
            return TiffReader(path)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(f"{path}: cannot open slide (tifffile: {exc})") from exc
    slide: Slide | None = None
    reasons = []
    try:
        slide = OpenSlideReader(path)
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as exc:
        reasons.append(f"OpenSlide: {str(exc) or type(exc).__name__}")
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
    return slide


def tiff_twin(slide: Slide) -> Slide | None:
    """A tifffile reader of ``slide``'s file when ``slide`` is read by another reader and
    tifffile sees the same pyramid (TIFF-based files: generic TIFF, SVS, BigTIFF), else None.

    tifffile decodes each stored JPEG tile once per read, several times cheaper than
    OpenSlide's region reads (a 1,875 px level: 0.04 s against 0.2 s); callers close it.
    """
    if slide.reader_name == TiffReader.reader_name:
        return None
    if slide.path.suffix.lower() not in {".tif", ".tiff", ".svs", ".btf"}:
        return None
    try:
        twin = TiffReader(slide.path)
    except Exception:
        return None
    if twin.level_dimensions != slide.level_dimensions:
        twin.close()
        return None
    twin.mpp = slide.mpp
    return twin
