"""Pointer and keys: what a mouse drag or a key press on the image means. No widgets here.

``KEYMAP`` is the one definition of the explorer's keys: the key handler looks keys up in
it, and the tooltips, the hint line under the image and the docs name keys from it (a test
reads README.md, the notebooks and the demo text and fails on a key it does not bind).

A drag is a ``Drag``: where it started, where the pointer is now, and what it does (draw a
box or move one). ``drag_boxes`` turns it into the boxes the model should reason with at
this instant, so the live preview while dragging and the committed change on mouse-up
come from the same function. ``FrameCoalescer`` keeps a flood of pointer events to one
update per frame: the latest position wins (docs/decisions.md#live-drag).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..model import Box
from .geometry import ViewGeometry

MIN_DRAG = 3.0  # canvas pixels: a shorter drag is a click (select), not a box


@dataclass(frozen=True)
class Binding:
    keys: tuple[str, ...]  # KeyboardEvent.key values, modifiers written "Ctrl+" / "Shift+" (see chord)
    action: str  # the explorer's action (see CSRExplorer.run_action)
    short: str  # a few words, for the hint line
    does: str  # what it does, for tooltips

    @property
    def label(self) -> str:
        """How docs and tooltips write the key: the first of ``keys``, Escape as Esc."""
        return {"Escape": "Esc"}.get(self.keys[0], self.keys[0])


KEYMAP: tuple[Binding, ...] = (
    Binding(("p",), "tool:positive", "+ box", "draw boxes where the model should look"),
    Binding(("n",), "tool:negative", "\u2212 box", "draw boxes where the model must not look"),
    Binding(("s",), "tool:select", "select/move", "click a box to select it, drag it to move it"),
    Binding(("a",), "target:all", "boxes for all concepts", "new boxes act on all concepts"),
    Binding(("c",), "target:shown", "for the heatmap's concept", "new boxes act on the heatmap's concept only"),
    Binding(("Delete", "Backspace"), "delete", "delete box", "delete the selected box"),
    Binding(("z", "Ctrl+Z"), "undo", "undo", "undo the last change"),
    Binding(("y", "Shift+Z", "Ctrl+Y", "Ctrl+Shift+Z"), "redo", "redo", "redo"),
    Binding(("Escape",), "cancel", "cancel", "cancel a drag, deselect"),
)
_ACTIONS = {key: binding.action for binding in KEYMAP for key in binding.keys}


def chord(key: str, shift: bool = False, ctrl: bool = False, meta: bool = False) -> str:
    """A key event as KEYMAP writes it: letters lower case ("z"), "Shift+Z" with shift,
    "Ctrl+" before either with Ctrl or Cmd; other keys as the browser names them."""
    if len(key) == 1 and key.isalpha():
        key = f"Shift+{key.upper()}" if shift else key.lower()
        if ctrl or meta:
            key = "Ctrl+" + (key.upper() if not shift else key)
    elif ctrl or meta:
        key = "Ctrl+" + key
    return key


def action_for(key: str, shift: bool = False, ctrl: bool = False, meta: bool = False) -> str | None:
    """The action a key event triggers, None for a key the explorer does not bind."""
    return _ACTIONS.get(chord(key, shift, ctrl, meta))


def binding(action: str) -> Binding:
    return next(b for b in KEYMAP if b.action == action)


def tooltip(action: str, text: str | None = None) -> str:
    """A control's tooltip naming its key: "undo (z)"."""
    bound = binding(action)
    return f"{text or bound.does} ({bound.label})"


def hint_line(html: bool = False) -> str:
    """The one-line key reminder under the image (plain text, or HTML with <kbd> keys)."""
    key = "<kbd>{}</kbd>".format if html else "{}".format
    return "Keys: " + " · ".join(f"{key(b.label)} {b.short}" for b in KEYMAP)


# ----------------------------------------------------------------------------- drags
@dataclass(frozen=True)
class Drag:
    kind: str  # "draw" a new box, or "move" the box at ``index``
    start: tuple[float, float]  # canvas pixels
    current: tuple[float, float]
    index: int | None = None

    def to(self, x: float, y: float) -> "Drag":
        return replace(self, current=(float(x), float(y)))

    @property
    def is_click(self) -> bool:
        """Too short to be a box: a click (selects what is under it)."""
        (x0, y0), (x1, y1) = self.start, self.current
        return abs(x1 - x0) < MIN_DRAG or abs(y1 - y0) < MIN_DRAG


def box_at(boxes: tuple[Box, ...], geometry: ViewGeometry, x: float, y: float) -> int | None:
    """Index of the topmost box containing a canvas point, or None."""
    for index in range(len(boxes) - 1, -1, -1):
        x0, y0, x1, y1 = geometry.box_to_canvas(boxes[index])
        if x0 <= x <= x1 and y0 <= y <= y1:
            return index
    return None


def moved_box(box: Box, drag: Drag, geometry: ViewGeometry) -> Box:
    """``box`` shifted by the drag, in whole image pixels, kept inside the image."""
    (ax, ay), (bx, by) = geometry.canvas_to_image(*drag.start), geometry.canvas_to_image(*drag.current)
    H, W = geometry.image_size
    dx = min(max(round(bx - ax), -box.x0), W - box.x1)
    dy = min(max(round(by - ay), -box.y0), H - box.y1)
    return replace(box, x0=box.x0 + dx, y0=box.y0 + dy, x1=box.x1 + dx, y1=box.y1 + dy)


def drawn_box(drag: Drag, geometry: ViewGeometry, positive: bool, concept: str | None) -> Box | None:
    """The box a "draw" drag spans (image pixels), None for a click or nothing inside."""
    if drag.is_click:
        return None
    (x0, y0), (x1, y1) = drag.start, drag.current
    return geometry.box_from_canvas(x0, y0, x1, y1, positive=positive, concept=concept)


def drag_boxes(boxes: tuple[Box, ...], drag: Drag, geometry: ViewGeometry, positive: bool,
               concept: str | None) -> tuple[tuple[Box, ...], int | None]:
    """The boxes with the drag applied as if the mouse were released now, and the index
    of the dragged box in them (None when the drag makes no box: a click)."""
    if drag.kind == "move":
        if max(abs(a - b) for a, b in zip(drag.start, drag.current)) < 1.0:
            return boxes, drag.index
        moved = list(boxes)
        moved[drag.index] = moved_box(boxes[drag.index], drag, geometry)
        return tuple(moved), drag.index
    box = drawn_box(drag, geometry, positive, concept)
    return (boxes, None) if box is None else (boxes + (box,), len(boxes))


# ----------------------------------------------------------------------------- frames
class FrameCoalescer:
    """At most one call of ``frame`` per ``interval`` seconds, the latest request winning.

    ``request()`` runs ``frame`` now when the last frame is ``interval`` old, else
    schedules one trailing frame on the running event loop (the kernel's), so the final
    position of a burst is always drawn. Without a running loop (plain Python, tests) the
    trailing frame is left to the next request or to ``flush``.
    """

    def __init__(self, frame: Callable[[], None], interval: float, clock: Callable[[], float] = time.perf_counter):
        self.frame = frame
        self.interval = float(interval)
        self.clock = clock
        self.last = -float("inf")
        self.pending: asyncio.TimerHandle | None = None

    def request(self) -> None:
        if self.clock() - self.last >= self.interval:
            self._run()
        elif self.pending is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self.pending = loop.call_later(max(0.0, self.interval - (self.clock() - self.last)), self._trailing)

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def _trailing(self) -> None:
        self.pending = None
        self._run()

    def _run(self) -> None:
        self.cancel()
        self.last = self.clock()
        self.frame()
