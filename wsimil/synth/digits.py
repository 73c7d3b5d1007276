"""A shape cohort: real H&E tissue with MNIST digits stained into it.

A slide is positive when it holds a *key* digit (one digit class, 9 by default) and negative
otherwise. Every slide carries digits, drawn the same way whatever their class: the shape
alone decides the label, not colour, contrast, size or count. The cohort asks whether a MIL
model finds a small shape among real tissue texture, which frozen ImageNet features need
not carry and a CNN trained end to end from the tile pixels can learn (issue 19).

How a slide is made
-------------------
* Background: a crop of a real H&E slide (``background``, read with OpenSlide and resampled to
  ``mpp``), turned by a random multiple of 90 degrees and flipped at random; the crop position
  is drawn until at least ``min_tissue`` of it is tissue. Without a background file the
  project's synthetic tissue renderer (:mod:`wsimil.synth.render`) makes one image instead.
* Digits: real MNIST digits, stained in as haematoxylin: the background's transmitted light is
  multiplied by ``exp(-s * d * OD_H)`` (``d`` the digit's ink in [0, 1], ``OD_H`` the
  Ruifrok-Johnston haematoxylin optical density, ``s`` ~ U(1.2, 1.6) per digit), so a digit
  is a dark purple structure over the tissue, like a stained cell cluster, not a pasted sticker.
* Counts: every slide gets ``U{n_digits}`` digits; on a positive slide ``U{n_key}`` of them are
  key digits and the rest distractors (the other classes), on a negative slide all are
  distractors. The total is therefore distributed alike in both classes (counting digit-like
  tiles tells nothing). Digit instances come from per-class pools without replacement across
  the cohort (a pool is reshuffled only when it runs out), so no two slides share one while
  the pools last.
* Placement: each digit's ``digit_px`` frame lies wholly inside one cell of the grid
  ``[k * tile_px, (k + 1) * tile_px)`` from the slide's top-left corner (the grid ``wsimil tile
  --tile-px tile_px --target-mpp mpp --no-gap-tiles`` makes), in a cell that is at least 90 %
  tissue, at a random offset in the cell; at most one digit per cell. A shape cut by tile
  borders is a different question (the instance sees part of it) and is left out on purpose.

Files: ``slides/<slide_id>.tiff`` (pyramidal TIFF, :func:`wsimil.synth.slide_writer.write_rgb_slide`),
``manifest.csv`` (slide_id, path, label), ``boxes.csv`` (slide_id, digit, is_key, x0, y0, x1,
y1: the digit's inked pixels in level-0 px, ends exclusive; mnist_index: the digit's row in the
MNIST file) and ``cohort.json`` (the settings).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .cohort import _cohort_labels
from .slide_writer import write_rgb_slide

OD_HAEMATOXYLIN = np.array([0.650, 0.704, 0.286])  # Ruifrok & Johnston (2001), unit OD vector
INK_LEVEL = 0.2  # digit pixels above this share of full ink make its box
CELL_TISSUE = 0.9  # a digit's cell must be at least this much tissue
STRENGTH = (1.2, 1.6)  # range of the stain strength s per digit
BOX_COLUMNS = ["slide_id", "digit", "is_key", "x0", "y0", "x1", "y1", "mnist_index"]


def load_background(path: str | Path, *, mpp: float) -> np.ndarray:
    """Level 0 of a (small) slide, resampled to ``mpp`` µm per pixel, (H, W, 3) uint8."""
    import openslide
    from PIL import Image

    with openslide.OpenSlide(str(path)) as s:
        src_mpp = float(s.properties[openslide.PROPERTY_NAME_MPP_X])
        img = s.read_region((0, 0), 0, s.dimensions).convert("RGB")
    scale = src_mpp / float(mpp)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS))


def synthetic_background(side_px: int, *, mpp: float, seed: int) -> np.ndarray:
    """An image of the project's synthetic tissue (no lesions), (side_px, side_px, 3) uint8."""
    from .render import _render_band
    from .scene import _make_scene

    scene = _make_scene(int(side_px), int(side_px), float(mpp), int(seed), False, 0)
    return _render_band(scene, 0, int(side_px))


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Stained pixels (not glass): darker than 200 in some channel, or coloured; (H, W) bool."""
    lo, hi = rgb.min(axis=2), rgb.max(axis=2)
    return (lo < 200) | (hi.astype(np.int16) - lo > 25)


def cell_tissue(tissue: np.ndarray, tile_px: int) -> np.ndarray:
    """Tissue fraction of every whole grid cell, (H // tile_px, W // tile_px) float."""
    h, w = (tissue.shape[0] // tile_px) * tile_px, (tissue.shape[1] // tile_px) * tile_px
    t = tissue[:h, :w].reshape(h // tile_px, tile_px, w // tile_px, tile_px)
    return t.mean(axis=(1, 3))


def random_crop(
    image: np.ndarray, side_px: int, rng: np.random.Generator, *, min_tissue: float = 0.5,
    tries: int = 200,
) -> np.ndarray:  # fmt: skip
    """A ``side_px`` square crop of ``image`` after a random 90-degree turn and flips.

    Positions are drawn until the crop is at least ``min_tissue`` tissue (the most tissued of
    ``tries`` draws otherwise). An image smaller than the crop is tiled by reflection first.
    """
    img = np.rot90(image, int(rng.integers(4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.5:
        img = img[::-1]
    ph, pw = max(0, side_px - img.shape[0]), max(0, side_px - img.shape[1])
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    tissue = tissue_pixels(img)
    ii = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, best_frac = (0, 0), -1.0
    for _ in range(tries):
        y = int(rng.integers(img.shape[0] - side_px + 1))
        x = int(rng.integers(img.shape[1] - side_px + 1))
        s = ii[y + side_px, x + side_px] - ii[y, x + side_px] - ii[y + side_px, x] + ii[y, x]
        frac = s / side_px**2
        if frac > best_frac:
            best, best_frac = (y, x), frac
        if frac >= min_tissue:
            break
    y, x = best
    return np.ascontiguousarray(img[y : y + side_px, x : x + side_px])


def stain_digit(region: np.ndarray, ink: np.ndarray, strength: float) -> np.ndarray:
    """``region`` (h, w, 3) uint8 with ``ink`` (h, w) in [0, 1] stained in as haematoxylin."""
    od = float(strength) * ink[..., None] * OD_HAEMATOXYLIN
    return np.clip(region.astype(np.float64) * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)


def digit_ink(image: np.ndarray, digit_px: int) -> np.ndarray:
    """An MNIST digit (28, 28) uint8 as ink in [0, 1], resized to ``digit_px`` if needed."""
    if image.shape != (digit_px, digit_px):
        from PIL import Image

        image = np.asarray(
            Image.fromarray(image).resize((digit_px, digit_px), Image.Resampling.BILINEAR)
        )
    return image.astype(np.float64) / 255.0


def draw_digits(
    rgb: np.ndarray, inks: list[np.ndarray], rng: np.random.Generator, *, tile_px: int,
    strength: tuple[float, float] = STRENGTH,
) -> list[tuple[int, int, int, int]]:  # fmt: skip
    """Stain the digits into ``rgb`` (in place), each inside its own tissue cell of the grid.

    Each digit's stain strength ``s`` is drawn from U(``strength``).

    Returns
    -------
    list of (x0, y0, x1, y1)
        Each digit's inked box in pixels of ``rgb`` (ends exclusive), in the order of ``inks``.

    Raises
    ------
    ValueError
        Fewer cells that are at least 90 % tissue than digits, or a digit larger than a cell.
    """
    frac = cell_tissue(tissue_pixels(rgb), tile_px)
    free = np.flatnonzero(frac.ravel() >= CELL_TISSUE)
    if len(free) < len(inks):
        raise ValueError(f"{len(free)} tissue cells for {len(inks)} digits")
    cells = rng.choice(free, size=len(inks), replace=False)
    boxes = []
    for ink, cell in zip(inks, cells, strict=True):
        d = ink.shape[0]
        if d > tile_px:
            raise ValueError(f"a {d} px digit does not fit a {tile_px} px cell")
        cy, cx = divmod(int(cell), frac.shape[1])
        x = cx * tile_px + int(rng.integers(tile_px - d + 1))
        y = cy * tile_px + int(rng.integers(tile_px - d + 1))
        s = rng.uniform(*strength)
        rgb[y : y + d, x : x + d] = stain_digit(rgb[y : y + d, x : x + d], ink, s)
        rows, cols = np.nonzero(ink >= INK_LEVEL)
        boxes.append((x + int(cols.min()), y + int(rows.min()),
                      x + int(cols.max()) + 1, y + int(rows.max()) + 1))  # fmt: skip
    return boxes


class DigitPools:
    """Per-class queues of MNIST indices, shuffled once; a queue is reshuffled when it runs out."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator):
        self.rng = rng
        self.members = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        self.queues = {c: list(rng.permutation(m)) for c, m in self.members.items()}
        self.reused = 0

    def take(self, digit: int) -> int:
        """The next unused index of class ``digit``."""
        q = self.queues[digit]
        if not q:
            self.reused += 1
            q.extend(self.rng.permutation(self.members[digit]))
        return int(q.pop())


def plan_digits(
    labels: np.ndarray, slide_labels: np.ndarray, *, key_digit: int, n_digits: tuple[int, int],
    n_key: tuple[int, int], seed: int,
) -> list[list[tuple[int, int]]]:  # fmt: skip
    """Which MNIST digits each slide gets: per slide a list of (mnist index, class).

    Every slide gets ``U{n_digits}`` digits; a positive one ``U{n_key}`` of them key digits
    (at most all but one), the others distractors of uniformly drawn other classes.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xD161])
    pools = DigitPools(np.asarray(labels), rng)
    others = [c for c in pools.members if c != key_digit]
    if key_digit not in pools.members or not others:
        raise ValueError(f"the digits must hold class {key_digit} and at least one other class")
    plan = []
    for y in slide_labels:
        n = int(rng.integers(n_digits[0], n_digits[1] + 1))
        k = min(int(rng.integers(n_key[0], n_key[1] + 1)), n - 1) if y else 0
        classes = [key_digit] * k + [int(c) for c in rng.choice(others, size=n - k)]
        rng.shuffle(classes)
        plan.append([(pools.take(c), c) for c in classes])
    return plan


def _slide_pixels(source, side_px, inks, rng, *, tile_px, min_tissue, strength, tries=50):
    """A background crop with the digits drawn in; a crop with too few tissue cells is redrawn."""
    for _ in range(tries):
        rgb = random_crop(source, side_px, rng, min_tissue=min_tissue)
        try:
            return rgb, draw_digits(rgb, inks, rng, tile_px=tile_px, strength=strength)
        except ValueError as e:
            if "tissue cells" not in str(e):
                raise
    raise ValueError(
        f"no {side_px} px crop in {tries} holds {len(inks)} tissue cells of {tile_px} px"
    )


def _write_tables(out_dir: Path, rows: list[dict], boxes: list[dict]) -> Path:
    """``manifest.csv`` and ``boxes.csv``, each written under a temporary name and renamed."""
    for name, cols, data in (
        ("boxes.csv", BOX_COLUMNS, boxes),
        ("manifest.csv", ["slide_id", "path", "label"], rows),
    ):
        tmp = out_dir / f"{name}.tmp"
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(data)
        os.replace(tmp, out_dir / name)
    return out_dir / "manifest.csv"


def _check_settings(n_slides: int, positive_fraction: float, strength) -> None:
    """Refuse a cohort that cannot be made, in one line naming the setting."""
    if n_slides < 1 or not 0 <= positive_fraction <= 1:
        raise ValueError("need n_slides >= 1 and 0 <= positive_fraction <= 1")
    if not 0 < strength[0] <= strength[1]:
        raise ValueError(f"stain strength range {strength}: need 0 < low <= high")


def make_shape_cohort(
    out_dir: str | Path, *, n_slides: int = 80, key_digit: int = 9, positive_fraction: float = 0.5,
    background: str | Path | None = None, mnist: str | Path, side_px: int = 512,
    mpp: float = 1.0, tile_px: int = 32, digit_px: int = 28, n_digits: tuple[int, int] = (5, 9),
    n_key: tuple[int, int] = (1, 3), min_tissue: float = 0.5,
    strength: tuple[float, float] = STRENGTH, seed: int = 0,
) -> Path:  # fmt: skip
    """Write a shape cohort (see the module notes): slides, ``manifest.csv``, ``boxes.csv``.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created).
    n_slides : int
        Slides, ids ``shape_000``, ``shape_001``, ...
    key_digit : int
        The digit class that makes a slide positive.
    positive_fraction : float
        Exactly ``round(n_slides * positive_fraction)`` positives, shuffled from ``seed``.
    background : str or Path, optional
        A real H&E slide to crop the backgrounds from (OpenSlide); None: synthetic tissue.
    mnist : str or Path
        ``.npz`` with ``images`` uint8 (N, 28, 28) and ``labels`` (N,).
    side_px : int
        Slide side in pixels (square slides).
    mpp : float
        µm per pixel of the slides (the background is resampled to it).
    tile_px : int
        Side of the grid cells that hold the digits (the benchmark's tile size at ``mpp``).
    digit_px : int
        Side of a digit's frame (MNIST's 28 px: 28 µm at 1 µm per px).
    n_digits, n_key : (int, int)
        Inclusive ranges: digits per slide, and key digits among them on a positive slide.
    min_tissue : float
        Least tissue fraction of a background crop.
    strength : (float, float)
        Range of a digit's stain strength ``s`` (the ink's haematoxylin optical density is
        ``s`` times the unit vector): higher is darker, a more visible shape.
    seed : int
        Everything is a deterministic function of the seed and these settings.

    Returns
    -------
    Path
        The manifest (paths relative to ``out_dir``).
    """
    out_dir = Path(out_dir)
    _check_settings(n_slides, positive_fraction, strength)
    with np.load(mnist) as z:
        images, labels = z["images"], np.asarray(z["labels"]).astype(np.int64)
    slide_labels = _cohort_labels(int(n_slides), positive_fraction, seed)
    plan = plan_digits(labels, slide_labels, key_digit=int(key_digit), n_digits=n_digits,
                       n_key=n_key, seed=seed)  # fmt: skip
    if background is not None:
        source = load_background(background, mpp=mpp)
    else:
        source = synthetic_background(2 * int(side_px), mpp=mpp, seed=seed)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    rows, boxes = [], []
    for i, (y, digits) in enumerate(zip(slide_labels, plan, strict=True)):
        sid = f"shape_{i:03d}"
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xD162, i])
        inks = [digit_ink(images[j], int(digit_px)) for j, _ in digits]
        rgb, drawn = _slide_pixels(source, int(side_px), inks, rng, tile_px=int(tile_px),
                                   min_tissue=min_tissue, strength=strength)  # fmt: skip
        for (j, c), b in zip(digits, drawn, strict=True):
            row = (sid, c, int(c == key_digit), *b, j)
            boxes.append(dict(zip(BOX_COLUMNS, row, strict=True)))
        tiff = out_dir / "slides" / f"{sid}.tiff"
        tmp = tiff.with_name(tiff.name + ".tmp")
        write_rgb_slide(tmp, rgb, mpp=mpp)
        os.replace(tmp, tiff)
        rows.append({"slide_id": sid, "path": f"slides/{sid}.tiff", "label": int(y)})
    settings = dict(n_slides=int(n_slides), key_digit=int(key_digit), positive_fraction=positive_fraction,
                    background=None if background is None else str(background), mnist=str(mnist),
                    side_px=int(side_px), mpp=mpp, tile_px=int(tile_px), digit_px=int(digit_px),
                    n_digits=list(n_digits), n_key=list(n_key), min_tissue=min_tissue,
                    strength=[float(v) for v in strength], seed=seed)  # fmt: skip
    (out_dir / "cohort.json").write_text(json.dumps(settings, indent=2) + "\n")
    return _write_tables(out_dir, rows, boxes)
