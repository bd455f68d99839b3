"""The measures of docs/method.md#evaluation as plain functions on tensors and arrays.

Classification: accuracy, macro and per-class F1, the confusion matrix (scikit-learn
underneath). Concepts: one ROC AUC per concept. Localisation: the Pointing Game and its
energy-based variant on concept saliency maps.

Conventions used by every function below **(ours, where the papers are silent;
docs/decisions.md#metric-conventions)**:

- Labels and predictions are class indices. Macro F1 averages over the classes present in
  the labels or the predictions (scikit-learn's default); a class absent from both has no
  F1 (NaN in ``per_class_f1``) rather than a free 0 or 1.
- A concept whose labels contain only one class has no AUC: NaN, left out of means.
- Ground-truth boxes are ``(concept, x0, y0, x1, y1)``, the concept a name or an index.
  Boxes are ``(x0, y0, x1, y1)`` in image pixels with x1/y1 exclusive, the edges of pixel
  ``i`` being ``i`` and ``i + 1``. A box holds the pixels whose centres (``i + 0.5``) lie in
  it, so an integer box holds columns ``x0 .. x1 - 1``; it is clipped to the image. A box
  that holds no pixel (zero area, sub-pixel, or outside the image) is **empty** and ignored;
  a concept whose boxes in an image are all empty is not evaluated on that image.
- Concept saliency: the similarity maps of a concept, max over its M prototypes (pruned
  prototypes left out), upsampled to image size by ``FeatureGrid.upsample`` (the one place
  that maps cells to pixels). A concept whose prototypes are all pruned has no map (NaN)
  and is not evaluated.
- Pointing Game (Zhang et al. 2016): the point is the pixel of the peak of the concept's
  map, located below the cell size by ``FeatureGrid.peaks`` (the maximum cell, refined by
  a parabola through its neighbours along each axis, rounded to the nearest pixel:
  ``concept_points``) **(ours: the argmax of the bilinearly upsampled map can only land on
  a cell centre; docs/decisions.md#sub-cell-peaks)**; it is a hit when its Euclidean distance (in pixels,
  between pixel indices) to the nearest pixel of a box of that concept is at most the
  tolerance. Tolerance 0 is the paper's protocol (the point lies in a box), 15 px the
  original one. **Ties go to the first maximum in row-major order** (smallest y, then
  smallest x), never "any maximum hits": a flat or saturated map must not earn hits it
  did not point at, and the result is deterministic across devices.
- A pair (image, concept) is evaluated when the concept has at least one non-empty box in
  the image; the overall Pointing Game is hits / evaluated pairs (pooled over concepts).
- Points landing on a shortcut box (a text marker, a pacemaker: SyntheticCXR's
  ``shortcut_box``) are counted separately with the same distance rule; they are misses
  unless the shortcut box overlaps a box of the concept.
- Energy-based Pointing Game (Wang et al. 2020, Score-CAM): the fraction of the positive
  part of the saliency (after upsampling) that lies inside the union of the concept's
  boxes. A map without positive energy scores 0, for the same reason as the tie rule.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm

from ..model.grid import FeatureGrid



def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


# --------------------------------------------------------------------------- classification
def accuracy(labels, predictions) -> float:
    """Fraction of correct predictions. labels, predictions: (B,) class indices."""
    return float(skm.accuracy_score(_numpy(labels), _numpy(predictions)))


def per_class_f1(labels, predictions, num_classes: int) -> np.ndarray:
    """(N,) F1 of each class; NaN for a class absent from both labels and predictions.

    labels, predictions: (B,) class indices in [0, num_classes).
    """
    labels, predictions = _numpy(labels).astype(int), _numpy(predictions).astype(int)
    scores = skm.f1_score(labels, predictions, labels=list(range(num_classes)), average=None, zero_division=0)
    seen = np.isin(np.arange(num_classes), np.union1d(labels, predictions))
    return np.where(seen, scores, np.nan)


def macro_f1(labels, predictions, num_classes: int | None = None) -> float:
    """Macro F1 (the paper's metric) over the classes present in labels or predictions.

    labels, predictions: (B,) class indices. Equals scikit-learn's ``f1_score(average=
    "macro")``; ``num_classes`` only checks the range.
    """
    labels, predictions = _numpy(labels).astype(int), _numpy(predictions).astype(int)
    if num_classes is not None and len(labels) and max(labels.max(), predictions.max()) >= num_classes:
        raise ValueError(f"Class indices must lie in [0, {num_classes}).")
    return float(skm.f1_score(labels, predictions, average="macro", zero_division=0))


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """(N, N) counts: row = true class, column = predicted class."""
    return skm.confusion_matrix(_numpy(labels).astype(int), _numpy(predictions).astype(int), labels=list(range(num_classes)))


def concept_auc(concepts, scores) -> np.ndarray:
    """(K,) ROC AUC of each concept; NaN where the labels hold a single class.

    concepts: (B, K) 0/1 ground truth (NaN = unknown, left out); scores: (B, K) any
    monotone concept score (probabilities, logits).
    """
    concepts, scores = _numpy(concepts).astype(float), _numpy(scores).astype(float)
    if concepts.shape != scores.shape or concepts.ndim != 2:
        raise ValueError(f"concepts and scores must both be (B, K), got {concepts.shape} and {scores.shape}.")
    aucs = np.full(concepts.shape[1], np.nan)
    for k in range(concepts.shape[1]):
        known = ~np.isnan(concepts[:, k])
        truth = concepts[known, k]
        if np.unique(truth).size == 2:  # AUC needs both a positive and a negative
            aucs[k] = skm.roc_auc_score(truth, scores[known, k])
    return aucs


def mean_auc(aucs) -> float:
    """Mean of per-concept AUCs (``concept_auc``), leaving out concepts without one; NaN
    when no concept has one."""
    aucs = _numpy(aucs).astype(float)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


# --------------------------------------------------------------------------- saliency
def concept_saliency(similarity_maps: torch.Tensor, grid: FeatureGrid, image_size: tuple[int, int],
                     prototype_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, M, h, w) similarity maps -> (B, K, H, W) concept saliency in image pixels.

    Max over each concept's M prototypes first (leaving out prototypes that
    ``prototype_mask`` (K, M) marks False), then ``grid.upsample`` to ``image_size``.
    A concept without any active prototype gets an all-NaN map.
    """
    best, dead = concept_maps(similarity_maps, prototype_mask)
    saliency = grid.upsample(best, tuple(image_size))
    return saliency.masked_fill(dead[..., None, None], math.nan)


def concept_points(similarity_maps: torch.Tensor, grid: FeatureGrid, image_size: tuple[int, int],
                   prototype_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, M, h, w) similarity maps -> (B, K, 2) (y, x) pixel where each concept's map peaks.

    The same concept map as ``concept_saliency`` (max over active prototypes), its peak
    located below the cell size (``grid.peak_pixels``) in an image of ``image_size``. NaN for a concept without any active prototype.
    """
    best, dead = concept_maps(similarity_maps, prototype_mask)
    return grid.peak_pixels(best, tuple(image_size)).masked_fill(dead[..., None], math.nan)


def concept_maps(similarity_maps: torch.Tensor, prototype_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, M, h, w) -> (B, K, h, w) max over active prototypes (0 where none), (B, K) none active."""
    maps = similarity_maps
    if prototype_mask is not None:
        mask = prototype_mask.to(maps.device, torch.bool)[None, :, :, None, None]
        maps = maps.masked_fill(~mask, -math.inf)
    best = maps.amax(dim=2)  # (B, K, h, w)
    dead = torch.isinf(best).all(dim=-1).all(dim=-1)  # (B, K): every prototype pruned
    return best.masked_fill(dead[..., None, None], 0.0), dead


def argmax_points(maps: torch.Tensor) -> torch.Tensor:
    """(..., H, W) maps -> (..., 2) long (y, x) of the maximum; ties: first in row-major order."""
    W = maps.shape[-1]
    # torch.argmax documents that it returns the first maximal index (row-major once the
    # map is flattened); tests/test_evaluation_metrics.py pins this rule down.
    first = maps.flatten(-2).argmax(dim=-1)
    return torch.stack([first // W, first % W], dim=-1)


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int] | None:
    """Inclusive pixel index range ``(y_lo, y_hi, x_lo, x_hi)`` of a box, clipped; None if empty.

    A pixel belongs to the box when its centre ``i + 0.5`` lies in ``[x0, x1)`` (see the
    module docstring); for integer boxes these are the pixels ``x0 .. x1 - 1``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    x_lo, x_hi = max(math.ceil(x0 - 0.5), 0), min(math.ceil(x1 - 0.5) - 1, width - 1)
    y_lo, y_hi = max(math.ceil(y0 - 0.5), 0), min(math.ceil(y1 - 0.5) - 1, height - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return None
    return y_lo, y_hi, x_lo, x_hi


def box_mask(boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """(H, W) bool union of the pixels of ``boxes`` (x0, y0, x1, y1)."""
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        pixels = box_pixels(box, height, width)
        if pixels is not None:
            y_lo, y_hi, x_lo, x_hi = pixels
            mask[y_lo:y_hi + 1, x_lo:x_hi + 1] = True
    return mask


def distance_to_boxes(points: np.ndarray, boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """(..., 2) (y, x) pixel points -> (...) Euclidean distance to the nearest pixel of any box.

    0 inside a box; inf when every box is empty (or none is given).
    """
    points = np.asarray(points, dtype=np.float64)
    best = np.full(points.shape[:-1], np.inf)
    for box in boxes:
        pixels = box_pixels(box, height, width)
        if pixels is None:
            continue
        y_lo, y_hi, x_lo, x_hi = pixels
        dy = np.maximum.reduce([y_lo - points[..., 0], np.zeros_like(points[..., 0]), points[..., 0] - y_hi])
        dx = np.maximum.reduce([x_lo - points[..., 1], np.zeros_like(points[..., 1]), points[..., 1] - x_hi])
        best = np.minimum(best, np.sqrt(dy * dy + dx * dx))
    return best


def boxes_by_concept(boxes: Sequence[tuple], concepts: Sequence[str]) -> list[list[tuple]]:
    """Ground-truth boxes ``(concept, x0, y0, x1, y1)`` -> K lists of pixel boxes.

    The concept is a name or an index into ``concepts``; boxes of concepts outside
    ``concepts`` are left out (a model trained on a subset of the findings).
    """
    grouped: list[list[tuple]] = [[] for _ in concepts]
    index = {name: k for k, name in enumerate(concepts)}
    for concept, *coords in boxes:
        k = concept if isinstance(concept, (int, np.integer)) else index.get(concept)
        if k is not None and 0 <= k < len(concepts):
            grouped[k].append(tuple(coords))
    return grouped


@dataclass
class Pointing:
    """Where each concept's saliency peaks, and how far that is from the truth.

    points:            (B, K, 2) (y, x) pixel of the peak (``concept_points``, or the
                       saliency's argmax pixel when none are given)
    distance:          (B, K) float, pixels to the nearest box of the concept;
                       NaN = not evaluated (no non-empty box, or no saliency map)
    shortcut_distance: (B, K) float, pixels to the image's shortcut box; NaN = no shortcut
    """

    points: np.ndarray
    distance: np.ndarray
    shortcut_distance: np.ndarray

    @property
    def evaluated(self) -> np.ndarray:
        """(B, K) bool: pairs (image, concept) that the Pointing Game scores."""
        return ~np.isnan(self.distance)

    def hits(self, tolerance: float = 0) -> np.ndarray:
        """(B, K) float: 1 hit, 0 miss, NaN not evaluated."""
        return pointing_hits(self.distance, tolerance)

    def on_shortcut(self, tolerance: float = 0) -> np.ndarray:
        """(B, K) float: 1 when an evaluated point lands on the shortcut box, else 0; NaN
        where the pair is not evaluated or the image has no shortcut."""
        landed = (self.shortcut_distance <= tolerance).astype(float)
        return np.where(self.evaluated & ~np.isnan(self.shortcut_distance), landed, np.nan)


def point_concepts(saliency: torch.Tensor, boxes: Sequence[Sequence[tuple]], concepts: Sequence[str],
                   shortcut_boxes: Sequence[Sequence[float] | None] | None = None, points=None) -> Pointing:
    """Pointing Game raw material for a batch.

    saliency: (B, K, H, W) concept saliency (``concept_saliency``);
    boxes: B lists of ``(concept, x0, y0, x1, y1)``; concepts: the K names of the K axis;
    shortcut_boxes: B entries, None or ``(x0, y0, x1, y1)``; points: (B, K, 2) (y, x)
    pixels to score (``concept_points``, the sub-cell peaks), by default the argmax pixel
    of ``saliency``.
    """
    B, K, H, W = saliency.shape
    if len(boxes) != B:
        raise ValueError(f"{len(boxes)} box lists for a batch of {B} images.")
    if len(concepts) != K:
        raise ValueError(f"{len(concepts)} concept names for saliency with K={K}.")
    points = (argmax_points(saliency) if points is None else torch.as_tensor(points)).cpu().numpy()
    defined = ~torch.isnan(saliency).any(dim=-1).any(dim=-1).cpu().numpy()
    distance = np.full((B, K), np.nan)
    shortcut = np.full((B, K), np.nan)
    for b in range(B):
        for k, concept_boxes in enumerate(boxes_by_concept(boxes[b], concepts)):
            d = distance_to_boxes(points[b, k], concept_boxes, H, W)
            if np.isfinite(d) and defined[b, k]:
                distance[b, k] = d
        box = shortcut_boxes[b] if shortcut_boxes is not None else None
        if box is not None:
            d = distance_to_boxes(points[b], [box], H, W)
            shortcut[b] = np.where(np.isfinite(d) & defined[b], d, np.nan)
    return Pointing(points=points, distance=distance, shortcut_distance=shortcut)


def pointing_hits(distance, tolerance: float = 0) -> np.ndarray:
    """(B, K) distances (NaN = not evaluated) -> (B, K) float 1 hit / 0 miss / NaN."""
    distance = _numpy(distance).astype(float)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}.")
    return np.where(np.isnan(distance), np.nan, (distance <= tolerance).astype(float))


def pointing_game(distance, concepts: Sequence[str], tolerance: float = 0, shortcut_distance=None) -> pd.DataFrame:
    """Pointing Game per concept and overall.

    distance, shortcut_distance: (B, K) as in ``Pointing``. Returns one row per concept and
    a last row "overall" (pooled over all evaluated pairs) with columns: evaluated, hits,
    pointing_game (hits / evaluated, NaN when nothing was evaluated), and, when
    ``shortcut_distance`` is given, on_shortcut (evaluated points on the shortcut box) and
    shortcut_rate (on_shortcut / evaluated pairs whose image has a shortcut).
    """
    hits = pointing_hits(distance, tolerance)
    evaluated = ~np.isnan(hits)
    table = pd.DataFrame(index=pd.Index(list(concepts) + ["overall"], name="concept"))
    n = np.append(evaluated.sum(0), evaluated.sum())
    h = np.append(np.nansum(hits, 0), np.nansum(hits))
    table["evaluated"] = n.astype(int)
    table["hits"] = h.astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["pointing_game"] = np.where(n > 0, h / np.maximum(n, 1), np.nan)
    if shortcut_distance is not None:
        shortcut_distance = _numpy(shortcut_distance).astype(float)
        with_shortcut = evaluated & ~np.isnan(shortcut_distance)
        landed = with_shortcut & (np.nan_to_num(shortcut_distance, nan=np.inf) <= tolerance)
        m = np.append(with_shortcut.sum(0), with_shortcut.sum())
        s = np.append(landed.sum(0), landed.sum())
        table["on_shortcut"] = s.astype(int)
        table["shortcut_rate"] = np.where(m > 0, s / np.maximum(m, 1), np.nan)
    return table


def energy_pointing(saliency: torch.Tensor, boxes: Sequence[Sequence[tuple]], concepts: Sequence[str]) -> np.ndarray:
    """(B, K) energy-based Pointing Game: share of the positive saliency inside the boxes.

    saliency: (B, K, H, W); boxes: B lists of ``(concept, x0, y0, x1, y1)``. NaN where the
    pair is not evaluated; 0 where the map has no positive energy.
    """
    B, K, H, W = saliency.shape
    positive = saliency.clamp(min=0)
    total = positive.sum(dim=(-2, -1), dtype=torch.float64).cpu().numpy()
    result = np.full((B, K), np.nan)
    for b in range(B):
        for k, concept_boxes in enumerate(boxes_by_concept(boxes[b], concepts)):
            mask = box_mask(concept_boxes, H, W)
            if not mask.any() or np.isnan(total[b, k]):
                continue
            inside = positive[b, k][torch.from_numpy(mask).to(positive.device)].sum(dtype=torch.float64).item()
            result[b, k] = inside / total[b, k] if total[b, k] > 0 else 0.0
    return result
