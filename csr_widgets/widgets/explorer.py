"""CSRExplorer: talk to a CSR model about one image, live (docs/method.md#interaction).

The image is encoded once (``model.encode``: backbone, concept head, projector, similarity
maps); every change the user makes (a box drawn, moved or deleted, a concept rejected, an
undo) re-runs only ``model.reason``, which takes about a millisecond. Everything the user
controls is plain data: ``ex.boxes`` (list of Box, image pixels), ``ex.rejected`` (set of
concept names), ``ex.alpha``; setting them from Python is the same as using the mouse.

Responsiveness rules (docs/decisions.md#widget-responsiveness):
- mouse moves only move the rubber band, at most once per ``frame_interval`` (latest
  position wins, a trailing frame is scheduled on the kernel's event loop), so a flood of
  events never queues work; the model runs on mouse-up;
- canvas commands of one update go out as one message (as with ``hold_canvas``);
- nothing is recomputed or re-sent when nothing changed (results are cached by state,
  the heatmap by what it shows);
- the heatmap goes to the browser as the small model-input-sized RGBA map on a hidden
  canvas, which the overlay layer scales with ``draw_image`` (opacity is the layer's
  global alpha, so moving the opacity slider re-sends nothing);
- ``model.reason`` and the rendering run with one torch thread: for these tiny operations
  a thread pool only adds overhead (threaded BLAS measured 5x slower); the previous thread
  count is restored afterwards, so the rest of the kernel is unaffected.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import ipywidgets as widgets
import numpy as np
import torch
import traitlets
from ipycanvas import Canvas, MultiCanvas
from ipycanvas.canvas import COMMANDS

from .._inference import evaluating, single_threaded
from ..model import Box, CSRModel, Encoding, Reasoning
from . import charts, render
from .geometry import ViewGeometry
from .image import display_rgba, model_input, read_image
from .session import ExplorerState, History, as_boxes, parse_session, session_dict

MODES = ("positive", "negative", "select")
MIN_DRAG = 3.0  # canvas pixels: a shorter drag is a click (select), not a box
RESULT_CACHE = 16  # recent results kept, so undo/redo answer without recomputing
IMAGE, HEATMAP, BOXES, INTERACTION = range(4)  # MultiCanvas layers, bottom to top


def put_rgba(canvas: Canvas, rgba: np.ndarray, x: int = 0, y: int = 0, compress_level: int = 1) -> None:
    """``canvas.put_image_data`` for RGBA uint8, with our own (faster) PNG encoding.

    ipycanvas encodes with PIL's default level; the browser decodes any PNG the same way.
    """
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[-1] != 4:
        raise ValueError(f"put_rgba sends RGBA uint8 (H, W, 4) only (RGB would be sent as JPEG), got {rgba.dtype} {rgba.shape}.")
    png = render.encode_png(rgba, compress_level)
    canvas._canvas_manager.send_draw_command(canvas, COMMANDS["putImageData"], [x, y], [png])


@dataclass
class _Drag:
    kind: str  # "draw" or "move"
    start: tuple[float, float]  # canvas pixels
    current: tuple[float, float]
    index: int | None = None  # the box being moved


class CSRExplorer(widgets.VBox):
    """Interactive CSR reasoning on one image.

    Parameters
    ----------
    model: a CSRModel (any device; the explorer computes where the model lives).
    image: torch tensor (C, H, W), numpy array, PIL image, or a path (PNG, JPEG, DICOM), any
        size and aspect ratio, greyscale or RGB, 8 or 16 bit.
    atlas: optional prototype atlas (see atlas_explorer.py) to show "this looks like that".
    display_size: longer side of the canvas in screen pixels (the image keeps its aspect).
    input_size: model input (H, W) or side; default the model's ``config.image_size``
        square, what it was trained on. Boxes are mapped exactly either way (geometry.py).
    concept / prototype: the heatmap shown: a concept name (None: no heatmap; "auto": the
        concept that contributes most to the prediction) and a prototype index (None: the
        max over the concept's M prototypes).
    smooth: bilinear between feature-cell centres (True) or the cells as blocks (False).
    colormap, opacity, fade: heatmap colours (colour-blind-safe default), layer opacity,
        and whether low similarity fades to transparent.
    boxes, rejected, alpha: the initial interaction.
    history_limit: undo depth. frame_interval: seconds between rubber-band redraws.
    """

    result = traitlets.Any(read_only=True, help="the current Reasoning (observe it)")
    busy = traitlets.Bool(False, read_only=True, help="True while the model is computing")

    def __init__(
        self,
        model: CSRModel,
        image,
        *,
        atlas=None,
        display_size: int = 512,
        input_size: int | tuple[int, int] | None = None,
        concept: str | None = "auto",
        prototype: int | None = None,
        smooth: bool = True,
        colormap: str = render.DEFAULT_COLORMAP,
        opacity: float = 0.6,
        fade: bool = True,
        boxes=(),
        rejected=(),
        alpha: float | None = None,
        history_limit: int = 200,
        frame_interval: float = 1 / 30,
    ):
        super().__init__()
        if not all(hasattr(model, name) for name in ("encode", "reason", "config", "grid")):
            raise TypeError(f"CSRExplorer needs a CSRModel, got {type(model).__name__}.")
        self.model = model
        self.atlas = atlas
        self.frame_interval = float(frame_interval)
        image = read_image(image)
        side = model.config.image_size
        if input_size is None:
            input_size = (side, side)
        elif isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.geometry = ViewGeometry.fit(tuple(image.shape[-2:]), tuple(input_size), display_size)
        self._image = image

        # Encode once: everything that does not depend on the user.
        with evaluating(model):
            self.encoding: Encoding = model.encode(model_input(image, model.config.in_channels, input_size).to(model.device))
            self.baseline: Reasoning = model.reason(self.encoding)
        self._lattice_grid, self._lattice_size = render.lattice(model.grid, self.geometry.model_size)

        initial = ExplorerState(self._checked_boxes(boxes), self._checked_rejected(rejected), self._checked_alpha(alpha))
        self._history = History(initial, history_limit)
        self._results: OrderedDict = OrderedDict()
        self._computed: ExplorerState | None = None
        self._selected: int | None = None
        self._drag: _Drag | None = None
        self._last_frame = 0.0
        self._frame_pending = None
        self._heat_key = None
        self._boxes_key = None
        self._syncing = False  # True while controls are set from the state (no commits)
        self._crop_cache: dict = {}
        self.heatmap: np.ndarray | None = None  # the RGBA map last sent to the browser
        self._result_serial = 0
        self.reason_count = 0  # model.reason calls made by this explorer (for tests/benchmarks)

        if concept == "auto" and "auto" not in model.concepts:
            concept = self._default_concept()
        self._build(concept, prototype, smooth, colormap, opacity, fade)
        self._compute()
        self.redraw()

    # ------------------------------------------------------------------ public state
    @property
    def state(self) -> ExplorerState:
        return self._history.current

    @property
    def boxes(self) -> list[Box]:
        """The boxes, in image pixels (a copy: assign a new list to change them)."""
        return list(self.state.boxes)

    @boxes.setter
    def boxes(self, boxes) -> None:
        self._commit(replace(self.state, boxes=self._checked_boxes(boxes)))

    @property
    def rejected(self) -> set[str]:
        """Names of the rejected concepts (a copy: assign a new set to change them)."""
        return set(self.state.rejected)

    @rejected.setter
    def rejected(self, names) -> None:
        self._commit(replace(self.state, rejected=self._checked_rejected(names)))

    @property
    def alpha(self) -> float:
        """Importance outside positive boxes (Eq. 13); the model's config.alpha by default."""
        return self.model.config.alpha if self.state.alpha is None else self.state.alpha

    @alpha.setter
    def alpha(self, value) -> None:
        self._commit(replace(self.state, alpha=self._checked_alpha(value)))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image as given."""
        return self.geometry.image_size

    @property
    def selected(self) -> int | None:
        """Index into ``boxes`` of the selected box, or None."""
        return self._selected

    @selected.setter
    def selected(self, index: int | None) -> None:
        if index is not None and not 0 <= index < len(self.state.boxes):
            raise IndexError(f"No box {index}: there are {len(self.state.boxes)} boxes.")
        self._selected = index
        self._draw_boxes()

    @property
    def mode(self) -> str:
        """What a mouse drag does: "positive" or "negative" (draw a box) or "select" (move)."""
        return self._mode.value

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}.")
        self._mode.value = value

    @property
    def concept(self) -> str | None:
        """The concept whose heatmap is shown (None: no heatmap)."""
        return self._concept.value or None  # the dropdown holds "" for "off"

    @concept.setter
    def concept(self, name: str | None) -> None:
        if name is not None:
            self.model.concept_index([name])
        self._concept.value = name or ""

    @property
    def prototype(self) -> int | None:
        value = self._prototype.value  # the dropdown holds -1 for "max over M"
        return None if value < 0 else value

    @prototype.setter
    def prototype(self, index: int | None) -> None:
        M = self.model.config.prototypes_per_concept
        if index is not None and not 0 <= index < M:
            raise ValueError(f"prototype must be None or in [0, {M}), got {index!r}.")
        self._prototype.value = -1 if index is None else index

    @property
    def can_undo(self) -> bool:
        return self._history.can_undo

    @property
    def can_redo(self) -> bool:
        return self._history.can_redo

    def undo(self) -> bool:
        """Go back one change (boxes, rejections, alpha); False when there is none."""
        return self._restore(self._history.undo())

    def redo(self) -> bool:
        return self._restore(self._history.redo())

    def clear(self) -> None:
        """Remove every box (one undoable change); rejections stay."""
        self.boxes = []

    def delete_selected(self) -> None:
        if self._selected is not None:
            boxes = self.boxes
            del boxes[self._selected]
            self._selected = None
            self.boxes = boxes

    def refresh(self) -> None:
        """Recompute after the model itself changed (weights refitted, masks edited)."""
        self._results.clear()
        self._computed = None
        self._compute()
        self._render()

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        view = {
            "concept": self.concept,
            "prototype": self.prototype,
            "smooth": self._smooth.value,
            "colormap": self._colormap.value,
            "opacity": self._opacity.value,
            "fade": self._fade,
        }
        return session_dict(self.state, self.image_size, self.model.concepts, self.model.classes, view)

    def to_json(self, **kwargs) -> str:
        """The session (boxes, rejections, alpha, view) as JSON; ``kwargs`` go to json.dumps."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, model: CSRModel, session, image, **kwargs) -> "CSRExplorer":
        """Restore a session saved with ``to_json`` (JSON text or dict) onto its image."""
        image = read_image(image)
        state, view = parse_session(session, model.concepts, tuple(image.shape[-2:]))
        options = {k: v for k, v in view.items() if k in ("concept", "prototype", "smooth", "colormap", "opacity", "fade")}
        options.update(kwargs)
        return cls(model, image, boxes=state.boxes, rejected=state.rejected, alpha=state.alpha, **options)

    # ------------------------------------------------------------------ static fallback
    def snapshot(self) -> np.ndarray:
        """The current view as an RGBA array at canvas size (image, heatmap, boxes)."""
        H, W = self.geometry.canvas_size
        view = display_rgba(self._image, (H, W))
        if self.heatmap is not None and self.concept is not None:
            overlay = render.resize_rgba(self.heatmap, (H, W), smooth=self._smooth.value)
            view = render.composite(view, overlay, self._opacity.value)
        boxes = [(*self.geometry.box_to_canvas(b), b.positive) for b in self.state.boxes]
        return render.draw_boxes(view, boxes, self._selected)

    def to_png(self, caption: bool = True) -> bytes:
        """PNG of the current view, with the prediction as a caption line."""
        view = self.snapshot()
        if caption:
            view = render.caption(view, [self._summary()])
        return render.encode_png(view)

    def _summary(self) -> str:
        probs = self.result.probs[0].tolist()
        top = int(np.argmax(probs))
        review = "needs review" if bool(self.result.needs_review[0]) else "confident"
        heat = f"heatmap: {self.concept}" if self.concept else "no heatmap"
        return f"{self.model.classes[top]} {probs[top]:.3f} ({review}); {len(self.state.boxes)} boxes; {heat}"

    def _repr_mimebundle_(self, **kwargs):
        """The live widget, plus a PNG of the current view for renderers without widgets
        (exported notebooks, GitHub, nbviewer)."""
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = f"CSRExplorer: {self._summary()}"
        data["image/png"] = base64.b64encode(self.to_png()).decode("ascii")
        return data

    # ------------------------------------------------------------------ checks
    def _checked_boxes(self, boxes) -> tuple[Box, ...]:
        boxes = as_boxes(boxes)
        H, W = self.geometry.image_size
        self.model.concept_index({b.concept for b in boxes if b.concept is not None})
        outside = [b for b in boxes if b.clipped(W, H) is None]
        if outside:
            raise ValueError(f"Boxes {outside} lie entirely outside the {W}x{H} image (x0, y0, x1, y1 in image pixels).")
        return boxes

    def _checked_rejected(self, names) -> frozenset[str]:
        if isinstance(names, str):
            names = {names}
        if not isinstance(names, Iterable):
            raise TypeError(f"rejected must be a set of concept names, got {type(names).__name__}.")
        names = frozenset(names)
        self.model.concept_index(names)  # clear error for unknown names
        return names

    @staticmethod
    def _checked_alpha(value) -> float | None:
        if value is None:
            return None
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {value}.")
        return value

    def _default_concept(self) -> str:
        contributions = self.baseline.contributions[0, int(self.baseline.prediction[0])]
        return self.model.concepts[int(contributions.argmax())]

    # ------------------------------------------------------------------ state changes
    def _commit(self, state: ExplorerState) -> None:
        if self._history.push(state):
            self._after_change()

    def _restore(self, state: ExplorerState | None) -> bool:
        if state is None:
            return False
        self._after_change()
        return True

    def _after_change(self) -> None:
        if self._selected is not None and self._selected >= len(self.state.boxes):
            self._selected = None
        self._sync_controls()
        self._compute()
        self._render()

    def _sync_controls(self) -> None:
        """Show the state in the controls without their observers committing it again."""
        self._syncing = True
        try:
            for name, box in self._concept_boxes.items():
                box.value = name not in self.state.rejected
            self._alpha.value = self.alpha
            self._undo_button.disabled = not self._history.can_undo
            self._redo_button.disabled = not self._history.can_redo
        finally:
            self._syncing = False

    def _compute(self) -> None:
        """model.reason for the current state, unless it is the one already shown."""
        state = self.state
        if state == self._computed and self.result is not None:
            return
        key = (state, self.model.prototype_mask.cpu().numpy().tobytes(), self.model.concept_mask.cpu().numpy().tobytes())
        cached = self._results.get(key)
        if cached is None:
            self._set_busy(True)
            try:
                with torch.inference_mode(), single_threaded():
                    result = self.model.reason(self.encoding, state.interaction(self.geometry.box_to_model))
            except Exception:
                self._set_busy(False)  # not stuck at "computing" after an error
                raise
            self.reason_count += 1
            cached = self._results[key] = (self.reason_count, result)
            while len(self._results) > RESULT_CACHE:
                self._results.popitem(last=False)
        else:
            self._results.move_to_end(key)
        self._computed = state
        self._result_serial = cached[0]
        self.set_trait("result", cached[1])

    def _set_busy(self, value: bool) -> None:
        self.set_trait("busy", value)
        self._busy.value = charts.busy_badge(value)

    # ------------------------------------------------------------------ widgets
    def _build(self, concept, prototype, smooth, colormap, opacity, fade) -> None:
        H, W = self.geometry.canvas_size
        M = self.model.config.prototypes_per_concept
        self._fade = bool(fade)
        self.canvas = MultiCanvas(4, width=W, height=H, layout=widgets.Layout(width=f"{W}px", height=f"{H}px"))
        self.canvas.add_class("csr-canvas")
        # The heatmap at model-input size, never displayed: the overlay layer scales it.
        lh, lw = self._lattice_size
        self._heat_source = Canvas(width=lw, height=lh, layout=widgets.Layout(display="none"))
        self.canvas.on_mouse_down(self._on_mouse_down)
        self.canvas.on_mouse_move(self._on_mouse_move)
        self.canvas.on_mouse_up(self._on_mouse_up)
        self.canvas.on_mouse_out(self._on_mouse_out)
        self.canvas.on_key_down(self._on_key_down)
        self.canvas.on_client_ready(self._on_client_ready)

        self._mode = widgets.ToggleButtons(
            options=[("+ positive (p)", "positive"), ("\u2212 negative (n)", "negative"), ("select / move (s)", "select")],
            value="positive",
            tooltips=["draw a box the model should look at", "draw a box the model must ignore", "select a box, drag to move it"],
            style=widgets.ToggleButtonsStyle(button_width="auto"),
        )
        self._mode.add_class("csr-mode")
        self._delete_button = widgets.Button(description="delete", tooltip="delete the selected box (Del)", icon="trash")
        self._clear_button = widgets.Button(description="clear", tooltip="remove all boxes")
        self._undo_button = widgets.Button(description="undo", tooltip="undo (z)", icon="undo", disabled=True)
        self._redo_button = widgets.Button(description="redo", tooltip="redo (y)", icon="repeat", disabled=True)
        for button, handler in (
            (self._delete_button, lambda _: self.delete_selected()),
            (self._clear_button, lambda _: self.clear()),
            (self._undo_button, lambda _: self.undo()),
            (self._redo_button, lambda _: self.redo()),
        ):
            button.layout.width = "auto"
            button.on_click(handler)
        self._busy = widgets.HTML(charts.busy_badge(False))
        self._busy.add_class("csr-busy-state")
        toolbar = widgets.HBox([self._mode, self._delete_button, self._clear_button, self._undo_button, self._redo_button, self._busy])

        # Sentinels "" and -1, not None: ipywidgets shows a None value as an empty selection.
        if concept is not None:
            self.model.concept_index([concept])
        if prototype is not None and not (isinstance(prototype, int) and 0 <= prototype < M):
            raise ValueError(f"prototype must be None or in [0, {M}), got {prototype!r}.")
        self._concept = widgets.Dropdown(options=[("off", "")] + [(c, c) for c in self.model.concepts], value=concept or "", description="heatmap")
        self._prototype = widgets.Dropdown(
            options=[(f"max over {M}", -1)] + [(f"prototype {m}", m) for m in range(M)], value=-1 if prototype is None else prototype, description="of"
        )
        self._smooth = widgets.ToggleButtons(options=[("smooth", True), ("cells", False)], value=bool(smooth), style=widgets.ToggleButtonsStyle(button_width="auto"))
        render.colormap_lut(colormap)  # validates the name
        options = list(render.COLORMAPS) + ([colormap] if colormap not in render.COLORMAPS else [])
        self._colormap = widgets.Dropdown(options=options, value=colormap, description="colours")
        self._opacity = widgets.FloatSlider(value=float(opacity), min=0.0, max=1.0, step=0.05, description="opacity", continuous_update=True)
        self._alpha = widgets.FloatSlider(
            value=self.alpha, min=0.0, max=1.0, step=0.05, description="alpha", continuous_update=False,
            tooltip="importance outside positive boxes (Eq. 13)",
        )
        for control in (self._concept, self._prototype, self._colormap):
            control.layout.width = "220px"
        for control in (self._concept, self._prototype, self._smooth, self._colormap):
            control.observe(lambda _: self._render(), names="value")
        self._opacity.observe(lambda _: self._draw_overlay(), names="value")
        self._alpha.observe(self._on_alpha, names="value")
        view_controls = widgets.HBox([self._concept, self._prototype, self._smooth, self._colormap])
        sliders = widgets.HBox([self._opacity, self._alpha])

        self._prediction = widgets.HTML()
        self._prediction.add_class("csr-prediction")
        self._review = widgets.HTML()
        self._review.add_class("csr-review-flag")
        self._concept_boxes: dict[str, widgets.Checkbox] = {}
        self._concept_cells: dict[str, widgets.HTML] = {}
        self._concept_crops: dict[str, widgets.Image] = {}
        rows = []
        for name in self.model.concepts:
            check = widgets.Checkbox(value=name not in self.state.rejected, description=name, indent=False, layout=widgets.Layout(width="150px"))
            check.add_class("csr-concept-toggle")
            check.observe(self._on_concept_toggle, names="value")
            cell = widgets.HTML(layout=widgets.Layout(width="170px"))
            row = [check, cell]
            if self.atlas is not None:
                crop = widgets.Image(format="png", layout=widgets.Layout(width="48px", height="48px"))
                self._concept_crops[name] = crop
                row.append(crop)
            self._concept_boxes[name], self._concept_cells[name] = check, cell
            box = widgets.HBox(row)
            box.add_class("csr-concept-row")
            rows.append(box)
        heading = widgets.HTML("<b>Concepts</b> (untick to reject)" + (" &middot; atlas: this looks like that" if self.atlas is not None else ""))
        side = widgets.VBox([self._prediction, self._review, heading, *rows], layout=widgets.Layout(margin="0 0 0 12px", min_width="340px"))
        self.children = [toolbar, widgets.HBox([widgets.VBox([self.canvas, self._heat_source]), side]), view_controls, sliders]
        self.add_class("csr-explorer")

    # ------------------------------------------------------------------ drawing
    @contextmanager
    def _batch(self):
        """Send the canvas commands drawn inside as one message, like ``hold_canvas``, but
        re-entrant (a nested hold_canvas flushes early: the browser would show half-drawn
        frames) and safe on errors (hold_canvas leaves caching on after an exception, and
        every later drawing would then wait forever)."""
        manager = self._heat_source._canvas_manager
        if manager._caching:  # inside an outer batch (ours or the user's hold_canvas)
            yield
            return
        manager._caching = True
        try:
            yield
        finally:
            manager.flush()  # sends what was drawn, even after an error, so the view stays whole
            manager._caching = False

    def redraw(self) -> None:
        """Send everything again: the image, the heatmap, the boxes (e.g. for a new client)."""
        H, W = self.geometry.canvas_size
        with self._batch():
            self.canvas[IMAGE].clear()
            put_rgba(self.canvas[IMAGE], display_rgba(self._image, (H, W)))
            self._heat_key = self._boxes_key = None
            self._render()
            self.canvas[INTERACTION].clear()

    def _render(self) -> None:
        """Bring heatmap, boxes and side panel up to date; send only what changed."""
        if self.result is None:
            return
        with self._batch():
            self._draw_heatmap()
            self._draw_boxes()
        # The canvas message goes out before the panel's: the browser decodes the heatmap
        # PNG while the panel's small HTML updates arrive (even inside an outer batch).
        self._heat_source._canvas_manager.flush()
        self._update_panel()
        if self.busy:
            self._set_busy(False)

    def _heatmap_rgba(self) -> np.ndarray:
        k = self.model.concepts.index(self.concept)
        with torch.inference_mode(), single_threaded():
            cells = render.select_map(self.result.similarity_maps[0], k, self.prototype)
            # One colour scale before and after interacting: the uninteracted map's maximum.
            vmax = float(np.maximum(render.select_map(self.baseline.similarity_maps[0], k, self.prototype), 0).max())
            return render.heatmap_rgba(
                cells, self._lattice_grid, self._lattice_size, smooth=self._smooth.value,
                colormap=self._colormap.value, vmax=vmax if vmax > 0 else None, fade=self._fade,
            )

    def _draw_heatmap(self) -> None:
        key = (self._result_serial, self.concept, self.prototype, self._smooth.value, self._colormap.value)
        if key == self._heat_key:
            return
        self._heat_key = key
        if self.concept is None:
            self.heatmap = None
        else:
            self.heatmap = self._heatmap_rgba()
            # ipycanvas's putImageData draws the PNG over what is there (drawImage), and a
            # semi-transparent map over the previous one would add up: clear first.
            self._heat_source.clear()
            put_rgba(self._heat_source, self.heatmap)
        self._draw_overlay()

    def _draw_overlay(self) -> None:
        layer = self.canvas[HEATMAP]
        H, W = self.geometry.canvas_size
        with self._batch():
            layer.clear()
            if self.heatmap is not None:
                layer.global_alpha = self._opacity.value
                layer.image_smoothing_enabled = bool(self._smooth.value)
                layer.draw_image(self._heat_source, 0, 0, W, H)

    def _draw_boxes(self) -> None:
        key = (self.state.boxes, self._selected)
        if key == self._boxes_key:
            return
        self._boxes_key = key
        layer = self.canvas[BOXES]
        with self._batch():
            layer.clear()
            for index, box in enumerate(self.state.boxes):
                self._stroke_box(layer, self.geometry.box_to_canvas(box), box.positive, index == self._selected)

    @staticmethod
    def _stroke_box(layer, rect, positive: bool, selected: bool = False, preview: bool = False) -> None:
        x0, y0, x1, y1 = rect
        color = render.POSITIVE_COLOR if positive else render.NEGATIVE_COLOR
        if selected:  # a light halo under the box marks the selection
            layer.line_width = 6
            layer.stroke_style = render.SELECTED_COLOR
            layer.set_line_dash([])
            layer.stroke_rect(x0, y0, x1 - x0, y1 - y0)
        layer.line_width = 2
        layer.stroke_style = color
        # Negative boxes are dashed, so the kind never relies on colour alone.
        layer.set_line_dash([4, 3] if preview else ([] if positive else [8, 4]))
        layer.stroke_rect(x0, y0, x1 - x0, y1 - y0)
        layer.fill_style = color
        layer.font = "bold 14px sans-serif"
        layer.fill_text("+" if positive else "\u2212", x0 + 3, y0 + 14)

    def _draw_interaction(self) -> None:
        """The rubber band or the box being moved, on the top layer only."""
        self._last_frame = time.perf_counter()
        layer = self.canvas[INTERACTION]
        with self._batch():
            layer.clear()
            drag = self._drag
            if drag is None:
                return
            if drag.kind == "draw":
                (x0, y0), (x1, y1) = drag.start, drag.current
                rect = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
                self._stroke_box(layer, rect, self.mode != "negative", preview=True)
            else:
                box = self._moved_box(drag)
                self._stroke_box(layer, self.geometry.box_to_canvas(box), box.positive, selected=True, preview=True)

    def _update_panel(self) -> None:
        result = self.result
        probs = result.probs[0].tolist()
        predicted = int(np.argmax(probs))
        self._prediction.value = charts.prediction_chart(self.model.classes, self.baseline.probs[0].tolist(), probs, predicted)
        self._review.value = charts.review_flag(probs, self.model.config.review_margin, bool(result.needs_review[0]))
        scores = result.scores[0].amax(-1).tolist()  # (K,) best prototype per concept
        contributions = result.contributions[0, predicted].tolist()
        scale = max(1e-6, max(abs(c) for c in contributions))
        class_name = self.model.classes[predicted]
        for k, name in enumerate(self.model.concepts):
            self._concept_cells[name].value = charts.concept_cell(scores[k], contributions[k], scale, name in self.state.rejected, class_name)
        if self.atlas is not None:
            best = result.scores[0].argmax(-1).tolist()
            for k, name in enumerate(self.model.concepts):
                png = self._crop_png(k, best[k])
                if png is not None and self._concept_crops[name].value != png:
                    self._concept_crops[name].value = png

    def _crop_png(self, k: int, m: int) -> bytes | None:
        from ..evaluation.atlas import atlas_entry  # on first use: evaluation brings pandas, scikit-learn

        if (k, m) not in self._crop_cache:
            entry = atlas_entry(self.atlas, k, m)
            self._crop_cache[(k, m)] = None if entry is None else render.encode_png(render.crop_rgba(entry.crop))
        return self._crop_cache[(k, m)]

    # ------------------------------------------------------------------ events
    def _on_client_ready(self) -> None:
        # A new page (reload, Voila) has empty canvases. ipycanvas 0.14.x remembers which
        # canvas its manager last drew on and skips the "switch canvas" command when it is
        # the same; the new page's manager has no current canvas, so reset that memory first.
        self.canvas[INTERACTION]._canvas_manager._current_canvas = None
        self.redraw()

    def _on_concept_toggle(self, change) -> None:
        if self._syncing:
            return
        names = set(self.state.rejected)
        name = change["owner"].description
        if change["new"]:
            names.discard(name)
        else:
            names.add(name)
        self.rejected = names

    def _on_alpha(self, change) -> None:
        if not self._syncing:
            self.alpha = change["new"]

    def _box_at(self, x: float, y: float) -> int | None:
        """The topmost box containing a canvas point."""
        for index in range(len(self.state.boxes) - 1, -1, -1):
            x0, y0, x1, y1 = self.geometry.box_to_canvas(self.state.boxes[index])
            if x0 <= x <= x1 and y0 <= y <= y1:
                return index
        return None

    def _on_mouse_down(self, x: float, y: float) -> None:
        hit = self._box_at(x, y)
        if self.mode == "select":
            self._selected = hit
            self._drag = _Drag("move", (x, y), (x, y), hit) if hit is not None else None
            self._draw_boxes()
        else:
            self._drag = _Drag("draw", (x, y), (x, y))

    def _on_mouse_move(self, x: float, y: float) -> None:
        drag = self._drag
        if drag is None:
            return  # hovering: nothing to do, nothing sent
        drag.current = (x, y)
        if time.perf_counter() - self._last_frame >= self.frame_interval:
            self._draw_interaction()
        else:
            self._schedule_frame()

    def _schedule_frame(self) -> None:
        """One trailing rubber-band frame on the kernel's event loop, if there is one."""
        if self._frame_pending is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (plain Python): the next event or the mouse-up draws it
        delay = max(0.0, self.frame_interval - (time.perf_counter() - self._last_frame))
        self._frame_pending = loop.call_later(delay, self._trailing_frame)

    def _trailing_frame(self) -> None:
        self._frame_pending = None
        if self._drag is not None:
            self._draw_interaction()

    def _on_mouse_up(self, x: float, y: float) -> None:
        if self._drag is None:
            return
        with self._batch():  # rubber band gone, new heatmap and boxes: one message
            self._finish_drag(x, y)

    def _finish_drag(self, x: float, y: float) -> None:
        drag, self._drag = self._drag, None
        drag.current = (x, y)
        self.canvas[INTERACTION].clear()
        (x0, y0), (x1, y1) = drag.start, drag.current
        if drag.kind == "move":
            if max(abs(x1 - x0), abs(y1 - y0)) >= 1.0:
                boxes = self.boxes
                boxes[drag.index] = self._moved_box(drag)
                self.boxes = boxes
            return
        if abs(x1 - x0) < MIN_DRAG or abs(y1 - y0) < MIN_DRAG:  # a click: select what is under it
            self.selected = self._box_at(x1, y1)
            return
        box = self.geometry.box_from_canvas(x0, y0, x1, y1, positive=self.mode != "negative")
        if box is not None:
            self._selected = None
            self.boxes = self.boxes + [box]

    def _on_mouse_out(self, x: float, y: float) -> None:
        # The mouse-up may happen outside the canvas, where it is never reported: finish
        # the drag at the last position seen inside.
        if self._drag is not None:
            self._on_mouse_up(*self._drag.current)

    def _moved_box(self, drag: _Drag) -> Box:
        """The dragged box shifted by the drag, in whole image pixels, kept inside the image."""
        box = self.state.boxes[drag.index]
        (ax, ay), (bx, by) = self.geometry.canvas_to_image(*drag.start), self.geometry.canvas_to_image(*drag.current)
        H, W = self.geometry.image_size
        dx = min(max(round(bx - ax), -box.x0), W - box.x1)
        dy = min(max(round(by - ay), -box.y0), H - box.y1)
        return replace(box, x0=box.x0 + dx, y0=box.y0 + dy, x1=box.x1 + dx, y1=box.y1 + dy)

    def _on_key_down(self, key: str, shift: bool, ctrl: bool, meta: bool) -> None:
        command = ctrl or meta
        lowered = key.lower()
        if lowered == "z" and not shift:
            self.undo()
        elif lowered == "y" or (lowered == "z" and shift):
            self.redo()
        elif command:
            return  # leave other shortcuts to the browser
        elif lowered in ("p", "n", "s"):
            self.mode = {"p": "positive", "n": "negative", "s": "select"}[lowered]
        elif key in ("Delete", "Backspace"):
            self.delete_selected()
        elif key == "Escape":
            self._drag = None
            self.canvas[INTERACTION].clear()
            self.selected = None
