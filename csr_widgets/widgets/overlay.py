"""What the box layer shows, as plain data: each box's outline, its label, and the feature
cells it acts on. No widgets here (layers.py draws these marks; render.py paints them
into static snapshots).

A box acts on every feature cell it touches (docs/decisions.md#boxes-act-on-cells), so a
small box over a cell border changes the model on two or four whole cells. The explorer
shades those cells faintly under each box: what the user sees is what the model uses.
The cells come from the model's own rule (``interaction.footprint`` on the box as the
model receives it) and are carried back to the canvas through the grid's cell spans.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model import Box, FeatureGrid
from ..model.interaction import footprint
from .geometry import ViewGeometry

Rect = tuple[float, float, float, float]  # (x0, y0, x1, y1) canvas pixels


@dataclass(frozen=True)
class Footprint:
    """The cells a box acts on, in canvas pixels: their outer rectangle and the cell
    borders inside it (x positions of vertical borders, y positions of horizontal ones)."""

    rect: Rect
    inner_x: tuple[float, ...]
    inner_y: tuple[float, ...]


@dataclass(frozen=True)
class BoxMark:
    rect: Rect  # the box outline
    positive: bool
    label: str  # what the box says and what it acts on: "+ all concepts", "− nodule"
    footprint: Footprint | None  # None when the box touches no cell (outside the image)
    selected: bool = False
    preview: bool = False  # being drawn or moved


def box_label(box: Box) -> str:
    return f"{'+' if box.positive else '−'} {box.concept or 'all concepts'}"


def box_footprint(box: Box, geometry: ViewGeometry, grid: FeatureGrid, cells: tuple[int, int]) -> Footprint | None:
    """The cells ``box`` (image pixels) acts on, as the model applies it, in canvas pixels."""
    Hm, Wm = geometry.model_size
    rows, cols = footprint(geometry.box_to_model(box), Hm, Wm, grid, cells)
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return None
    ch, cw = geometry.canvas_size
    ys = _borders(grid, rows, Hm, cells[0], ch / Hm)
    xs = _borders(grid, cols, Wm, cells[1], cw / Wm)
    return Footprint((xs[0], ys[0], xs[-1], ys[-1]), xs[1:-1], ys[1:-1])


def _borders(grid: FeatureGrid, run: slice, pixels: int, cells: int, scale: float) -> tuple[float, ...]:
    """Canvas positions of the first pixel of each cell in ``run`` and the end of the last."""
    starts = [grid.span(c, pixels, cells)[0] for c in range(run.start, run.stop)]
    return tuple(p * scale for p in starts + [grid.span(run.stop - 1, pixels, cells)[1]])


def box_marks(boxes, geometry: ViewGeometry, grid: FeatureGrid, cells: tuple[int, int],
              selected: int | None = None, preview: int | None = None, skip: int | None = None) -> list[BoxMark]:
    """A mark per box (in order, so later boxes draw on top); ``skip`` leaves one out."""
    return [
        BoxMark(geometry.box_to_canvas(box), box.positive, box_label(box), box_footprint(box, geometry, grid, cells),
                selected=index == selected, preview=index == preview)
        for index, box in enumerate(boxes)
        if index != skip
    ]


def label_position(rect: Rect, text: str, canvas_size: tuple[int, int], height: float = 18.0, char_width: float = 7.5) -> Rect:
    """Where a box's label goes (its background rectangle): above the box when there is
    room, else below it, else just inside under its top edge; never over the outline's
    top edge, and moved left so that it stays on the canvas. ``char_width`` estimates the
    bold 13-px font (the kernel cannot measure text)."""
    x0, y0, _, y1 = rect
    H, W = canvas_size
    width = 8 + char_width * len(text)
    if y0 >= height + 1:
        top = y0 - height - 1
    elif y1 + height + 1 <= H:
        top = y1 + 1
    else:
        top = y0 + 2
    left = max(0.0, min(x0, W - width))
    return left, top, left + width, top + height
