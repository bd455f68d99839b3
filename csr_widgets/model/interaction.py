"""What a user can say to the model: boxes (Eqs. 12-13) and rejected concepts.

How boxes reach the feature grid is a choice (``CSRConfig.box_footprint``, see
docs/decisions.md#boxes-act-on-cells): by default (ours) a box acts on every feature cell
it touches, i.e. every cell that owns a pixel the box overlaps (``FeatureGrid.touched``);
the paper's reading averages the pixel-level A over each cell's pixels ("area"). Both act
on the same cells (any overlap changes a cell's average), so ``footprint`` is the same in
both modes; only the strength on partly covered cells differs.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import BOX_FOOTPRINTS
from .grid import FeatureGrid


@dataclass(frozen=True)
class Box:
    """A box in image pixels, (x0, y0) inclusive, (x1, y1) exclusive.

    positive: "look here" (importance 1); negative: "not here" (importance 0).
    concept: None acts on every concept (the paper's box); a concept name acts on that
        concept only: "the nodule is here" / "this is not a nodule" (ours,
        docs/decisions.md#concept-boxes).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    positive: bool = True
    concept: str | None = None

    def __post_init__(self) -> None:
        coords = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
            raise ValueError(f"Box coordinates must be finite numbers, got {coords}.")
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(
                f"Box {coords} is inverted or has zero area: it needs x0 < x1 and y0 < y1 "
                "(x0, y0, x1, y1 with x1/y1 exclusive)."
            )
        if self.concept is not None and not (isinstance(self.concept, str) and self.concept):
            raise ValueError(f"Box.concept must be a concept name or None (all concepts), got {self.concept!r}.")

    def clipped(self, width: int, height: int) -> "Box | None":
        """This box cut to a width x height image, or None if nothing of it lies inside."""
        if self.x0 >= 0 and self.y0 >= 0 and self.x1 <= width and self.y1 <= height:
            return self
        x0, y0 = max(self.x0, 0), max(self.y0, 0)
        x1, y1 = min(self.x1, width), min(self.y1, height)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1, y1, self.positive, self.concept)

    def scaled(self, sx: float, sy: float) -> "Box":
        """The same box on an image resized by (sx, sy)."""
        return Box(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy, self.positive, self.concept)

    def to_dict(self) -> dict:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1, "positive": self.positive,
                "concept": self.concept}


@dataclass(frozen=True)
class Interaction:
    """One user's feedback on one image: boxes and rejected concepts.

    ``model.reason`` applies a single Interaction to every image of the batch, or takes a
    list with one Interaction per image. ``alpha`` overrides the config's alpha.
    """

    boxes: tuple[Box, ...] = ()
    rejected: frozenset[str] = field(default_factory=frozenset)
    alpha: float | None = None

    def __post_init__(self) -> None:
        boxes = (self.boxes,) if isinstance(self.boxes, Box) else tuple(self.boxes)
        for box in boxes:
            if not isinstance(box, Box):
                raise TypeError(f"Interaction.boxes must hold Box objects, got {type(box).__name__}.")
        rejected = {self.rejected} if isinstance(self.rejected, str) else self.rejected
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "rejected", frozenset(rejected))
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Interaction.alpha must lie in [0, 1], got {self.alpha}.")

    @property
    def is_empty(self) -> bool:
        return not self.boxes and not self.rejected

    @property
    def named_concepts(self) -> set[str]:
        """Every concept name the interaction uses (rejected, or named by a concept box)."""
        return set(self.rejected) | {b.concept for b in self.boxes if b.concept is not None}


def importance_map(boxes: Iterable[Box], height: int, width: int, alpha: float) -> np.ndarray:
    """A (H, W) float32 at image resolution (Eqs. 12-13).

    1 inside positive boxes, 0 inside negative boxes (negative wins where they overlap),
    alpha elsewhere when at least one positive box exists, 1 elsewhere otherwise. Box
    edges fall between pixels, so a pixel is covered by the fraction of it inside the box
    (a box from 0.5 to 2 covers half of pixel 0 and all of pixel 1).
    """
    return _importance(list(boxes), np.arange(height), np.arange(width), alpha)


def cell_importance(boxes: Iterable[Box], height: int, width: int, alpha: float, grid: FeatureGrid, cells: tuple[int, int]) -> np.ndarray:
    """A (h, w): ``grid.area_average(importance_map(...), cells)``, computed exactly but cheaply
    (the paper's reading of Eqs. 12-13 on a feature grid: ``box_footprint="area"``).

    Between consecutive box edges and cell borders every pixel of a row (or column) has the
    same coverage by every box, so A is evaluated once per such run of pixels and averaged
    with the runs' lengths: a handful of values instead of H x W, on every mouse event.
    """
    boxes = list(boxes)
    rows, row_weights = _runs([e for b in boxes for e in (b.y0, b.y1)], height, grid, cells[0])
    cols, col_weights = _runs([e for b in boxes for e in (b.x0, b.x1)], width, grid, cells[1])
    return row_weights @ _importance(boxes, rows, cols, alpha) @ col_weights.T


def footprint(box: Box, height: int, width: int, grid: FeatureGrid, cells: tuple[int, int]) -> tuple[slice, slice]:
    """(rows, cols) of the feature cells a box acts on: every cell owning a pixel it overlaps.

    box: in pixels of the height x width model input; cells: (h, w). Empty slices when the
    box lies outside the image.
    """
    return grid.touched(box.y0, box.y1, height, cells[0]), grid.touched(box.x0, box.x1, width, cells[1])


def touch_importance(boxes: Iterable[Box], height: int, width: int, alpha: float, grid: FeatureGrid,
                     cells: tuple[int, int]) -> np.ndarray:
    """A (h, w) on the feature grid, each box acting on every cell it touches (ours).

    1 on cells a positive box touches, 0 on cells a negative box touches (negative wins),
    alpha elsewhere when a positive box exists, 1 elsewhere otherwise: Eqs. 12-13 with
    the cell, not the pixel, as the unit. Area-averaging left a ~1-cell nodule box at
    A ~ 0.6 on the nodule's own peak cell (docs/decisions.md#boxes-act-on-cells).
    """
    boxes = list(boxes)
    positive = np.zeros(cells, bool)
    negative = np.zeros(cells, bool)
    for box in boxes:
        rows, cols = footprint(box, height, width, grid, cells)
        (positive if box.positive else negative)[rows, cols] = True
    importance = np.where(positive, 1.0, alpha).astype(np.float32) if any(b.positive for b in boxes) else np.ones(cells, np.float32)
    importance[negative] = 0.0
    return importance


def concept_importance(boxes: Sequence[Box], concepts: Sequence[str], height: int, width: int, alpha: float,
                       grid: FeatureGrid, cells: tuple[int, int], mode: str = "touch") -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """A for one image: the (h, w) map of the boxes that act on every concept, and
    {k: (h, w) A_k} for each concept k that a concept box names.

    A_k is Eqs. 12-13 over the boxes that act on k (every ``concept=None`` box and k's
    own), so a concept box on the nodule leaves the other concepts exactly as they are,
    and alpha applies to a concept only when a positive box acts on it.
    """
    if mode not in BOX_FOOTPRINTS:
        raise ValueError(f"box footprint must be one of {BOX_FOOTPRINTS}, got {mode!r}.")
    cell_map = touch_importance if mode == "touch" else cell_importance
    shared = [b for b in boxes if b.concept is None]
    named = {b.concept for b in boxes if b.concept is not None}
    per_concept = {}
    for name in named:
        k = list(concepts).index(name)
        per_concept[k] = cell_map(shared + [b for b in boxes if b.concept == name], height, width, alpha, grid, cells)
    return cell_map(shared, height, width, alpha, grid, cells), per_concept


def _runs(edges: list[float], pixels: int, grid: FeatureGrid, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """First pixel of each uniform run along one axis, and the (cells, runs) averaging weights."""
    cuts = {0, pixels, *grid.borders(pixels, cells)}
    cuts.update(min(max(f(e), 0), pixels) for e in edges for f in (math.floor, math.ceil))
    cuts = np.array(sorted(cuts))
    starts, lengths = cuts[:-1], np.diff(cuts)
    return starts, grid.averaging_matrix(starts, lengths, pixels, cells)


def _importance(boxes: list[Box], rows: np.ndarray, cols: np.ndarray, alpha: float) -> np.ndarray:
    """A on the pixels rows x cols (pixel indices), as in Eqs. 12-13."""
    positive = negative = None  # max coverage by positive / negative boxes, where any
    for box in boxes:
        covered = np.outer(_coverage(box.y0, box.y1, rows), _coverage(box.x0, box.x1, cols))
        if box.positive:
            positive = covered if positive is None else np.maximum(positive, covered)
        else:
            negative = covered if negative is None else np.maximum(negative, covered)
    importance = np.ones((len(rows), len(cols)), np.float32) if positive is None else alpha + (1 - alpha) * positive
    return importance if negative is None else importance * (1 - negative)


def _coverage(lo: float, hi: float, pixels: np.ndarray) -> np.ndarray:
    """Fraction of each pixel (the unit interval [i, i+1)) inside [lo, hi)."""
    overlap = np.minimum(pixels + 1, hi) - np.maximum(pixels, lo)  # at most 1 already
    return np.maximum(overlap, 0, dtype=np.float32, casting="unsafe")
