"""Sample layouts: every reader's pixels become ``(H, W, 3)`` uint8 RGB in :func:`to_rgb8`.

A :class:`SampleLayout` says how a file stores its pixels; each reader describes its file once
(:func:`tiff_layout` for TIFF pages, :func:`pillow_layout` for Pillow images,
:data:`OPENSLIDE_RGBA` for OpenSlide) and passes every region it reads, in the file's own
dtype with the samples last, through :func:`to_rgb8`.

Layouts read
------------
- 8-bit RGB (chunky or planar/separate samples, JPEG YCbCr decoded by the codec): as is.
- RGB + alpha (RGBA): composited over white, straight (TIFF unassociated alpha, PNG) or
  premultiplied (TIFF associated alpha, OpenSlide). Extra samples that are not alpha are
  ignored.
- Grayscale, min-is-black: the gray value in R, G and B. Min-is-white: inverted first.
- Gray + alpha (2 samples): gray, composited over white.
- Palette (colour map): looked up; 16-bit TIFF colour maps are reduced to 8 bits.
- 1- to 7-bit, 16-bit and 32-bit integer, and floating-point samples (gray or RGB): scaled to
  0..255 by one value range per slide (below).

Refused (one :class:`SlideError` line naming the file and the layout): CMYK and other
separated (ink) layouts, CIELab/ICCLab/ITULab, LogL/LogLuv, CFA and other photometrics,
complex samples, gray with extra samples that are not alpha (multichannel images).

Value range of non-8-bit samples
--------------------------------
Tiles must be comparable across a slide, so the scaling is fixed once per slide, never per
tile: ``value = clip((v - lo) / (hi - lo), 0, 1) * 255``.

- Integers with fewer significant bits than their type (TIFF BitsPerSample 1, 4, 12...):
  ``lo, hi = 0, 2**bits - 1``.
- Otherwise (16/32-bit integers, floats) ``lo`` is 0 (the 0.1th percentile when that is
  negative) and ``hi`` the 99.9th percentile of the colour samples of a low-resolution image
  of the slide (:func:`value_range`; the TIFF reader takes the coarsest pyramid level, or
  blocks spread over it when that level is large). Data that uses only part of its type
  (12-bit camera data in 16-bit samples, 0..4095) is so stretched to the full 0..255, with
  the brightest 0.1% (glass, in brightfield) at white, and black stays black. Floats already
  within 0..1 use ``0, 1``; NaN reads as white.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .base import SlideError

_PHOTOMETRIC = {
    5: "CMYK/separated",
    8: "CIELab",
    9: "ICCLab",
    10: "ITULab",
    32803: "CFA (raw sensor)",
    32844: "LogL",
    32845: "LogLuv",
    34892: "linear raw",
}


@dataclass(frozen=True)
class SampleLayout:
    """How a file stores its pixels (see the module docstring for the layouts)."""

    name: str  # for messages, e.g. "16-bit grayscale"
    colour: int = 3  # colour samples: 1 (gray, palette index) or 3 (RGB)
    alpha: int | None = None  # index of the alpha sample
    premultiplied: bool = False  # associated alpha
    invert: bool = False  # min-is-white
    palette: np.ndarray | None = None  # (n, 3) uint8 colour map
    bits: int = 8  # significant bits per sample (integers)
    dtype: str = "uint8"
    value_range: tuple[float, float] | None = None  # set by value_range() where needed

    @property
    def needs_range(self) -> bool:
        """True when samples are not plain 8-bit and need a value range before reading."""
        return self.palette is None and (self.dtype != "uint8" or self.bits < 8)

    @property
    def full_scale(self) -> float:
        """Value of an opaque alpha / of white for min-is-white inversion."""
        dt = np.dtype(self.dtype)
        if dt.kind in "fb":
            return 1.0
        return float(min(2**self.bits - 1, np.iinfo(dt).max))

    @property
    def plain_rgb8(self) -> bool:
        """8-bit RGB(A) with no conversion but alpha: what OpenSlide also reads correctly."""
        return self.colour == 3 and self.palette is None and not self.needs_range

    def with_range(self, values: np.ndarray) -> SampleLayout:
        """This layout with its value range computed from ``values`` (see :func:`value_range`)."""
        return replace(self, value_range=value_range(values, self))


OPENSLIDE_RGBA = SampleLayout("OpenSlide RGBA", colour=3, alpha=3, premultiplied=True)


def to_rgb8(data: np.ndarray, layout: SampleLayout) -> np.ndarray:
    """Pixels in the file's layout -> ``(H, W, 3)`` uint8 RGB, transparent areas white.

    Parameters
    ----------
    data : ndarray, shape (H, W) or (H, W, S)
        Samples as stored (any dtype), samples last.
    layout : SampleLayout
        From :func:`tiff_layout`, :func:`pillow_layout` or :data:`OPENSLIDE_RGBA`; layouts
        with ``needs_range`` must carry a ``value_range``.
    """
    if data.ndim == 2:
        data = data[..., None]
    if layout.palette is not None:
        idx = np.clip(data[..., 0], 0, len(layout.palette) - 1)
        rgb = layout.palette[idx.astype(np.intp)]
    else:
        colour = _colour_values(data, layout)
        if layout.needs_range:
            if layout.value_range is None:
                raise AssertionError(f"{layout.name}: value range not set")
            colour = _scale(colour, *layout.value_range)
        rgb = colour if colour.shape[2] == 3 else np.repeat(colour, 3, axis=2)
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if layout.alpha is None or data.shape[2] <= layout.alpha:
        return rgb
    return _over_white(rgb, _alpha8(data[..., layout.alpha], layout), layout.premultiplied)


def value_range(values: np.ndarray, layout: SampleLayout) -> tuple[float, float]:
    """``(lo, hi)`` mapped to 0 and 255 for non-8-bit samples (rules: module docstring).

    ``values`` are samples of a low-resolution image of the whole slide in the file's layout,
    shape (H, W) or (H, W, S).
    """
    if values.ndim == 2:
        values = values[..., None]
    dt = np.dtype(layout.dtype)
    if dt.kind in "uib" and layout.bits < dt.itemsize * 8:
        return 0.0, float(2**layout.bits - 1)
    v = _colour_values(values, layout).astype(np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, layout.full_scale
    p_lo, p_hi = (float(p) for p in np.percentile(v, [0.1, 99.9]))
    if dt.kind == "f" and p_lo >= 0.0 and p_hi <= 1.0:
        return 0.0, 1.0
    lo = min(p_lo, 0.0)
    hi = p_hi if p_hi > lo else lo + 1.0
    return lo, hi


def _colour_values(data: np.ndarray, layout: SampleLayout) -> np.ndarray:
    colour = data[..., : layout.colour]
    if layout.invert:
        colour = layout.full_scale - colour.astype(np.float64 if layout.needs_range else np.int16)
        if not layout.needs_range:
            colour = colour.astype(np.uint8)
    return colour


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (values.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    out = np.nan_to_num(out, nan=255.0)
    return (np.clip(out, 0, 255) + 0.5).astype(np.uint8)


def _alpha8(alpha: np.ndarray, layout: SampleLayout) -> np.ndarray:
    if alpha.dtype == np.uint8 and layout.full_scale == 255:
        return alpha
    return _scale(alpha, 0.0, layout.full_scale)


def _over_white(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool) -> np.ndarray:
    if alpha.min() == 255:
        return rgb
    clear = alpha < 255
    rgb = rgb if rgb.flags.writeable else rgb.copy()
    c = rgb[clear].astype(np.uint32)
    a = alpha[clear, None].astype(np.uint32)
    if premultiplied:
        rgb[clear] = np.minimum(c + (255 - a), 255).astype(np.uint8)
    else:
        rgb[clear] = ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return rgb


def tiff_layout(page, path: str | Path) -> SampleLayout:
    """The layout of a tifffile page; raises a one-line :class:`SlideError` if unsupported."""
    photometric, spp = int(page.photometric), int(page.samplesperpixel)
    bits, fmt = int(page.bitspersample), int(page.sampleformat)
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    kind = {1: "", 2: "signed ", 3: "float "}.get(fmt)
    if kind is None:
        _refuse(path, f"{bits}-bit sample format {fmt}")
    depth = f"{bits}-bit {kind}"
    if photometric in (0, 1, 3):
        colour, gray = 1, "palette" if photometric == 3 else "grayscale"
    elif photometric in (2, 6):
        colour, gray = 3, "RGB"
    else:
        what = _PHOTOMETRIC.get(photometric, f"photometric {photometric}")
        _refuse(path, f"{spp}-sample {what}")
    if spp < colour:
        _refuse(path, f"{depth}{gray} with {spp} samples")
    alpha = colour if spp > colour and extras and extras[0] in (1, 2) else None
    if colour == 1 and spp > 1 and (alpha is None or spp > 2):
        _refuse(path, f"{spp}-sample {depth}{gray} (multichannel, not gray + alpha)")
    name = f"{depth}{gray}" + (" + alpha" if alpha is not None else "")
    palette = None
    if photometric == 3:
        if page.colormap is None:
            _refuse(path, f"{name} without a colour map")
        cmap = np.asarray(page.colormap)
        cmap = cmap if cmap.max() < 256 else cmap // 257
        palette = np.ascontiguousarray(cmap.T, dtype=np.uint8)
    return SampleLayout(
        name=name,
        colour=colour,
        alpha=alpha,
        premultiplied=alpha is not None and extras[0] == 1,
        invert=photometric == 0,
        palette=palette,
        bits=bits if fmt != 3 else np.dtype(page.dtype).itemsize * 8,
        dtype=str(np.dtype(page.dtype)),
    )


_PILLOW = {  # mode -> (mode to convert to first, or None, layout name, colour, alpha, premult)
    "1": ("L", "1-bit bilevel", 1, None, False),
    "L": (None, "8-bit grayscale", 1, None, False),
    "LA": (None, "8-bit grayscale + alpha", 1, 1, False),
    "La": (None, "8-bit grayscale + premultiplied alpha", 1, 1, True),
    "P": ("RGBA", "palette", 3, 3, False),
    "PA": ("RGBA", "palette + alpha", 3, 3, False),
    "RGB": (None, "8-bit RGB", 3, None, False),
    "RGBA": (None, "8-bit RGBA", 3, 3, False),
    "RGBa": (None, "8-bit premultiplied RGBA", 3, 3, True),
    "RGBX": (None, "8-bit RGBX", 3, None, False),
    "YCbCr": ("RGB", "YCbCr", 3, None, False),
    "I": (None, "32-bit grayscale", 1, None, False),
    "I;16": (None, "16-bit grayscale", 1, None, False),
    "I;16B": (None, "16-bit grayscale", 1, None, False),
    "I;16L": (None, "16-bit grayscale", 1, None, False),
    "F": (None, "32-bit float grayscale", 1, None, False),
}


def pillow_layout(im, path: str | Path):
    """``(image, layout)`` for a Pillow image: converted first where Pillow does it losslessly
    (palette, bilevel, YCbCr), the layout's value range set from the whole image."""
    spec = _PILLOW.get(im.mode)
    if spec is None:
        _refuse(path, f"{len(im.getbands())}-channel {im.mode} image")
    convert, name, colour, alpha, premult = spec
    if convert:
        im = im.convert(convert)
    arr = np.asarray(im)
    layout = SampleLayout(
        name,
        colour=colour,
        alpha=alpha,
        premultiplied=premult,
        bits=arr.dtype.itemsize * 8,
        dtype=str(arr.dtype),
    )
    if layout.needs_range:
        layout = layout.with_range(arr)
    return arr, layout


def _refuse(path, what: str):
    raise SlideError(f"{path}: {what.strip()} image not supported; convert it to RGB")
