"""How well per-tile scores (attention) find ground-truth boxes: the localisation ROC AUC.

A tile is a *positive* when it holds at least half of some key box's area, a *negative* when it
touches no key box, and is left out otherwise (a tile with a sliver of a key object is neither
clearly right nor clearly wrong to score high). :func:`key_vs_other_auc` is the stricter
question: among tiles that hold an object, are the key objects' tiles scored above the others'
(background tiles left out)? Boxes are ``(x0, y0, x1, y1)`` in level-0
pixels, ends exclusive, for tiles and key objects alike.
"""

from __future__ import annotations

import numpy as np

__all__ = ["key_vs_other_auc", "localisation_auc", "mean_slide_localisation_auc", "tile_truth"]


def _boxes(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]):
        raise ValueError(f"{name}: every box needs x1 >= x0 and y1 >= y0")
    return arr


def tile_truth(tile_boxes, key_boxes, *, min_cover: float = 0.5) -> np.ndarray:
    """Each tile's truth: 1 (holds >= ``min_cover`` of a key box), 0 (touches none), -1 (left out).

    Parameters
    ----------
    tile_boxes : array-like, shape (N, 4)
        Tiles as (x0, y0, x1, y1).
    key_boxes : array-like, shape (K, 4)
        Key objects as (x0, y0, x1, y1); K may be 0 (every tile is then a negative).
    min_cover : float
        Share of a key box's area a tile must hold to be a positive.

    Returns
    -------
    ndarray, shape (N,), int8
    """
    t, k = _boxes(tile_boxes, "tile_boxes"), _boxes(key_boxes, "key_boxes")
    if len(k) == 0:
        return np.zeros(len(t), np.int8)
    w = np.minimum(t[:, None, 2], k[None, :, 2]) - np.maximum(t[:, None, 0], k[None, :, 0])
    h = np.minimum(t[:, None, 3], k[None, :, 3]) - np.maximum(t[:, None, 1], k[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area = np.maximum((k[:, 2] - k[:, 0]) * (k[:, 3] - k[:, 1]), 1e-12)
    cover = (inter / area[None, :]).max(axis=1)
    out = np.full(len(t), -1, np.int8)
    out[cover >= min_cover] = 1
    out[inter.max(axis=1) <= 0] = 0
    return out


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def localisation_auc(scores, tile_boxes, key_boxes, *, min_cover: float = 0.5) -> float:
    """ROC AUC of tile scores against the key boxes, tiles of all given slides pooled.

    Parameters
    ----------
    scores : array-like (N,), or a list of them (one per slide)
        Per-tile scores, e.g. attention weights. For a pooled AUC over several slides give
        lists: ``scores[i]``, ``tile_boxes[i]`` and ``key_boxes[i]`` belong to slide i. Scores
        are compared across slides as given (rescale them per slide first if that is wanted).
    tile_boxes : array-like (N, 4), or a list of them
    key_boxes : array-like (K, 4), or a list of them
    min_cover : float
        See :func:`tile_truth`.

    Returns
    -------
    float
        The AUC over positives and negatives (left-out tiles dropped); NaN when there are no
        positives or no negatives.
    """
    if isinstance(scores, list | tuple) and scores and np.ndim(scores[0]) == 1:
        truth = [
            tile_truth(t, k, min_cover=min_cover)
            for t, k in zip(tile_boxes, key_boxes, strict=True)
        ]
        return _pooled_auc(truth, scores)
    return _pooled_auc([tile_truth(tile_boxes, key_boxes, min_cover=min_cover)], [scores])


def _pooled_auc(truth: list[np.ndarray], scores: list) -> float:
    """ROC AUC of the slides' scores pooled against their truth (1, 0; -1 tiles left out)."""
    y = np.concatenate(truth) if truth else np.zeros(0, np.int8)
    s = (np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in scores])
         if len(scores) else np.zeros(0))  # fmt: skip
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores for {len(y)} tiles")
    keep = y >= 0
    return _auc(y[keep], s[keep])


def mean_slide_localisation_auc(scores, tile_boxes, key_boxes, *, min_cover: float = 0.5) -> float:
    """The mean over slides of each slide's own localisation AUC (slides where it is NaN skipped).

    Arguments are lists with one entry per slide, as for the pooled :func:`localisation_auc`.
    """
    per = [
        localisation_auc(s, t, k, min_cover=min_cover)
        for s, t, k in zip(scores, tile_boxes, key_boxes, strict=True)
    ]
    per = [a for a in per if not np.isnan(a)]
    return float(np.mean(per)) if per else float("nan")


def key_vs_other_auc(
    scores, tile_boxes, key_boxes, other_boxes, *, min_cover: float = 0.5
) -> float:
    """ROC AUC of tile scores, key objects' tiles against other objects' tiles, slides pooled.

    Scores that find *any* object (a digit against plain tissue) already give a high
    :func:`localisation_auc` when most tiles are background; this one leaves background out.
    Positives: tiles holding >= ``min_cover`` of a key box. Negatives: tiles holding >=
    ``min_cover`` of an other (distractor) box and touching no key box. All else is left out.

    Parameters
    ----------
    scores, tile_boxes, key_boxes, other_boxes : lists, one entry per slide
        Per-tile scores (N_i,), tiles (N_i, 4), key boxes (K_i, 4), other boxes (M_i, 4).

    Returns
    -------
    float
        NaN when there are no positives or no negatives.
    """
    truth = []
    for t, k, o in zip(tile_boxes, key_boxes, other_boxes, strict=True):
        key = tile_truth(t, k, min_cover=min_cover)
        y = np.full(len(key), -1, np.int8)
        y[key == 1] = 1
        y[(key == 0) & (tile_truth(t, o, min_cover=min_cover) == 1)] = 0
        truth.append(y)
    return _pooled_auc(truth, scores)
