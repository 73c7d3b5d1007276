"""Tissue masks on a low-resolution image of the slide.

Kept apart from reading and geometry: these functions take pixels and return masks. A mask is
made in three steps, which :mod:`wsimil.mask` also uses separately to redraw a coarse mask's
edges at a finer resolution: :func:`fit_tissue_rule` (signal and Otsu threshold of an image),
:meth:`TissueRule.pixels` (pixels of any image of the same slide by that rule) and
:func:`clean_mask` (morphology, small regions and holes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TissueRule:
    """Which pixels are tissue, fitted on one image of a slide and applied to any other.

    ``threshold`` is on :func:`tissue_signal` (saturation, or darkness when ``gray``, relative
    to ``glass``); ``white_level`` / ``black_level`` drop glass and black background.
    """

    threshold: float
    gray: bool
    glass: float
    white_level: int = 235
    black_level: int = 40
    remove_pen: bool = False

    def signal(self, rgb: np.ndarray, *, blur_px: float = 0.0, hi=None, lo=None) -> np.ndarray:
        """Tissue signal of ``rgb`` (H, W, 3) uint8, blurred by ``blur_px`` (sigma); (H, W) float32."""
        if hi is None or lo is None:
            hi, lo = channel_range(rgb)
        sig = tissue_signal(rgb, hi=hi, lo=lo, gray=self.gray, glass=self.glass)
        if blur_px >= 0.25:
            from scipy.ndimage import gaussian_filter

            sig = gaussian_filter(sig, sigma=blur_px, mode="nearest", truncate=4.0)
        return sig

    def pixels(self, rgb: np.ndarray, *, blur_px: float = 0.0, signal=None) -> np.ndarray:
        """Tissue pixels of ``rgb`` (H, W, 3) uint8 by this rule, before clean-up; (H, W) bool."""
        hi, lo = channel_range(rgb)
        if signal is None:
            signal = self.signal(rgb, blur_px=blur_px, hi=hi, lo=lo)
        mask = signal > self.threshold
        # Near-white and near-black areas (glass, black scanner background) are not tissue.
        if self.white_level < 255:
            mask &= lo <= self.white_level
        if self.black_level > 0:
            mask &= hi >= self.black_level
        if self.remove_pen:
            mask &= ~pen_mask(rgb)
        return mask


def fit_tissue_rule(
    rgb: np.ndarray,
    *,
    pixel_um: float,
    blur_um: float = 8.0,
    min_saturation: float = 0.05,
    max_saturation_threshold: float = 0.2,
    remove_pen: bool = False,
    white_level: int = 235,
    black_level: int = 40,
) -> tuple[TissueRule, np.ndarray]:
    """The tissue rule of a slide from a low-resolution image of it.

    Returns
    -------
    rule : TissueRule
        Otsu threshold of the blurred signal, clipped to ``[min_saturation,
        max_saturation_threshold]`` so an image that is all background or all tissue does not
        get a meaningless split; gray-slide detection and glass level of ``rgb``.
    signal : ndarray, shape (H, W), float32
        The blurred signal of ``rgb`` the threshold was fitted on.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    hi, lo = channel_range(rgb)
    gray, glass = gray_and_glass(hi, lo)
    rule = TissueRule(0.0, gray, glass, white_level, black_level, remove_pen)
    sig = rule.signal(rgb, blur_px=max(blur_um / pixel_um, 0.0), hi=hi, lo=lo)
    spread = float(sig.max() - sig.min())
    thr = otsu_threshold(sig) if spread > 1e-3 else max_saturation_threshold
    thr = float(np.clip(thr, min_saturation, max_saturation_threshold))
    return TissueRule(thr, gray, glass, white_level, black_level, remove_pen), sig


def clean_mask(
    mask: np.ndarray, *, pixel_um: float, min_tissue_um2: float, max_hole_um2: float
) -> np.ndarray:
    """Closing then opening by the 3x3 cross; regions under ``min_tissue_um2`` dropped and
    holes under ``max_hole_um2`` filled (areas in µm² at ``pixel_um``). (H, W) bool."""
    return drop_small(close_open(mask), pixel_um=pixel_um, min_tissue_um2=min_tissue_um2,
                      max_hole_um2=max_hole_um2)  # fmt: skip


def close_open(mask: np.ndarray) -> np.ndarray:
    """Closing, then opening, by the 3x3 cross (a new array; outside the image is False)."""
    return dilate_cross(erode_cross(erode_cross(dilate_cross(mask))))


def drop_small(
    mask: np.ndarray, *, pixel_um: float, min_tissue_um2: float, max_hole_um2: float,
    keep_edge: bool = False,
) -> np.ndarray:  # fmt: skip
    """In place: regions under ``min_tissue_um2`` dropped, then holes under ``max_hole_um2``
    filled (areas in µm² at ``pixel_um``; 0 = off); with ``keep_edge``, regions and holes that
    reach the array's edge are left (see :func:`drop_small_regions`). Returns ``mask``."""
    px_area = pixel_um * pixel_um
    if min_tissue_um2 > 0:
        drop_small_regions(mask, max_size=max(int(min_tissue_um2 / px_area), 1),
                           keep_edge=keep_edge)  # fmt: skip
    if max_hole_um2 > 0:
        np.logical_not(mask, out=mask)  # holes are the small regions of the background
        drop_small_regions(mask, max_size=max(int(max_hole_um2 / px_area), 1),
                           keep_edge=keep_edge)  # fmt: skip
        np.logical_not(mask, out=mask)
    return mask


def drop_small_regions(mask: np.ndarray, *, max_size: int, keep_edge: bool = False) -> np.ndarray:
    """Set to False, in place, the 4-connected regions of ``mask`` of at most ``max_size``
    pixels (as ``skimage.morphology.remove_small_objects(max_size=...)``, with one int32
    label image and no copy of the mask). Returns ``mask``.

    With ``keep_edge``, regions that touch the array's edge are left whatever their size
    (for a window of a larger mask: they may go on outside it).

    A region whose bounding box spans ``h + w - 1 > max_size`` has more than ``max_size``
    pixels (a 4-connected region spanning h rows and w columns has at least that many), so
    only the others are counted, inside their boxes; with many regions, one banded count.
    """
    from scipy.ndimage import find_objects, label

    labels, n = label(mask)  # the 3x3 cross: 4-connectivity
    if n == 0:
        return mask
    if n > 4096:
        return _drop_small_by_count(mask, labels, n, max_size, keep_edge)
    for i, box in enumerate(find_objects(labels), start=1):
        if box is None:
            continue
        if keep_edge and any(
            b.start == 0 or b.stop == size for b, size in zip(box, mask.shape, strict=True)
        ):
            continue
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        if h + w - 1 > max_size:
            continue
        region = labels[box] == i
        if h * w <= max_size or np.count_nonzero(region) <= max_size:
            mask[box][region] = False
    return mask


def _drop_small_by_count(mask, labels, n: int, max_size: int, keep_edge: bool) -> np.ndarray:
    # Row bands keep numpy's int64 copies of the labels (bincount, indexing) small.
    rows = max(1, 2**20 // max(mask.shape[1], 1))
    sizes = np.zeros(n + 1, np.int64)
    for r in range(0, mask.shape[0], rows):
        sizes += np.bincount(labels[r : r + rows].ravel(), minlength=n + 1)
    small = sizes <= max_size
    small[0] = False
    if keep_edge:
        small[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    if small.any():
        for r in range(0, mask.shape[0], rows):
            mask[r : r + rows][small[labels[r : r + rows]]] = False
    return mask


def otsu_threshold(values: np.ndarray, *, nbins: int = 256) -> float:
    """Otsu's threshold of ``values`` from a ``nbins`` histogram over their range: the bin
    centre that maximises the between-class variance (as ``skimage.filters.threshold_otsu``)."""
    counts, edges = np.histogram(
        values, bins=nbins, range=(float(values.min()), float(values.max()))
    )
    centres = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float64)
    w1, w2 = np.cumsum(counts), np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centres) / np.maximum(w1, 1e-12)
    m2 = (np.cumsum((counts * centres)[::-1]) / np.maximum(w2[::-1], 1e-12))[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def tissue_mask(
    rgb: np.ndarray,
    *,
    pixel_um: float,
    min_tissue_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
    blur_um: float = 8.0,
    min_saturation: float = 0.05,
    max_saturation_threshold: float = 0.2,
    remove_pen: bool = False,
    white_level: int = 235,
    black_level: int = 40,
) -> np.ndarray:
    """Tissue mask by saturation (darkness on a gray slide) + Otsu, blur and clean-up.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8
        Low-resolution image of the slide.
    pixel_um : float
        Microns per pixel of ``rgb``; areas are given in µm² so the same settings work at any
        scan resolution.
    min_tissue_um2, max_hole_um2 : float
        Tissue regions smaller than ``min_tissue_um2`` are dropped; holes smaller than
        ``max_hole_um2`` are filled.
    blur_um : float
        Gaussian blur (sigma, µm) of the saturation channel before thresholding.
    min_saturation, max_saturation_threshold : float
        The Otsu threshold of :func:`tissue_signal` is clipped to this range, so a slide that is
        all background or all tissue does not get a meaningless split.

    Returns
    -------
    ndarray, shape (H, W), bool
    """
    rule, sig = fit_tissue_rule(
        rgb, pixel_um=pixel_um, blur_um=blur_um, min_saturation=min_saturation,
        max_saturation_threshold=max_saturation_threshold, remove_pen=remove_pen,
        white_level=white_level, black_level=black_level,
    )  # fmt: skip
    return clean_mask(rule.pixels(rgb, signal=sig), pixel_um=pixel_um,
                      min_tissue_um2=min_tissue_um2, max_hole_um2=max_hole_um2)  # fmt: skip


def dilate_cross(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by the 3x3 cross (``disk(1)``) from shifted slices; outside is False."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def erode_cross(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the 3x3 cross; pixels outside the image count as False (so the
    border row and column erode), as ``scipy.ndimage.binary_erosion(border_value=0)``."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def channel_range(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel maximum and minimum over the three channels, (H, W) uint8 each.

    Element-wise over the channel slices: several times faster than ``rgb.max(axis=2)``,
    which reduces over the short last axis pixel by pixel.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def gray_and_glass(
    hi: np.ndarray, lo: np.ndarray, *, gray_chroma: float = 4.0
) -> tuple[bool, float]:
    """Whether an image is a grayscale slide, and its glass brightness.

    A grayscale slide (16-bit or 8-bit gray brightfield, converted to RGB with R = G = B) is
    recognised by ``max - min`` below ``gray_chroma`` for 99.9% of pixels; its glass level is
    the 99th percentile of the brightness (clipped to at least 1).
    """
    chroma = hi.astype(np.int16) - lo.astype(np.int16)
    if np.count_nonzero(chroma >= gray_chroma) > 0.001 * chroma.size:
        return False, 255.0
    return True, max(float(np.percentile(hi, 99)), 1.0)


def tissue_signal(
    rgb: np.ndarray, *, hi: np.ndarray | None = None, lo: np.ndarray | None = None,
    gray: bool | None = None, glass: float = 255.0,
) -> np.ndarray:  # fmt: skip
    """Per-pixel tissue evidence in 0..1: HSV saturation, or darkness on a gray slide.

    Stained tissue is coloured on near-neutral glass, so saturation ``(max - min) / max``
    separates them. A grayscale slide has no saturation at all; there tissue is darker than
    the bright background, and the signal is the darkness relative to the glass,
    ``1 - value / glass``. ``gray=None`` decides from ``rgb`` itself (:func:`gray_and_glass`).

    Returns
    -------
    ndarray, shape (H, W), float32
    """
    if hi is None or lo is None:
        hi, lo = channel_range(rgb)
    if gray is None:
        gray, glass = gray_and_glass(hi, lo)
    hi = hi.astype(np.float32)
    if gray:
        return np.clip(1.0 - hi / glass, 0.0, 1.0)
    return (hi - lo.astype(np.float32)) / np.maximum(hi, 1.0)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker pen.

    H&E stains are pink to purple: red is never far below blue and green is the lowest
    channel. Blue pen has blue well above red, green pen has green above red and blue, and
    black pen is dark and grey.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3), uint8

    Returns
    -------
    ndarray, shape (H, W), bool
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    blue = (b > r + 60) & (b > g + 30) & (r < 120)
    green = (g > r + 20) & (g >= b) & (r < 160)
    lo = np.minimum(np.minimum(r, g), b)
    hi = np.maximum(np.maximum(r, g), b)
    black = (hi < 90) & (hi - lo < 30)
    return blue | green | black
