"""An explorer's state as plain data: what the user controls, and its undo history.

``ExplorerState`` is the one value object an explorer draws from: the interaction (boxes,
rejections, alpha), the questions answered, and ``ViewSettings`` (how it is shown). The
widgets never read their own values back: a control's change makes a new state, and the
explorer shows the state (docs/decisions.md#explorer-state).
"""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace

from ..model import Box, Interaction
from .render import DEFAULT_COLORMAP

FORMAT = "csr_widgets.explorer/2"  # /2: boxes may name a concept
READABLE_FORMATS = ("csr_widgets.explorer/1", FORMAT)  # sessions saved before still load
TOOLS = ("positive", "negative", "select")  # what a drag on the image does
TARGETS = ("all", "shown")  # what a new box acts on: every concept, or the heatmap's concept


@dataclass(frozen=True)
class ViewSettings:
    """How the explorer shows the reasoning; none of it changes the model's answer.

    concept: the concept whose heatmap is shown (None: no heatmap).
    prototype: one prototype's map, or None for the max over the concept's M prototypes.
    smooth: bilinear between cell centres (True) or the cells as blocks (False).
    colormap, opacity, fade: heatmap colours, layer opacity, low similarity transparent.
    tool: what a drag does ("positive" / "negative": draw a box, "select": move one).
    target: what a new box acts on: "all" concepts, or the "shown" heatmap's concept only.
    """

    concept: str | None = None
    prototype: int | None = None
    smooth: bool = True
    colormap: str = DEFAULT_COLORMAP
    opacity: float = 0.6
    fade: bool = True
    tool: str = "positive"
    target: str = "all"

    def __post_init__(self) -> None:
        if self.tool not in TOOLS:
            raise ValueError(f"tool (mode) must be one of {TOOLS}, got {self.tool!r}.")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS} (all concepts, or the heatmap's concept), got {self.target!r}.")
        if not 0.0 <= self.opacity <= 1.0:
            raise ValueError(f"opacity must lie in [0, 1], got {self.opacity}.")

    @property
    def box_concept(self) -> str | None:
        """The concept a new box acts on (None: all concepts)."""
        return self.concept if self.target == "shown" else None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ViewSettings":
        """Settings saved by ``to_dict``; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ExplorerState:
    """Everything the user sets (hashable, comparable).

    boxes: in the user's image pixels (x0, y0, x1, y1), x1/y1 exclusive.
    rejected: names of the rejected concepts.
    alpha: None uses the model's config.alpha (Eq. 13).
    answered: ("present" | "location", concept) of the "check next" questions answered,
        so that a "yes" (which may change nothing) is not asked again.
    view: how it is shown (not part of the undo history: undo restores what the model
        reasons with and keeps the view).
    """

    boxes: tuple[Box, ...] = ()
    rejected: frozenset[str] = field(default_factory=frozenset)
    alpha: float | None = None
    answered: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    view: ViewSettings = field(default_factory=ViewSettings)

    @property
    def reasoning_key(self) -> tuple:
        """What ``model.reason`` depends on: equal keys, equal results."""
        return self.boxes, self.rejected, self.alpha

    @property
    def undoable(self) -> tuple:
        return self.boxes, self.rejected, self.alpha, self.answered

    def interaction(self, to_model) -> Interaction:
        """The Interaction for ``model.reason``, boxes mapped by ``to_model`` (image -> model)."""
        return Interaction(boxes=tuple(to_model(b) for b in self.boxes), rejected=self.rejected, alpha=self.alpha)

    def to_dict(self) -> dict:
        return {
            "boxes": [b.to_dict() for b in self.boxes],
            "rejected": sorted(self.rejected),
            "alpha": self.alpha,
            "answered": [list(a) for a in sorted(self.answered)],
        }


BOX_KEYS = ("x0", "y0", "x1", "y1", "positive", "concept")


def as_boxes(boxes) -> tuple[Box, ...]:
    """Boxes given as Box, dicts, or sequences (x0, y0, x1, y1[, positive[, concept]]) -> tuple of Box."""
    if isinstance(boxes, (Box, Mapping)):
        boxes = [boxes]
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Iterable):
        raise TypeError(f"boxes must be a list of Box (or dicts / (x0, y0, x1, y1[, positive[, concept]]) tuples), got {type(boxes).__name__}.")
    out = []
    for item in boxes:
        if isinstance(item, Box):
            out.append(item)
        elif isinstance(item, Mapping):
            unknown = set(item) - set(BOX_KEYS)
            if unknown or not set(BOX_KEYS[:4]) <= set(item):
                raise ValueError(f"A box dict needs keys x0, y0, x1, y1 (and optionally positive, concept), got {sorted(item)}.")
            out.append(Box(item["x0"], item["y0"], item["x1"], item["y1"], bool(item.get("positive", True)), item.get("concept")))
        elif isinstance(item, (tuple, list)) and 4 <= len(item) <= 6:
            positive = bool(item[4]) if len(item) > 4 else True
            out.append(Box(*item[:4], positive=positive, concept=item[5] if len(item) > 5 else None))
        else:
            raise ValueError(
                f"Cannot read a box from {item!r}: give Box(x0, y0, x1, y1, positive, concept), a dict, or a "
                "tuple (x0, y0, x1, y1[, positive[, concept]]) in image pixels."
            )
    return tuple(out)


class History:
    """Undo/redo over immutable states, bounded so that long sessions keep memory flat."""

    def __init__(self, initial: ExplorerState, limit: int = 200):
        if limit < 1:
            raise ValueError(f"The history limit must be >= 1, got {limit}.")
        self._undo: deque[ExplorerState] = deque(maxlen=limit)
        self._redo: list[ExplorerState] = []
        self.current = initial

    def push(self, state: ExplorerState) -> bool:
        """Make ``state`` current; False when it equals the current one. Only a change of
        what the model reasons with is an undo step; a view change replaces the current
        state in place (pressing z never changes the colours)."""
        if state == self.current:
            return False
        if state.undoable != self.current.undoable:
            self._undo.append(self.current)
            self._redo.clear()
        self.current = state
        return True

    def undo(self) -> ExplorerState | None:
        return self._step(self._undo, self._redo)

    def redo(self) -> ExplorerState | None:
        return self._step(self._redo, self._undo)

    def _step(self, source, target) -> ExplorerState | None:
        """Move one state from ``source`` to current, keeping the current view."""
        if not source:
            return None
        target.append(self.current)
        self.current = replace(source.pop(), view=self.current.view)
        return self.current

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def __len__(self) -> int:
        return len(self._undo)


def session_dict(state: ExplorerState, image_size: tuple[int, int], concepts: list[str], classes: list[str]) -> dict:
    return {
        "format": FORMAT,
        "image_size": list(image_size),
        "concepts": list(concepts),
        "classes": list(classes),
        **state.to_dict(),
        "view": state.view.to_dict(),
    }


def parse_session(data, concepts: list[str], image_size: tuple[int, int]) -> ExplorerState:
    """A saved session (JSON text or dict) -> the state, checked against the model's
    concepts and the image it is restored onto."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise ValueError(f"The session is not valid JSON: {error}.") from None
    if not isinstance(data, Mapping):
        raise TypeError(f"A session is a JSON object (dict), got {type(data).__name__}.")
    if data.get("format") not in READABLE_FORMATS:
        raise ValueError(f"Not a CSRExplorer session: format {data.get('format')!r}, expected {FORMAT!r}.")
    if list(data.get("concepts", [])) != list(concepts):
        raise ValueError(f"The session was saved for concepts {data.get('concepts')}, but this model has {concepts}.")
    if tuple(data.get("image_size", ())) != tuple(image_size):
        saved = data.get("image_size")
        raise ValueError(
            f"The session was saved for an image of {saved[1]}x{saved[0]} pixels (W x H), but this image is "
            f"{image_size[1]}x{image_size[0]}: its boxes would not mean the same places."
            if isinstance(saved, list) and len(saved) == 2
            else f"The session has no valid image_size (got {saved!r})."
        )
    rejected = data.get("rejected", [])
    unknown = sorted(set(rejected) - set(concepts))
    if unknown:
        raise ValueError(f"The session rejects unknown concepts {unknown}.")
    boxes = as_boxes(data.get("boxes", []))
    unknown = sorted({b.concept for b in boxes if b.concept is not None} - set(concepts))
    if unknown:
        raise ValueError(f"The session has boxes for unknown concepts {unknown}.")
    alpha = data.get("alpha")
    answered = frozenset(tuple(a) for a in data.get("answered", []))  # absent before /2 sessions had it
    view = ViewSettings.from_dict(data.get("view", {}))
    named = {c for _, c in answered} | ({view.concept} if view.concept is not None else set())
    unknown = sorted(named - set(concepts))
    if unknown:
        raise ValueError(f"The session names unknown concepts {unknown}.")
    return ExplorerState(boxes, frozenset(rejected), None if alpha is None else float(alpha), answered, view)
