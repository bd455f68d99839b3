"""The explorer's drawing surface on ipycanvas: the only module that touches ipycanvas's
private names (its canvas manager, its command table). If ipycanvas changes, this is the
one file to mend (pyproject pins ipycanvas 0.14.x).

Four stacked layers on one MultiCanvas (bottom to top): the image, the heatmap, the
committed boxes with their cells, and the box being drawn or moved. The heatmap travels
as a small RGBA map to a hidden canvas and the heatmap layer scales it with
``draw_image``, so moving the opacity slider re-sends nothing
(docs/decisions.md#widget-responsiveness).

The canvas keeps its pixel size (the model's boxes are mapped in canvas pixels) while
CSS scales it to the space there is: ipycanvas reports mouse positions in canvas pixels
whatever the displayed size, so coordinates stay exact.
"""
from __future__ import annotations

from contextlib import contextmanager

import ipywidgets as widgets
import numpy as np
from ipycanvas import Canvas, MultiCanvas
from ipycanvas.canvas import COMMANDS

from . import render
from .overlay import BoxMark, Rect, label_position

IMAGE, HEATMAP, BOXES, INTERACTION = range(4)
LABEL_FONT = "bold 13px sans-serif"


def put_rgba(canvas: Canvas, rgba: np.ndarray, x: int = 0, y: int = 0, compress_level: int = 1) -> None:
    """``canvas.put_image_data`` for RGBA uint8, with our own (faster) PNG encoding.

    ipycanvas encodes with PIL's default level; the browser decodes any PNG the same way.
    """
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"put_rgba sends RGBA uint8 (H, W, 4) only (RGB would be sent as JPEG), got {rgba.dtype} {rgba.shape}.")
    png = render.encode_png(rgba, compress_level)
    canvas._canvas_manager.send_draw_command(canvas, COMMANDS["putImageData"], [x, y], [png])


class CanvasLayers:
    """The stacked layers of one explorer, and the drawing it does on them.

    canvas_size: (H, W) canvas pixels; heat_size: (h, w) of the heatmap sent (the lattice).
    """

    def __init__(self, canvas_size: tuple[int, int], heat_size: tuple[int, int]):
        H, W = canvas_size
        self.size = (H, W)
        # width 100% up to the canvas's own width, height from the aspect ratio: the canvas
        # shrinks with a narrow notebook and never grows blurry beyond its pixels
        self.canvas = MultiCanvas(4, width=W, height=H, layout=widgets.Layout(width="100%", max_width=f"{W}px", height="auto"))
        self.canvas.add_class("csr-canvas")
        lh, lw = heat_size
        self.heat_source = Canvas(width=lw, height=lh, layout=widgets.Layout(display="none"))

    def __getitem__(self, layer: int) -> Canvas:
        return self.canvas[layer]

    @contextmanager
    def batch(self):
        """Send the commands drawn inside as one message, like ``hold_canvas``, but
        re-entrant (a nested hold_canvas flushes early: the browser would show half-drawn
        frames) and safe on errors (hold_canvas leaves caching on after an exception, and
        every later drawing would then wait forever)."""
        manager = self.heat_source._canvas_manager
        if manager._caching:  # inside an outer batch (ours or the user's hold_canvas)
            yield
            return
        manager._caching = True
        try:
            yield
        finally:
            manager.flush()  # sends what was drawn, even after an error, so the view stays whole
            manager._caching = False

    def flush(self) -> None:
        """Send what is batched now (even inside an outer batch)."""
        self.heat_source._canvas_manager.flush()

    @property
    def batching(self) -> bool:
        return bool(self.heat_source._canvas_manager._caching)

    def forget_client(self) -> None:
        """A new page (reload, Voila) has empty canvases. ipycanvas 0.14.x remembers which
        canvas its manager last drew on and skips the "switch canvas" command when it is
        the same; the new page's manager has no current canvas, so reset that memory."""
        self.canvas[INTERACTION]._canvas_manager._current_canvas = None

    # ------------------------------------------------------------------ drawing
    def show_image(self, rgba: np.ndarray) -> None:
        with self.batch():
            self.canvas[IMAGE].clear()
            put_rgba(self.canvas[IMAGE], rgba)

    def send_heatmap(self, rgba: np.ndarray | None) -> None:
        """Put a new heatmap on the hidden source canvas (None: no heatmap)."""
        if rgba is not None:
            # putImageData draws the PNG over what is there (drawImage), and a
            # semi-transparent map over the previous one would add up: clear first.
            self.heat_source.clear()
            put_rgba(self.heat_source, rgba)

    def show_heatmap(self, visible: bool, opacity: float, smooth: bool) -> None:
        """Scale the source heatmap over the whole heatmap layer."""
        layer = self.canvas[HEATMAP]
        H, W = self.size
        with self.batch():
            layer.clear()
            if visible:
                layer.global_alpha = opacity
                layer.image_smoothing_enabled = bool(smooth)
                layer.draw_image(self.heat_source, 0, 0, W, H)

    def draw_marks(self, layer: int, marks: list[BoxMark], question: Rect | None = None) -> None:
        """Boxes with their cells and labels, on a cleared layer: cells first, so that no
        shading covers an outline or a label; then the cell a "check next" question asks
        about (dotted, black on yellow: unlike any box)."""
        canvas = self.canvas[layer]
        with self.batch():
            canvas.clear()
            for mark in marks:
                self._shade_cells(canvas, mark)
            for mark in marks:
                self._stroke(canvas, mark)
            if question is not None:
                x0, y0, x1, y1 = question
                canvas.line_width = 2
                for color, dash in ((render.SELECTED_COLOR, []), ("#000000", [3, 3])):
                    canvas.stroke_style = color
                    canvas.set_line_dash(dash)
                    canvas.stroke_rect(x0, y0, x1 - x0, y1 - y0)
                self._label(canvas, question, "? check here", "#000000", render.SELECTED_COLOR)

    def clear(self, layer: int) -> None:
        self.canvas[layer].clear()

    @staticmethod
    def _shade_cells(canvas: Canvas, mark: BoxMark) -> None:
        if mark.footprint is None:
            return
        color = render.POSITIVE_RGB if mark.positive else render.NEGATIVE_RGB
        x0, y0, x1, y1 = mark.footprint.rect
        canvas.set_line_dash([])
        canvas.fill_style = f"rgba({color[0]}, {color[1]}, {color[2]}, {render.CELL_FILL_ALPHA})"
        canvas.fill_rect(x0, y0, x1 - x0, y1 - y0)
        canvas.stroke_style = f"rgba({color[0]}, {color[1]}, {color[2]}, {render.CELL_EDGE_ALPHA})"
        canvas.line_width = 1
        canvas.stroke_rect(x0, y0, x1 - x0, y1 - y0)
        for x in mark.footprint.inner_x:
            canvas.stroke_line(x, y0, x, y1)
        for y in mark.footprint.inner_y:
            canvas.stroke_line(x0, y, x1, y)

    def _stroke(self, canvas: Canvas, mark: BoxMark) -> None:
        x0, y0, x1, y1 = mark.rect
        color = render.POSITIVE_COLOR if mark.positive else render.NEGATIVE_COLOR
        if mark.selected:  # a light halo under the box marks the selection
            canvas.line_width = 6
            canvas.stroke_style = render.SELECTED_COLOR
            canvas.set_line_dash([])
            canvas.stroke_rect(x0, y0, x1 - x0, y1 - y0)
        canvas.line_width = 2
        canvas.stroke_style = color
        # Negative boxes are dashed, so the kind never relies on colour alone.
        canvas.set_line_dash([4, 3] if mark.preview else ([] if mark.positive else [8, 4]))
        canvas.stroke_rect(x0, y0, x1 - x0, y1 - y0)
        self._label(canvas, mark.rect, mark.label, color)

    def _label(self, canvas: Canvas, rect: Rect, text: str, color: str, background: str = "rgba(255, 255, 255, 0.85)") -> None:
        """Text on a light band above the box (inside it at the top edge of the canvas)."""
        lx0, ly0, lx1, ly1 = label_position(rect, text, self.size)
        canvas.set_line_dash([])
        canvas.fill_style = background
        canvas.fill_rect(lx0, ly0, lx1 - lx0, ly1 - ly0)
        canvas.fill_style = color
        canvas.font = LABEL_FONT
        canvas.text_baseline = "middle"
        canvas.fill_text(text, lx0 + 4, (ly0 + ly1) / 2)
