"""An interaction session as plain data: the state the user controls and its undo history."""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..model import Box, Interaction

FORMAT = "csr_widgets.explorer/2"  # /2: boxes may name a concept
READABLE_FORMATS = ("csr_widgets.explorer/1", FORMAT)  # sessions saved before still load


@dataclass(frozen=True)
class ExplorerState:
    """Everything the user changes that the model reasons with (hashable, comparable).

    boxes: in the user's image pixels (x0, y0, x1, y1), x1/y1 exclusive.
    alpha: None uses the model's config.alpha (Eq. 13).
    """

    boxes: tuple[Box, ...] = ()
    rejected: frozenset[str] = field(default_factory=frozenset)
    alpha: float | None = None

    def interaction(self, to_model) -> Interaction:
        """The Interaction for ``model.reason``, boxes mapped by ``to_model`` (image -> model)."""
        return Interaction(boxes=tuple(to_model(b) for b in self.boxes), rejected=self.rejected, alpha=self.alpha)

    def to_dict(self) -> dict:
        return {
            "boxes": [b.to_dict() for b in self.boxes],
            "rejected": sorted(self.rejected),
            "alpha": self.alpha,
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
        """Make ``state`` current; False (and nothing recorded) when it equals the current one."""
        if state == self.current:
            return False
        self._undo.append(self.current)
        self._redo.clear()
        self.current = state
        return True

    def undo(self) -> ExplorerState | None:
        if not self._undo:
            return None
        self._redo.append(self.current)
        self.current = self._undo.pop()
        return self.current

    def redo(self) -> ExplorerState | None:
        if not self._redo:
            return None
        self._undo.append(self.current)
        self.current = self._redo.pop()
        return self.current

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def __len__(self) -> int:
        return len(self._undo)


def session_dict(state: ExplorerState, image_size: tuple[int, int], concepts: list[str], classes: list[str], view: dict) -> dict:
    return {
        "format": FORMAT,
        "image_size": list(image_size),
        "concepts": list(concepts),
        "classes": list(classes),
        **state.to_dict(),
        "view": dict(view),
    }


def parse_session(data, concepts: list[str], image_size: tuple[int, int]) -> tuple[ExplorerState, dict]:
    """A saved session (JSON text or dict) -> (state, view settings), checked against the
    model's concepts and the image it is restored onto."""
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
    state = ExplorerState(boxes, frozenset(rejected), None if alpha is None else float(alpha))
    return state, dict(data.get("view", {}))
