"""ViewGeometry: the three coordinate systems of an explorer and the exact maps between them.

- **image**: pixels of the image as the user gave it, W x H. Boxes live here
  (docs/architecture.md#coordinates): (x0, y0, x1, y1), x1/y1 exclusive, edges between
  pixels (pixel i spans [i, i + 1)).
- **canvas**: pixels of the on-screen canvas, a uniform scaling of the image (same aspect
  ratio), so a 3000 x 2400 radiograph is not sent to the browser at full size. ipycanvas
  reports mouse positions in these units (it rescales CSS pixels to the canvas size).
- **model**: pixels of the model input. Decision (ours, docs/decisions.md#model-input-size):
  the image is resized to ``config.image_size`` x ``config.image_size`` (aspect ratio not
  kept) because that is what every training pipeline in this package feeds the model; a
  different ``input_size`` can be asked for (e.g. keep the aspect ratio with a CNN
  backbone).

All three are axis-aligned scalings of each other with the origin at the top-left edge, so
a box maps exactly by scaling its edges: image -> model is (x * Wm / W, y * Hm / H),
which is what resampling with ``align_corners=False`` (torch, PIL) assumes. The model's
FeatureGrid then carries model pixels to feature cells; nothing here knows about cells.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..model import Box


@dataclass(frozen=True)
class ViewGeometry:
    image_size: tuple[int, int]  # (H, W) of the user's image
    canvas_size: tuple[int, int]  # (H, W) of the displayed canvas
    model_size: tuple[int, int]  # (H, W) of the model input

    @classmethod
    def fit(cls, image_size: tuple[int, int], model_size: tuple[int, int], display_size: int) -> "ViewGeometry":
        """Canvas whose longer side is ``display_size`` pixels, at the image's aspect ratio."""
        H, W = (int(v) for v in image_size)
        if H < 1 or W < 1:
            raise ValueError(f"Image of {W}x{H} pixels is empty.")
        if not isinstance(display_size, int) or display_size < 16:
            raise ValueError(f"display_size must be an integer >= 16 (pixels), got {display_size!r}.")
        scale = display_size / max(H, W)
        canvas = (max(1, round(H * scale)), max(1, round(W * scale)))
        return cls((H, W), canvas, tuple(int(v) for v in model_size))

    # Every map multiplies first and divides last (x * target / source): with integer
    # sizes that is one rounding, so a box on the image's edge lands exactly on the edge.
    @staticmethod
    def _map(x: float, y: float, source: tuple[int, int], target: tuple[int, int]) -> tuple[float, float]:
        return x * target[1] / source[1], y * target[0] / source[0]

    def canvas_to_image(self, x: float, y: float) -> tuple[float, float]:
        return self._map(x, y, self.canvas_size, self.image_size)

    def image_to_canvas(self, x: float, y: float) -> tuple[float, float]:
        return self._map(x, y, self.image_size, self.canvas_size)

    def box_to_model(self, box: Box) -> Box:
        """An image-pixel box on the model input (the mapping the model reasons with)."""
        (x0, y0), (x1, y1) = (self._map(x, y, self.image_size, self.model_size) for x, y in ((box.x0, box.y0), (box.x1, box.y1)))
        return replace(box, x0=_snap(x0), y0=_snap(y0), x1=_snap(x1), y1=_snap(y1))

    def box_from_model(self, box: Box) -> Box:
        """A model-input box in image pixels (exact: ``box_to_model`` gives it back)."""
        (x0, y0), (x1, y1) = (self._map(x, y, self.model_size, self.image_size) for x, y in ((box.x0, box.y0), (box.x1, box.y1)))
        return replace(box, x0=_snap(x0), y0=_snap(y0), x1=_snap(x1), y1=_snap(y1))

    def box_to_canvas(self, box: Box) -> tuple[float, float, float, float]:
        (x0, y0), (x1, y1) = self.image_to_canvas(box.x0, box.y0), self.image_to_canvas(box.x1, box.y1)
        return x0, y0, x1, y1

    def box_from_canvas(self, x0: float, y0: float, x1: float, y1: float, positive: bool, concept: str | None = None) -> Box | None:
        """The image-pixel box spanned by two canvas points (any order), snapped outwards to
        whole image pixels and clipped to the image; None when nothing of it is inside."""
        (ax, ay), (bx, by) = self.canvas_to_image(x0, y0), self.canvas_to_image(x1, y1)
        H, W = self.image_size
        left, right = max(0, _floor(min(ax, bx))), min(W, _ceil(max(ax, bx)))
        top, bottom = max(0, _floor(min(ay, by))), min(H, _ceil(max(ay, by)))
        if right <= left or bottom <= top:
            return None
        return Box(left, top, right, bottom, positive, concept)


def _snap(v: float) -> float:
    """A value within float rounding of a whole pixel edge is that edge: a box mapped
    there and back must touch the same feature cells (a cell border at 12 read as
    12.000000000000002 would make the box touch the next cell too)."""
    nearest = round(v)
    return float(nearest) if abs(v - nearest) < 1e-9 else v


def _floor(v: float) -> int:
    # A tolerance so that a canvas point exactly on a pixel edge is not pushed one pixel
    # outwards by float rounding in the scale factors.
    return math.floor(v + 1e-6)


def _ceil(v: float) -> int:
    return math.ceil(v - 1e-6)
