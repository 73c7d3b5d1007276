"""Tissue masks on a low-resolution image of the slide.

Kept apart from reading and geometry: these functions take pixels and return masks.
"""

from __future__ import annotations

import numpy as np


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
    from scipy.ndimage import gaussian_filter
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    hi, lo = channel_range(rgb)
    sat = tissue_signal(rgb, hi=hi, lo=lo)
    sat = gaussian_filter(sat, sigma=max(blur_um / pixel_um, 0.0), mode="nearest", truncate=4.0)
    spread = float(sat.max() - sat.min())
    thr = threshold_otsu(sat) if spread > 1e-3 else max_saturation_threshold
    thr = float(np.clip(thr, min_saturation, max_saturation_threshold))
    mask = sat > thr
    # Near-white and near-black areas (glass, black scanner background) are not tissue.
    if white_level < 255:
        mask &= lo <= white_level
    if black_level > 0:
        mask &= hi >= black_level
    if remove_pen:
        mask &= ~pen_mask(rgb)
    mask = erode_cross(dilate_cross(mask))  # closing, then opening, with the 3x3 cross
    mask = dilate_cross(erode_cross(mask))
    px_area = pixel_um * pixel_um
    if min_tissue_um2 > 0:
        mask = remove_small_objects(mask, max_size=max(int(min_tissue_um2 / px_area), 1))
    if max_hole_um2 > 0:
        mask = remove_small_holes(mask, max_size=max(int(max_hole_um2 / px_area), 1))
    return mask


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


def tissue_signal(
    rgb: np.ndarray, *, gray_chroma: float = 4.0, hi: np.ndarray | None = None,
    lo: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Per-pixel tissue evidence in 0..1: HSV saturation, or darkness on a gray slide.

    Stained tissue is coloured on near-neutral glass, so saturation ``(max - min) / max``
    separates them. A grayscale slide (16-bit or 8-bit gray brightfield, converted to RGB
    with R = G = B; recognised by ``max - min`` below ``gray_chroma`` for 99.9% of pixels)
    has no saturation at all; there tissue is darker than the bright background, and the
    signal is the darkness relative to the background, ``1 - value / p99`` with ``p99`` the
    99th percentile of the brightness (the glass, clipped to at least 1).

    Returns
    -------
    ndarray, shape (H, W), float32
    """
    if hi is None or lo is None:
        hi, lo = channel_range(rgb)
    hi, lo = hi.astype(np.float32), lo.astype(np.float32)
    chroma = hi - lo
    if np.count_nonzero(chroma >= gray_chroma) <= 0.001 * chroma.size:  # 99.9% gray
        glass = max(float(np.percentile(hi, 99)), 1.0)
        return np.clip(1.0 - hi / glass, 0.0, 1.0)
    return chroma / np.maximum(hi, 1.0)


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
