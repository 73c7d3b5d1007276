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
) -> np.ndarray:
    """Tissue mask by saturation + Otsu, blur and morphological clean-up.

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
        The Otsu threshold is clipped to this range, so a slide that is all background or all
        tissue does not get a meaningless split.

    Returns
    -------
    ndarray, shape (H, W), bool
    """
    from scipy.ndimage import binary_closing, binary_opening
    from skimage.color import rgb2hsv
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import disk, remove_small_holes, remove_small_objects

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    hsv = rgb2hsv(rgb)
    sat = gaussian(hsv[..., 1], sigma=max(blur_um / pixel_um, 0.0), preserve_range=True)
    spread = float(sat.max() - sat.min())
    thr = threshold_otsu(sat) if spread > 1e-3 else max_saturation_threshold
    thr = float(np.clip(thr, min_saturation, max_saturation_threshold))
    mask = sat > thr
    # Very dark areas (black background, heavy pen) are not tissue.
    mask &= hsv[..., 2] > 0.15
    mask = binary_closing(mask, structure=disk(1), border_value=0)
    mask = binary_opening(mask, structure=disk(1))
    px_area = pixel_um * pixel_um
    if min_tissue_um2 > 0:
        mask = remove_small_objects(mask, max_size=max(int(min_tissue_um2 / px_area), 1))
    if max_hole_um2 > 0:
        mask = remove_small_holes(mask, max_size=max(int(max_hole_um2 / px_area), 1))
    return mask
