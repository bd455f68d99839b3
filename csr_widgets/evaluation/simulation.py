"""The simulated clinician: an oracle user who corrects the model (DESIGN sections 3-4).

Three kinds of feedback, from the ground truth:

- ``"boxes"``: draw every ground-truth box as a positive box (Eqs. 12-13);
- ``"reject"``: reject every model concept that the ground truth says is absent;
- ``"both"``: the two together.

Two triggers: ``"review"`` acts only on the cases that the review rule flags
(``needs_review``: p(top-1) - p(top-2) < review_margin), as a clinician would; ``"all"``
acts on every case. A case is **touched** when the oracle has something to say about it
(it has a box to draw, or an absent concept to reject) and the trigger lets it act.

For speed each batch is encoded once; the feedback only re-runs ``reason`` (one call per
kind). Because ``reason`` treats the images of a batch independently, the review-triggered
prediction is the every-case prediction where the case is flagged and the unchanged
prediction elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..model.interaction import Box, Interaction
from . import metrics
from .report import _EvalMode, iterate_batches

ORACLE_KINDS = ("boxes", "reject", "both")
TRIGGERS = ("review", "all")


def oracle_interaction(concepts_true, boxes: Sequence[tuple], concepts: Sequence[str], kind: str,
                       image_size: tuple[int, int]) -> Interaction:
    """What the oracle user says about one image.

    concepts_true: (K,) 0/1 ground truth in the order of ``concepts`` (NaN = unknown: never
    rejected); boxes: ``(concept, x0, y0, x1, y1)`` ground-truth boxes in pixels;
    image_size: (H, W). Boxes are clipped to the image; empty ones are skipped. Every
    ground-truth box is drawn, whatever its concept: "look here" does not name a concept.
    """
    if kind not in ORACLE_KINDS:
        raise ValueError(f"kind must be one of {ORACLE_KINDS}, got {kind!r}.")
    H, W = image_size
    drawn: list[Box] = []
    if kind in ("boxes", "both"):
        for _, *coords in boxes:
            if metrics.box_pixels(coords, H, W) is None:
                continue
            clipped = Box(*(float(v) for v in coords)).clipped(W, H)
            if clipped is not None:
                drawn.append(clipped)
    rejected: set[str] = set()
    if kind in ("reject", "both"):
        truth = metrics._numpy(concepts_true).astype(float)
        rejected = {name for name, present in zip(concepts, truth) if present == 0}
    return Interaction(boxes=tuple(drawn), rejected=frozenset(rejected))


def oracle_predictions(model, encoding, concepts_true, boxes: Sequence[Sequence[tuple]],
                       kinds: Sequence[str] = ORACLE_KINDS) -> dict[str, np.ndarray]:
    """Predictions of one encoded batch without and with the oracle's feedback.

    encoding: ``model.encode(images)`` of B images; concepts_true: (B, K) in the model's
    concept order; boxes: B lists of ground-truth boxes. Returns (B,) arrays:
    ``prediction``, ``needs_review``, and for each kind ``touched/<kind>`` (the oracle has
    feedback for the case) and ``prediction/<kind>`` (the prediction with that feedback on
    every case; untouched cases keep ``prediction``).
    """
    B = len(encoding)
    base = model.reason(encoding)
    result = {
        "prediction": base.probs.argmax(-1).cpu().numpy(),
        "needs_review": base.needs_review.cpu().numpy(),
    }
    concepts_true = metrics._numpy(concepts_true)
    for kind in kinds:
        interactions = [oracle_interaction(concepts_true[b], boxes[b], model.concepts, kind, encoding.image_size) for b in range(B)]
        touched = np.array([not i.is_empty for i in interactions])
        prediction = result["prediction"].copy()
        if touched.any():
            # An empty Interaction leaves a case exactly as it was, so one call covers all.
            prediction = model.reason(encoding, interactions).probs.argmax(-1).cpu().numpy()
        result[f"touched/{kind}"] = touched
        result[f"prediction/{kind}"] = prediction
    return result


def simulate_interaction(model, dataset, batch_size: int = 32, kinds: Sequence[str] = ORACLE_KINDS,
                         progress: bool = True, num_workers: int = 0) -> pd.DataFrame:
    """Run the oracle user over a dataset; one row per image.

    Columns: index, label, prediction, needs_review, and per kind ``touched/<kind>`` and
    ``prediction/<kind>`` (feedback on every touched case; see ``oracle_predictions``).
    Summarise with ``interaction_gains``.
    """
    for kind in kinds:
        if kind not in ORACLE_KINDS:
            raise ValueError(f"kind must be one of {ORACLE_KINDS}, got {kind!r}.")
    frames = []
    with _EvalMode(model):
        for batch in iterate_batches(model, dataset, batch_size, progress, "simulate", num_workers):
            encoding = model.encode(batch.images)  # once; each kind only re-runs reason
            result = oracle_predictions(model, encoding, batch.concepts, batch.boxes, kinds)
            frames.append(pd.DataFrame({"index": batch.indices, "label": batch.labels.numpy(), **result}))
    frame = pd.concat(frames, ignore_index=True)
    frame.attrs.update(classes=list(model.classes), kinds=list(kinds))
    return frame


def interaction_gains(cases: pd.DataFrame, triggers: Sequence[str] = TRIGGERS) -> pd.DataFrame:
    """Macro F1 before/after the oracle's feedback, per trigger and kind.

    cases: ``simulate_interaction`` output. One row per (trigger, kind) with: cases,
    flagged (cases the review rule flags), touched (cases the oracle acted on), changed
    (predictions that changed), fixed / broken (wrong -> right / right -> wrong),
    macro_f1_before, macro_f1_after, gain (after - before), accuracy_before,
    accuracy_after.
    """
    kinds = [c.split("/", 1)[1] for c in cases.columns if c.startswith("touched/")]
    labels, before = cases["label"].to_numpy(), cases["prediction"].to_numpy()
    flagged = cases["needs_review"].to_numpy(bool)
    f1_before, acc_before = metrics.macro_f1(labels, before), metrics.accuracy(labels, before)
    rows = {}
    for trigger in triggers:
        if trigger not in TRIGGERS:
            raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}.")
        active = flagged if trigger == "review" else np.ones_like(flagged)
        for kind in kinds:
            touched = cases[f"touched/{kind}"].to_numpy(bool) & active
            after = np.where(touched, cases[f"prediction/{kind}"].to_numpy(), before)
            f1_after = metrics.macro_f1(labels, after)
            rows[(trigger, kind)] = {
                "cases": len(cases),
                "flagged": int(flagged.sum()),
                "touched": int(touched.sum()),
                "changed": int((after != before).sum()),
                "fixed": int(((before != labels) & (after == labels)).sum()),
                "broken": int(((before == labels) & (after != labels)).sum()),
                "macro_f1_before": f1_before,
                "macro_f1_after": f1_after,
                "gain": f1_after - f1_before,
                "accuracy_before": acc_before,
                "accuracy_after": metrics.accuracy(labels, after),
            }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["trigger", "kind"])
    return table
