"""How an attention map is drawn over the slide: the one definition shared by the static
overlay PNGs (:mod:`wsimil.export`) and the zoomable viewer (:mod:`wsimil.viewer`).

Colour and transparency
-----------------------
Each value ``v`` in [0, 1] gets the colour ``cmap(v)`` and the opacity ``alpha * v ** g``: the
lowest tiles are fully see-through, so plain tissue keeps its H&E look, and the top of the
scale is nearly solid. ``g`` depends on the scaling (:data:`OPACITY_GAMMA`): rank values are
spread evenly over [0, 1], so ``g = 3`` keeps the lower half of the tiles faint (opacity
below ``alpha / 8``) and the top decile strong (above ``0.7 alpha``); min-max values crowd near
0, so ``g = 0.6`` lifts them (a tile at 0.1 gets ``0.25 alpha``).

The default colour map (``heatmap.cmap``), ``autumn_r``, runs from yellow through orange to
pure red (255, 0, 0). Compared on the synthetic H&E-like slides with YlOrRd, turbo, viridis,
plasma and hot: it has no blue or purple that could be taken for haematoxylin-dense tissue
(turbo's and viridis' low ends), its high end is a saturated red that stays distinct from
eosin pink where YlOrRd's and turbo's dark reds read as dark staining, red means "high" as
reviewers expect, and its lightness falls monotonically from yellow to red, so the order
still reads without colour vision (red-green colour blindness).

Scaling
-------
``rank`` (the default; percentile rank of each tile within its slide, as CLAM's heatmaps use)
spreads the colours evenly over a slide's tiles, so the top decile is always visibly red even
when attention is concentrated on a few tiles; ``minmax`` is ``(a - min a) / (max a - min a)``,
which shows how peaked attention is but leaves most tiles faint.

The static overlay is the thumbnail's size with its title, colour bar and scale bar in a strip
*below* it, so the thumbnail and the overlay shown side by side are at the same scale; the
top-k tiles are outlined and numbered on it.
"""

from __future__ import annotations

import math

import numpy as np

SCALINGS = ("rank", "minmax")
OPACITY_GAMMA = {"rank": 3.0, "minmax": 0.6}
_OUTLINE = (30, 30, 30)


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Rank of each value as a fraction in [0, 1] (1 = highest)."""
    n = len(values)
    if n <= 1:
        return np.ones(n, np.float32)
    order = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return (order / (n - 1)).astype(np.float32)


def scale_values(values: np.ndarray, how: str) -> np.ndarray:
    """Per-slide scaling of tile values to [0, 1]: ``rank`` or ``minmax`` (:data:`SCALINGS`)."""
    from .raster import minmax

    if how == "rank":
        return percentile_rank(np.asarray(values, np.float64))
    if how == "minmax":
        return minmax(values)
    raise ValueError(f"scaling {how!r}: use one of {', '.join(SCALINGS)}")


def overlay_opacity(heat: np.ndarray, alpha: float, scale: str = "minmax") -> np.ndarray:
    """Opacity of each value: ``alpha * v ** OPACITY_GAMMA[scale]`` (0 at the low end)."""
    return (alpha * np.clip(heat, 0, 1) ** OPACITY_GAMMA[scale]).astype(np.float32)


def overlay_rgba(
    heat: np.ndarray, covered: np.ndarray, *, cmap: str, alpha: float, scale: str = "minmax"
) -> np.ndarray:
    """The map as an RGBA image (transparent where not covered), for drawing over the slide;
    ``scale`` is how ``heat`` was scaled (it sets how fast opacity rises).

    Returns
    -------
    ndarray, shape (h, w, 4), uint8
    """
    from .raster import colour_lut

    lut = colour_lut(cmap)
    out = np.zeros((*heat.shape, 4), np.uint8)
    out[..., :3] = lut[np.clip(np.rint(heat * 255), 0, 255).astype(np.int64)]
    a = np.where(covered, overlay_opacity(heat, alpha, scale), 0)
    out[..., 3] = np.rint(a * 255).astype(np.uint8)
    return out


def blend(thumb: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """``thumb`` (h, w, 3) with ``rgba`` (h, w, 4) drawn over it, uint8."""
    a = rgba[..., 3:4].astype(np.float32) / 255
    out = (1 - a) * thumb.astype(np.float32) + a * rgba[..., :3].astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def font(size: int):
    """DejaVu Sans (shipped with matplotlib; it has µ) at ``size`` px, else Pillow's own."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
        return ImageFont.truetype(path, max(8, int(size)))
    except (ImportError, OSError, ValueError):  # pragma: no cover - no matplotlib font
        return ImageFont.load_default(size=max(8, int(size)))


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 x 10^n not above ``target`` (> 0)."""
    exp = 10 ** math.floor(math.log10(target))
    return max(m * exp for m in (1, 2, 5) if m * exp <= target)


def length_text(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def render_overlay(
    thumb: np.ndarray,
    heat: np.ndarray,
    covered: np.ndarray,
    *,
    cmap: str,
    alpha: float,
    title: str = "",
    outline: np.ndarray | None = None,
    um_per_px: float | None = None,
    boxes: list[tuple[int, int, int, int]] | None = None,
    legend: str = "attention",
    scale: str = "minmax",
) -> np.ndarray:
    """Draw ``heat`` (values in [0, 1]) over ``thumb``, with a legend strip below.

    Parameters
    ----------
    outline : (h, w) bool, optional
        Tissue-boundary pixels, drawn in dark blue-grey.
    um_per_px : float, optional
        Microns per thumbnail pixel; draws a scale bar (none when the slide has no mpp).
    boxes : list of (x0, y0, x1, y1), optional
        Thumbnail-pixel boxes of the top tiles, best first: outlined and numbered.
    legend : str
        What the colours show (with its scaling), written by the colour bar.
    scale : str
        How ``heat`` was scaled (``rank`` or ``minmax``): sets how fast opacity rises.

    Returns
    -------
    ndarray, shape (h + strip, w, 3), uint8: the overlay at the thumbnail's scale (first ``h``
    rows, pixel for pixel over the thumbnail), then the title, colour bar and scale bar.
    """
    img = blend(thumb, overlay_rgba(heat, covered, cmap=cmap, alpha=alpha, scale=scale))
    if outline is not None:
        img[outline] = (40, 40, 90)
    if boxes:
        img = _draw_boxes(img, boxes)
    return _legend_strip(img, cmap=cmap, alpha=alpha, title=title, um_per_px=um_per_px,
                         legend=legend, scale=scale)  # fmt: skip


def _draw_boxes(img: np.ndarray, boxes) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    size = max(10, min(img.shape[:2]) // 45)
    f = font(size)
    for rank, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        x1, y1 = max(x1, x0 + 3), max(y1, y0 + 3)
        d.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=(255, 255, 255), width=1)
        d.rectangle((x0, y0, x1, y1), outline=_OUTLINE, width=max(1, size // 8))
        d.text((x1 + 2, y0 - 2), str(rank), fill=_OUTLINE, font=f, stroke_width=2,
               stroke_fill=(255, 255, 255))  # fmt: skip
    return np.asarray(im)


def wrap_text(text: str, width: float, measure) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` (``measure(s)``: a line's width).

    Text that fits is kept as it is (with its spacing); a word wider than ``width`` (a long
    slide id) is cut between characters, so nothing runs off the image; no line is empty.
    """
    if measure(text) <= width:
        return [text]
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        lines.append("")
        for ch in word:
            if lines[-1] and measure(lines[-1] + ch) > width:
                lines.append("")
            lines[-1] += ch
    return lines or [""]


def _legend_strip(img, *, cmap, alpha, title, um_per_px, legend, scale) -> np.ndarray:
    """The image with a white strip below: title, colour bar (as blended over white), scale bar.

    Text is sized from the image width (about 1/40 of it, at least 12 px), so it stays legible
    when the image is shown at thumbnail size. The strip keeps the image's width (the overlay
    sits beside the thumbnail at the same scale), so on a narrow image the title wraps onto
    more lines and the scale bar moves to a row of its own instead of running into the text.
    """
    from PIL import Image, ImageDraw

    h, w = img.shape[:2]
    fs = max(12, w // 40)
    f = font(fs)
    pad = fs // 2
    bar_w = max(16, w // 3)
    lines = wrap_text(title, w - 2 * pad, f.getlength)
    keys = wrap_text(legend, w - 3 * pad - bar_w, f.getlength)  # beside the colour bar
    row = max(2 * fs + pad // 2, len(keys) * (fs + pad // 2)) + pad  # colour bar, low/high
    own_row = False  # the scale bar below the colour bar's row, when beside it would collide
    if um_per_px:
        um = nice_length(um_per_px * w / 4)
        px = int(round(um / um_per_px))
        bar_x0 = w - pad - max(px, int(f.getlength(length_text(um))))
        keys_end = 2 * pad + bar_w + max(f.getlength(k) for k in keys)
        own_row = len(keys) > 1 or keys_end + pad > bar_x0
    y_bar = h + len(lines) * (fs + pad) + pad
    strip = y_bar - h + row + pad + (2 * fs + pad if own_row else 0)
    canvas = np.full((h + strip, w, 3), 255, np.uint8)
    canvas[:h] = img
    ramp = np.linspace(0, 1, bar_w, dtype=np.float32)[None, :].repeat(fs, 0)
    rgba = overlay_rgba(ramp, np.ones_like(ramp, bool), cmap=cmap, alpha=max(alpha, 0.6),
                        scale=scale)  # fmt: skip
    canvas[y_bar : y_bar + fs, pad : pad + bar_w] = blend(np.full((*ramp.shape, 3), 235), rgba)
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    d.rectangle((pad - 1, y_bar - 1, pad + bar_w, y_bar + fs), outline=(120, 120, 120))
    for k, line in enumerate(lines):
        d.text((pad, h + pad + k * (fs + pad)), line, fill=(0, 0, 0), font=f)
    d.text((pad, y_bar + fs + pad // 2), "low", fill=(0, 0, 0), font=f)
    d.text((pad + bar_w, y_bar + fs + pad // 2), "high", fill=(0, 0, 0), font=f, anchor="ra")
    for k, key in enumerate(keys):
        d.text((2 * pad + bar_w, y_bar + k * (fs + pad // 2)), key, fill=(0, 0, 0), font=f)
    if um_per_px:
        y = y_bar + row if own_row else y_bar
        x1, text = w - pad, length_text(um)
        d.rectangle((x1 - px, y + fs // 3, x1, y + fs - fs // 3), fill=(0, 0, 0))
        x_text = min(x1 - px / 2, x1 - f.getlength(text) / 2)  # centred, inside the image
        d.text((x_text, y + fs + pad // 2), text, fill=(0, 0, 0), font=f, anchor="ma")
    return np.asarray(im)
