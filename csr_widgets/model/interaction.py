"""What a user can say to the model: boxes (Eqs. 12-13) and rejected concepts."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .grid import FeatureGrid


@dataclass(frozen=True)
class Box:
    """A box in image pixels, (x0, y0) inclusive, (x1, y1) exclusive.

    positive: "look here" (importance 1); negative: "not here" (importance 0).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    positive: bool = True

    def __post_init__(self) -> None:
        coords = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in coords):
            raise ValueError(f"Box coordinates must be finite numbers, got {coords}.")
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(
                f"Box {coords} is inverted or has zero area: it needs x0 < x1 and y0 < y1 "
                "(x0, y0, x1, y1 with x1/y1 exclusive)."
            )

    def clipped(self, width: int, height: int) -> "Box | None":
        """This box cut to a width x height image, or None if nothing of it lies inside."""
        x0, y0 = max(self.x0, 0), max(self.y0, 0)
        x1, y1 = min(self.x1, width), min(self.y1, height)
        if x1 <= x0 or y1 <= y0:
            return None
        return Box(x0, y0, x1, y1, self.positive)

    def scaled(self, sx: float, sy: float) -> "Box":
        """The same box on an image resized by (sx, sy)."""
        return Box(self.x0 * sx, self.y0 * sy, self.x1 * sx, self.y1 * sy, self.positive)

    def to_dict(self) -> dict:
        return {"x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1, "positive": self.positive}


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


def importance_map(boxes: Iterable[Box], height: int, width: int, alpha: float) -> np.ndarray:
    """A (H, W) float32 at image resolution (Eqs. 12-13).

    1 inside positive boxes, 0 inside negative boxes (negative wins where they overlap),
    alpha elsewhere when at least one positive box exists, 1 elsewhere otherwise. Box
    edges fall between pixels, so a pixel is covered by the fraction of it inside the box
    (a box from 0.5 to 2 covers half of pixel 0 and all of pixel 1).
    """
    return _importance(list(boxes), np.arange(height), np.arange(width), alpha)


def cell_importance(boxes: Iterable[Box], height: int, width: int, alpha: float, grid: FeatureGrid, cells: tuple[int, int]) -> np.ndarray:
    """A (h, w): ``grid.area_average(importance_map(...), cells)``, computed exactly but cheaply.

    Between consecutive box edges and cell borders every pixel of a row (or column) has the
    same coverage by every box, so A is evaluated once per such run of pixels and averaged
    with the runs' lengths: a handful of values instead of H x W, on every mouse event.
    """
    boxes = list(boxes)
    rows, row_weights = _runs([e for b in boxes for e in (b.y0, b.y1)], height, grid, cells[0])
    cols, col_weights = _runs([e for b in boxes for e in (b.x0, b.x1)], width, grid, cells[1])
    return row_weights @ _importance(boxes, rows, cols, alpha) @ col_weights.T


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
