"""CSRExplorer: talk to a CSR model about one image, live (docs/method.md#interaction).

The image is encoded once (``model.encode``: backbone, concept head, projector, similarity
maps); every change the user makes (a box drawn, moved or deleted, a concept rejected, an
undo) re-runs only ``model.reason``, which takes about a millisecond. Everything the user
controls is one value, ``ex.state`` (session.ExplorerState: boxes, rejections, alpha and
the view settings); the mouse, the keys, the controls and Python setters all make a new
state, and the explorer shows it. The parts, one job each:

- ``layers``: drawing on ipycanvas (the only code touching its private names);
- ``panel``: the side panel (prediction, confidence, "check next", legend, concepts);
- ``pointer``: what drags and keys mean (``KEYMAP``: the one definition of the keys);
- ``overlay``: what the box layer shows (outlines, labels, the cells a box acts on);
- ``session``: the state, its undo history and its JSON.

Responsiveness rules (docs/decisions.md#widget-responsiveness, docs/decisions.md#live-drag):
- while a box is drawn or moved, the heatmap and the prediction follow it, at most once
  per ``frame_interval`` (latest position wins, a trailing frame is scheduled on the
  kernel's event loop), so a flood of events never queues work; mouse-up computes the
  exact final state;
- canvas commands of one update go out as one message (as with ``hold_canvas``);
- nothing is recomputed or re-sent when nothing changed (results are cached by state,
  the heatmap by what it shows);
- the heatmap goes to the browser as the small model-input-sized RGBA map on a hidden
  canvas, which the overlay layer scales with ``draw_image``;
- ``model.reason`` and the rendering run with one torch thread: for these tiny operations
  a thread pool only adds overhead (threaded BLAS measured 5x slower); the previous thread
  count is restored afterwards, so the rest of the kernel is unaffected.
"""
from __future__ import annotations

import asyncio
import base64
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace

import ipywidgets as widgets
import numpy as np
import torch
import traitlets

from .._inference import evaluating, single_threaded
from ..model import Box, CSRModel, Encoding, Reasoning, rank_questions
from ..model.csr import MAX_ASPECT
from . import charts, render, views
from .geometry import ViewGeometry
from .image import check_size, display_rgba, model_input, read_image
from .layers import BOXES, INTERACTION, CanvasLayers
from .overlay import box_marks
from .panel import SidePanel
from .pointer import Drag, FrameCoalescer, action_for, box_at, drag_boxes, hint_line, tooltip
from .session import ExplorerState, History, ViewSettings, as_boxes, parse_session, session_dict
from .page import style_widget

RESULT_CACHE = 16  # recent results kept, so undo/redo answer without recomputing
# A question whose expected effect on the top-2 margin is below this is not worth asking:
# the panel says that no answer is likely to change the prediction instead
# (docs/decisions.md#check-this-next).
MIN_QUESTION_EFFECT = 0.01
# "Check next" is ranked this long after the last change, off the path of the update the
# user waits for: ranking costs ~14 ms on the bundled model (one batched reason over 2K + 1
# answers), several updates in a row rank once, and undo/redo reuse cached rankings.
QUESTION_DELAY = 0.1  # seconds


class _ByIdentity(traitlets.Any):
    """A trait that notifies whenever a different object is set. traitlets compares old and
    new values with ==, which on a Reasoning compares its tensors element by element: 13 ms
    per live frame at paper size (K=14, M=100), for a comparison that can only fail."""

    def set(self, obj, value) -> None:
        new_value = self._validate(obj, value)
        old_value = obj._trait_values.get(self.name, self.default_value)
        obj._trait_values[self.name] = new_value
        if old_value is not new_value:
            obj._notify_trait(self.name, old_value, new_value)


class CSRExplorer(widgets.VBox):
    """Interactive CSR reasoning on one image.

    Parameters
    ----------
    model: a CSRModel (any device; the explorer computes where the model lives).
    image: torch tensor (C, H, W), numpy array, PIL image, or a path (PNG, JPEG, DICOM), any
        size and aspect ratio up to 10:1, greyscale or RGB, 8 or 16 bit.
    atlas: optional prototype atlas (see atlas_explorer.py) to show "this looks like that".
    display_size: longer side of the canvas in pixels (the image keeps its aspect); on a
        narrower screen the canvas shrinks to fit, mouse positions stay exact.
    input_size: model input (H, W) or side; default the model's ``config.image_size``
        square, what it was trained on. Boxes are mapped exactly either way (geometry.py).
    concept / prototype: the heatmap shown: a concept name (None: no heatmap; "auto": the
        concept that contributes most to the prediction) and a prototype index (None: the
        max over the concept's M prototypes).
    smooth: bilinear between feature-cell centres (True) or the cells as blocks (False).
    colormap, opacity, fade: heatmap colours (colour-blind-safe default), layer opacity,
        and whether low similarity fades to transparent.
    boxes, rejected, alpha: the initial interaction.
    target: what a new box acts on: "all" concepts or the "shown" heatmap's concept.
    questions: show the "check next" suggestion (csr_widgets.model.rank_questions).
    history_limit: undo depth. frame_interval: seconds between live updates while dragging.
    """

    result = _ByIdentity(read_only=True, help="the current Reasoning (observe it)")
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
        target: str = "all",
        questions: bool = True,
        history_limit: int = 200,
        frame_interval: float = 1 / 60,
    ):
        super().__init__()
        if not all(hasattr(model, name) for name in ("encode", "reason", "config", "grid")):
            raise TypeError(f"CSRExplorer needs a CSRModel, got {type(model).__name__}.")
        self.model = model
        self.atlas = atlas
        self.questions = bool(questions)
        image = read_image(image)
        side = model.config.image_size
        check_size(image, 2 * model.grid.stride, MAX_ASPECT, side)
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
        self._cells = tuple(self.encoding.similarity_maps.shape[-2:])
        self._lattice_grid, self._lattice_size = render.lattice(model.grid, self.geometry.model_size)

        if concept == "auto" and "auto" not in model.concepts:
            concept = self._default_concept()
        render.colormap_lut(colormap)  # validates the name
        view = self._checked_view(ViewSettings(concept, prototype, bool(smooth), colormap, float(opacity), bool(fade), "positive", target))
        initial = ExplorerState(self._checked_boxes(boxes), self._checked_rejected(rejected), self._checked_alpha(alpha), view=view)
        self._history = History(initial, history_limit)
        self._results: OrderedDict = OrderedDict()
        self._shown: ExplorerState | None = None  # the state on screen (a preview while dragging)
        self._selected: int | None = None
        self._drag: Drag | None = None
        self._frames = FrameCoalescer(self._drag_frame, frame_interval)
        self._pointer_inside = False
        self._syncing = False  # True while controls are set from the state (no new states)
        self._keys: dict[str, object] = {}  # what each layer/part shows now (nothing re-sent twice)
        self._crop_cache: dict = {}
        self._question = None  # the "check next" Question shown, if any
        self._question_key = None
        self._rankings: OrderedDict = OrderedDict()  # recent rankings, by state
        self._question_pending: asyncio.TimerHandle | None = None
        self.heatmap: np.ndarray | None = None  # the RGBA map last sent to the browser
        self._result_serial = 0
        self.reason_count = 0  # model.reason calls made by this explorer (for tests/benchmarks)

        self._build()
        views.follow(model, self.refresh)  # an atlas explorer pruned or refitted this model
        self._show()
        self.redraw()

    # ------------------------------------------------------------------ public state
    @property
    def state(self) -> ExplorerState:
        """Everything the user has set (boxes, rejections, alpha, answers, view)."""
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
    def view(self) -> ViewSettings:
        return self.state.view

    def set_view(self, **settings) -> None:
        """Change how the reasoning is shown (ViewSettings fields), e.g. ``set_view(colormap="magma")``."""
        self._commit(replace(self.state, view=self._checked_view(replace(self.view, **settings))))

    @property
    def mode(self) -> str:
        """What a mouse drag does: "positive" or "negative" (draw a box) or "select" (move)."""
        return self.view.tool

    @mode.setter
    def mode(self, value: str) -> None:
        self.set_view(tool=value)

    @property
    def target(self) -> str:
        """What a new box acts on: "all" concepts or the "shown" heatmap's concept."""
        return self.view.target

    @target.setter
    def target(self, value: str) -> None:
        self.set_view(target=value)

    @property
    def concept(self) -> str | None:
        """The concept whose heatmap is shown (None: no heatmap)."""
        return self.view.concept

    @concept.setter
    def concept(self, name: str | None) -> None:
        self.set_view(concept=name)

    @property
    def prototype(self) -> int | None:
        """The prototype whose map is shown (None: the max over the concept's M)."""
        return self.view.prototype

    @prototype.setter
    def prototype(self, index: int | None) -> None:
        self.set_view(prototype=index)

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
        self._sync_controls(self.state)

    @property
    def frame_interval(self) -> float:
        return self._frames.interval

    @frame_interval.setter
    def frame_interval(self, seconds: float) -> None:
        self._frames.interval = float(seconds)

    @property
    def can_undo(self) -> bool:
        return self._history.can_undo

    @property
    def can_redo(self) -> bool:
        return self._history.can_redo

    def undo(self) -> bool:
        """Go back one change (boxes, rejections, alpha, answers); False when there is none."""
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
        self._rankings.clear()
        self._shown = None
        self._question_key = None
        self._show()

    # ------------------------------------------------------------------ check next
    @property
    def question(self):
        """The "check next" Question shown (csr_widgets.model.Question), or None."""
        if self._question_pending is not None:
            self._update_question()
        return self._question

    def answer(self, yes: bool) -> None:
        """Answer the "check next" question (one undoable change): a "no" rejects the
        concept or puts a negative box for it on the cell asked about, a "yes" to a
        location question a positive one; either way it is not asked again."""
        question = self.question
        if question is None:
            raise ValueError("There is no question to answer (questions=False, or nothing left to ask).")
        state = replace(self.state, answered=self.state.answered | {(question.kind, question.concept)})
        if question.kind == "present" and not yes:
            state = replace(state, rejected=state.rejected | {question.concept})
        elif question.kind == "location":
            box = self.geometry.box_from_model(Box(*question.region, positive=bool(yes), concept=question.concept))
            state = replace(state, boxes=state.boxes + (box,))
        self._commit(state)

    def _schedule_question(self) -> None:
        """Rank the questions QUESTION_DELAY after the last change, on the kernel's event
        loop; at once where there is none (plain Python, tests)."""
        if self._question_pending is not None:
            self._question_pending.cancel()
            self._question_pending = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._update_question()
            return
        self._question_pending = loop.call_later(QUESTION_DELAY, self._update_question)

    def _update_question(self) -> None:
        """Rank the questions about the committed state (one batched ``reason``) and show the best."""
        if self._question_pending is not None:
            self._question_pending.cancel()
            self._question_pending = None
        if not self.questions:
            self.panel.show_question(None)
            return
        state = self.state
        key = (state.reasoning_key, state.answered, self._mask_key())
        if key == self._question_key:
            return
        self._question_key = key
        if key not in self._rankings:
            with torch.inference_mode(), single_threaded():
                ranked = rank_questions(self.model, self.encoding, state.interaction(self.geometry.box_to_model))
            unanswered = [q for q in ranked if (q.kind, q.concept) not in state.answered]
            # the cut is on the expected effect: an answer that would flip the case but is
            # almost certainly "yes" is not worth the clinician's time either
            worth = [q for q in unanswered if q.effect >= MIN_QUESTION_EFFECT]
            self._rankings[key] = (worth[0] if worth else None, charts.UNLIKELY if unanswered and not worth else "")
            while len(self._rankings) > RESULT_CACHE:
                self._rankings.popitem(last=False)
        self._question, note = self._rankings[key]
        self.panel.show_question(None if self._question is None else charts.question_text(self._question, self.model.classes), note)
        self._draw_boxes()  # the cell a location question asks about

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return session_dict(self.state, self.image_size, self.model.concepts, self.model.classes)

    def to_json(self, **kwargs) -> str:
        """The session (boxes, rejections, alpha, answers, view) as JSON; ``kwargs`` go to json.dumps."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, model: CSRModel, session, image, **kwargs) -> "CSRExplorer":
        """Restore a session saved with ``to_json`` (JSON text or dict) onto its image."""
        image = read_image(image)
        state = parse_session(session, model.concepts, tuple(image.shape[-2:]))
        view = state.view.to_dict()
        del view["tool"]
        options = {**view, **kwargs}
        explorer = cls(model, image, boxes=state.boxes, rejected=state.rejected, alpha=state.alpha, **options)
        if state.answered:
            explorer._history.current = replace(explorer.state, answered=state.answered)  # not an undo step
            explorer._show()
        return explorer

    # ------------------------------------------------------------------ static fallback
    def snapshot(self) -> np.ndarray:
        """The current view as an RGBA array at canvas size (image, heatmap, boxes)."""
        H, W = self.geometry.canvas_size
        view = display_rgba(self._image, (H, W))
        if self.heatmap is not None and self.concept is not None:
            overlay = render.resize_rgba(self.heatmap, (H, W), smooth=self.view.smooth)
            view = render.composite(view, overlay, self.view.opacity)
        return render.draw_marks(view, self._marks())

    def to_png(self, caption: bool = True) -> bytes:
        """PNG of the current view, with the prediction as a caption line."""
        view = self.snapshot()
        if caption:
            view = render.caption(view, self._summary_lines())
        return render.encode_png(view)

    def _summary_lines(self) -> list[str]:
        probs = self.result.probs[0].tolist()
        top = int(np.argmax(probs))
        verdict = charts.confidence_words(bool(self.result.needs_review[0]), bool(self.result.out_of_distribution[0]))
        heat = f"heatmap: {self.concept}" if self.concept else "no heatmap"
        return [f"{self.model.classes[top]} {probs[top]:.3f} ({verdict})", f"{len(self.state.boxes)} boxes; {heat}"]

    def _repr_mimebundle_(self, **kwargs):
        """The live widget, plus a PNG of the current view for renderers without widgets
        (exported notebooks, GitHub, nbviewer)."""
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = "CSRExplorer: " + "; ".join(self._summary_lines())
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

    def _checked_view(self, view: ViewSettings) -> ViewSettings:
        if view.concept is not None:
            self.model.concept_index([view.concept])  # clear error for unknown names
        M = self.model.config.prototypes_per_concept
        if view.prototype is not None and not (isinstance(view.prototype, int) and 0 <= view.prototype < M):
            raise ValueError(f"prototype must be None or in [0, {M}), got {view.prototype!r}.")
        render.colormap_lut(view.colormap)
        return view

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
        self._show()

    def run_action(self, action: str) -> None:
        """Do what a key (``pointer.KEYMAP``) or a button asks: "tool:<mode>",
        "target:<all|shown>", "delete", "undo", "redo", "cancel"."""
        kind, _, value = action.partition(":")
        if kind == "tool":
            self.mode = value
        elif kind == "target":
            self.target = value
        elif action == "delete":
            self.delete_selected()
        elif action == "undo":
            self.undo()
        elif action == "redo":
            self.redo()
        elif action == "cancel":
            self._cancel_drag()
            self.selected = None
        else:
            raise ValueError(f"Unknown explorer action {action!r}.")

    # ------------------------------------------------------------------ computing
    def _mask_key(self) -> bytes:
        return self.model.prototype_mask.cpu().numpy().tobytes() + self.model.concept_mask.cpu().numpy().tobytes()

    def _reasoning(self, state: ExplorerState, quiet: bool = False) -> tuple[int, Reasoning]:
        """(serial, model.reason) for a state, from the cache when it was computed before.
        quiet: no busy flag (live frames while dragging)."""
        key = (state.reasoning_key, self._mask_key())
        cached = self._results.get(key)
        if cached is not None:
            self._results.move_to_end(key)
            return cached
        if not quiet:
            self._set_busy(True)
        try:
            with torch.inference_mode(), single_threaded():
                result = self.model.reason(self.encoding, state.interaction(self.geometry.box_to_model))
        finally:
            if not quiet:
                self._set_busy(False)  # never stuck at "computing", also after an error
        self.reason_count += 1
        cached = self._results[key] = (self.reason_count, result)
        while len(self._results) > RESULT_CACHE:
            self._results.popitem(last=False)
        return cached

    def _reason(self, state: ExplorerState, quiet: bool = False) -> Reasoning:
        """The reasoning for ``state``, made the one shown (``result``)."""
        self._result_serial, result = self._reasoning(state, quiet)
        self.set_trait("result", result)
        return result

    def _set_busy(self, value: bool) -> None:
        self.set_trait("busy", value)
        self._busy.value = charts.busy_badge(value)

    # ------------------------------------------------------------------ showing
    def _show(self, state: ExplorerState | None = None, moving: int | None = None) -> None:
        """Bring canvas, panel and controls up to ``state`` (the committed one by default;
        a live preview while dragging, with ``moving`` the index of the dragged box).
        Only what changed is computed and sent."""
        preview = state is not None
        state = self.state if state is None else state
        changed = state != self._shown
        with self._layers.batch():
            if changed:
                self._reason(state, quiet=preview)
            self._draw_heatmap(state.view)
            self._draw_boxes(state, moving)
        # The canvas message goes out before the panel's: the browser decodes the heatmap
        # PNG while the panel's small HTML updates arrive.
        self._layers.flush()
        if changed:
            self.panel.show_result(self.result, self.baseline, state.rejected, self.model.config.review_margin, self._distance_ratio())
            self._shown = state
        if not preview:
            self._sync_controls(state)
            self._update_crops()
            self._schedule_question()

    def _distance_ratio(self) -> float | None:
        """The image's feature distance as a multiple of the novelty threshold."""
        distance = self.encoding.feature_distance
        threshold = float(self.model.novelty.threshold) if hasattr(self.model, "novelty") else float("inf")
        if distance is None or not np.isfinite(threshold) or threshold <= 0:
            return None
        return float(distance[0]) / threshold

    def redraw(self) -> None:
        """Send everything again: the image, the heatmap, the boxes (e.g. for a new client)."""
        H, W = self.geometry.canvas_size
        with self._layers.batch():
            self._layers.show_image(display_rgba(self._image, (H, W)))
            self._keys.clear()
            self._draw_heatmap(self._shown.view if self._shown is not None else self.view)
            self._draw_boxes()

    def _heatmap_rgba(self, view: ViewSettings) -> np.ndarray:
        k = self.model.concepts.index(view.concept)
        with torch.inference_mode(), single_threaded():
            cells = render.select_map(self.result.similarity_maps[0], k, view.prototype)
            return render.heatmap_rgba(
                cells, self._lattice_grid, self._lattice_size, smooth=view.smooth,
                colormap=view.colormap, vmax=self._vmax(view), fade=view.fade,
            )

    def _vmax(self, view: ViewSettings) -> float | None:
        """One colour scale before and after interacting: the uninteracted map's maximum."""
        k = self.model.concepts.index(view.concept)
        vmax = float(np.maximum(render.select_map(self.baseline.similarity_maps[0], k, view.prototype), 0).max())
        return vmax if vmax > 0 else None

    def _draw_heatmap(self, view: ViewSettings) -> None:
        key = (self._result_serial, view.concept, view.prototype, view.smooth, view.colormap, view.fade)
        if key != self._keys.get("heatmap"):
            self._keys["heatmap"] = key
            self.heatmap = None if view.concept is None else self._heatmap_rgba(view)
            self._layers.send_heatmap(self.heatmap)
            self.panel.show_colour_bar("" if view.concept is None else charts.colour_bar(
                render.colormap_lut(view.colormap), self._vmax(view) or 0.0, view.concept, view.prototype,
                self.model.config.prototypes_per_concept, view.fade))
        overlay = (key, view.opacity)
        if overlay != self._keys.get("overlay"):
            self._keys["overlay"] = overlay
            self._layers.show_heatmap(self.heatmap is not None, view.opacity, view.smooth)

    def _marks(self, state: ExplorerState | None = None, moving: int | None = None):
        state = self.state if state is None else state
        return box_marks(state.boxes, self.geometry, self.model.grid, self._cells, self._selected, skip=moving)

    def _question_rect(self):
        q = self._question
        if q is None or q.kind != "location" or self._drag is not None:
            return None
        return self.geometry.box_to_canvas(self.geometry.box_from_model(Box(*q.region)))

    def _draw_boxes(self, state: ExplorerState | None = None, moving: int | None = None) -> None:
        """Committed boxes on their layer; during a drag the dragged box on the top layer."""
        state = self.state if state is None else state
        dragged = self._drag is not None
        committed = self.state.boxes if dragged else state.boxes
        question = self._question_rect()
        key = (committed, self._selected, moving, question)
        if key != self._keys.get("boxes"):
            self._keys["boxes"] = key
            marks = box_marks(committed, self.geometry, self.model.grid, self._cells, self._selected, skip=moving)
            self._layers.draw_marks(BOXES, marks, question)
        live = None
        if dragged and len(state.boxes) > 0 and (moving is not None or state.boxes != committed):
            index = moving if moving is not None else len(state.boxes) - 1
            live = box_marks(state.boxes[index:index + 1], self.geometry, self.model.grid, self._cells, preview=0)
        if live != self._keys.get("live"):
            self._keys["live"] = live
            self._layers.draw_marks(INTERACTION, live or [])

    def _sync_controls(self, state: ExplorerState) -> None:
        """Show the state in the controls without their observers making a new state."""
        view = state.view
        self._syncing = True
        try:
            self.panel.show_rejected(state.rejected)
            self._alpha.value = self.model.config.alpha if state.alpha is None else state.alpha
            self._mode.value = view.tool
            options = self._target_options(view.concept)
            if list(self._target.options) != options:
                self._target.options = options
            self._target.value = view.target
            self._concept.value = view.concept or ""  # the dropdown holds "" for "off"
            self._prototype.value = -1 if view.prototype is None else view.prototype  # -1: "max over M"
            self._smooth.value = view.smooth
            self._colormap.value = view.colormap
            self._opacity.value = view.opacity
            self._undo_button.disabled = not self._history.can_undo
            self._redo_button.disabled = not self._history.can_redo
            self._delete_button.disabled = self._selected is None
        finally:
            self._syncing = False

    def _update_crops(self) -> None:
        if self.atlas is None:
            return
        best = self.result.scores[0].argmax(-1).tolist()
        for k, name in enumerate(self.model.concepts):
            self.panel.show_crop(name, self._crop_png(k, best[k]))

    def _crop_png(self, k: int, m: int) -> bytes | None:
        from ..evaluation.atlas import atlas_entry  # on first use: evaluation brings pandas, scikit-learn

        if (k, m) not in self._crop_cache:
            entry = atlas_entry(self.atlas, k, m)
            self._crop_cache[(k, m)] = None if entry is None else render.encode_png(render.crop_rgba(entry.crop))
        return self._crop_cache[(k, m)]

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        H, W = self.geometry.canvas_size
        M = self.model.config.prototypes_per_concept
        self._layers = CanvasLayers((H, W), self._lattice_size)
        self.canvas = self._layers.canvas
        self.canvas.on_mouse_down(self._on_mouse_down)
        self.canvas.on_mouse_move(self._on_mouse_move)
        self.canvas.on_mouse_up(self._on_mouse_up)
        self.canvas.on_mouse_out(self._on_mouse_out)
        self.canvas.on_key_down(self._on_key_down)
        self.canvas.on_client_ready(self._on_client_ready)

        def toggles(options, action_prefix, **kwargs):
            control = widgets.ToggleButtons(options=options, style=widgets.ToggleButtonsStyle(button_width="auto"), **kwargs)
            control.tooltips = [tooltip(f"{action_prefix}:{value}") for _, value in options]
            return control

        self._mode = toggles([("+ look here (p)", "positive"), ("\u2212 not here (n)", "negative"), ("select / move (s)", "select")], "tool")
        self._mode.add_class("csr-mode")
        self._target = toggles(self._target_options(self.view.concept), "target")
        self._target.add_class("csr-target")
        self._delete_button = widgets.Button(description="delete", tooltip=tooltip("delete"), icon="trash")
        self._clear_button = widgets.Button(description="clear", tooltip="remove all boxes (undo brings them back)")
        self._undo_button = widgets.Button(description="undo", tooltip=tooltip("undo"), icon="undo")
        self._redo_button = widgets.Button(description="redo", tooltip=tooltip("redo"), icon="repeat")
        for button, handler in (
            (self._delete_button, self.delete_selected),
            (self._clear_button, self.clear),
            (self._undo_button, self.undo),
            (self._redo_button, self.redo),
        ):
            button.layout.width = "auto"
            button.on_click(lambda _, handler=handler: handler())
        self._busy = widgets.HTML(charts.busy_badge(False))
        self._busy.add_class("csr-busy-state")
        # groups, so that a narrow toolbar wraps between them, never inside one
        groups = [
            self._mode,
            widgets.HBox([widgets.HTML("new boxes act on:"), self._target]),
            widgets.HBox([self._delete_button, self._clear_button, self._undo_button, self._redo_button, self._busy]),
        ]
        for group in groups[1:]:
            group.add_class("csr-toolbar-group")
        toolbar = widgets.HBox(groups)
        toolbar.add_class("csr-toolbar")

        # Sentinels "" and -1, not None: ipywidgets shows a None value as an empty selection.
        self._concept = widgets.Dropdown(options=[("off", "")] + [(c, c) for c in self.model.concepts], description="heatmap")
        self._prototype = widgets.Dropdown(options=[(f"max over {M}", -1)] + [(f"prototype {m}", m) for m in range(M)], description="of")
        self._smooth = widgets.ToggleButtons(options=[("smooth", True), ("cells", False)], style=widgets.ToggleButtonsStyle(button_width="auto"),
                                             tooltips=["bilinear between cell centres", "the feature cells as blocks"])
        colormaps = list(render.COLORMAPS) + ([self.view.colormap] if self.view.colormap not in render.COLORMAPS else [])
        self._colormap = widgets.Dropdown(options=colormaps, description="colours")
        self._opacity = widgets.FloatSlider(min=0.0, max=1.0, step=0.05, description="opacity", continuous_update=True)
        self._alpha = widgets.FloatSlider(
            # named by what it does: "alpha" alone meant nothing on screen to a clinician
            min=0.0, max=1.0, step=0.05, description="outside + boxes", continuous_update=False,
            tooltip="alpha (Eq. 13): how much regions outside positive boxes still count; 0 ignores them, 1 counts them fully",
        )
        for control in (self._concept, self._prototype, self._colormap):
            control.layout.width = "auto"
            control.style.description_width = "initial"
        self._alpha.style.description_width = "initial"
        for control, setting, read in (
            (self._concept, "concept", lambda v: v or None),
            (self._prototype, "prototype", lambda v: None if v < 0 else v),
            (self._smooth, "smooth", bool),
            (self._colormap, "colormap", str),
            (self._opacity, "opacity", float),
            (self._mode, "tool", str),
            (self._target, "target", str),
        ):
            control.observe(lambda change, setting=setting, read=read: self._on_view_control(setting, read(change["new"])), names="value")
        self._alpha.observe(self._on_alpha, names="value")
        view_controls = widgets.HBox([self._concept, self._prototype, self._smooth, self._colormap, self._opacity, self._alpha])
        view_controls.add_class("csr-view-controls")

        self.panel = SidePanel(self.model.concepts, self.model.classes, crops=self.atlas is not None,
                               on_toggle=self._on_concept_toggle, on_answer=self.answer)
        self.panel.layout = widgets.Layout(flex="1 1 300px", max_width="480px")
        hint = widgets.HTML(
            f'<div class="csr-hint"><span class="csr-keys-on">&#9679; keys active &middot; </span>'
            f'<span class="csr-keys-off">Point at the image to use keys. </span>{hint_line(html=True)}</div>'
        )
        image_column = widgets.VBox([self.canvas, self._layers.heat_source, self.panel.colour_bar, hint],
                                    layout=widgets.Layout(flex=f"0 1 {W}px", max_width="100%"))
        image_column.add_class("csr-view")
        main = widgets.HBox([image_column, self.panel])
        main.add_class("csr-main")
        self.children = [style_widget(), toolbar, main, view_controls]
        self.add_class("csr-explorer")

    def _target_options(self, concept: str | None) -> list[tuple[str, str]]:
        shown = f"{concept} only (c)" if concept else "the heatmap's concept (c)"
        return [("all concepts (a)", "all"), (shown, "shown")]

    def _focus(self) -> None:
        """Give the image the key focus. The page script (page.py) does it in the browser;
        this kernel-side fallback covers front ends where that script cannot run."""
        self.canvas.focus()

    # ------------------------------------------------------------------ events
    def _on_client_ready(self) -> None:
        self._layers.forget_client()
        self.redraw()

    def _on_view_control(self, setting: str, value) -> None:
        if not self._syncing:
            self.set_view(**{setting: value})

    def _on_concept_toggle(self, name: str, kept: bool) -> None:
        self.rejected = (self.state.rejected - {name}) if kept else (self.state.rejected | {name})

    def _on_alpha(self, change) -> None:
        if not self._syncing:
            self.alpha = change["new"]

    def _on_mouse_down(self, x: float, y: float) -> None:
        hit = box_at(self.state.boxes, self.geometry, x, y)
        if self.mode == "select":
            self._selected = hit
            self._drag = Drag("move", (x, y), (x, y), hit) if hit is not None else None
            self._sync_controls(self.state)
            self._draw_boxes()
        else:
            self._drag = Drag("draw", (x, y), (x, y))

    def _on_mouse_move(self, x: float, y: float) -> None:
        if not self._pointer_inside:  # the pointer entered the image: keys go to it
            self._pointer_inside = True
            self._focus()
        if self._drag is None:
            return  # hovering: nothing to do, nothing sent
        self._drag = self._drag.to(x, y)
        self._frames.request()

    def _drag_boxes(self, drag: Drag):
        return drag_boxes(self.state.boxes, drag, self.geometry, self.mode != "negative", self.view.box_concept)

    def _drag_frame(self) -> None:
        """One live frame: the model's answer as if the mouse were released now."""
        if self._drag is None:
            return
        boxes, index = self._drag_boxes(self._drag)
        self._show(replace(self.state, boxes=boxes), moving=index if self._drag.kind == "move" else None)

    def _on_mouse_up(self, x: float, y: float) -> None:
        if self._drag is None:
            return
        self._frames.cancel()
        drag = self._drag.to(x, y)
        boxes, index = self._drag_boxes(drag)
        self._drag = None
        with self._layers.batch():  # the live box gone, the exact new state drawn: one message
            if drag.kind == "draw" and index is None:
                self._selected = box_at(self.state.boxes, self.geometry, x, y)  # a click selects
            elif drag.kind == "draw":
                self._selected = None
            self._commit(replace(self.state, boxes=boxes))
            self._show()  # also when nothing changed: the live preview is replaced

    def _on_mouse_out(self, x: float, y: float) -> None:
        self._pointer_inside = False
        # The mouse-up may happen outside the canvas, where it is never reported: finish
        # the drag at the last position seen inside.
        if self._drag is not None:
            self._on_mouse_up(*self._drag.current)

    def _cancel_drag(self) -> None:
        if self._drag is not None:
            self._drag = None
            self._frames.cancel()
            self._show()

    def _on_key_down(self, key: str, shift: bool, ctrl: bool, meta: bool) -> None:
        action = action_for(key, shift, ctrl, meta)
        if action is not None:
            self.run_action(action)

