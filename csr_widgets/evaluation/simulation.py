"""The simulated clinician: an oracle user who corrects the model (docs/method.md#evaluation).

Five kinds of feedback, from the ground truth:

- ``"boxes"``: draw every ground-truth box as a positive box for all concepts (the
  paper's box, Eqs. 12-13);
- ``"concept_boxes"``: draw each ground-truth box as a positive box for its own concept
  ("the nodule is here"; a box of a concept the model does not know stays a box for all);
- ``"reject"``: reject every model concept that the ground truth says is absent;
- ``"both"``: boxes and rejection together; ``"concept_both"``: concept boxes and rejection;
- ``"question"`` / ``"random_question"``: answer one "check this next" question
  (``csr_widgets.model.rank_questions``): the top-ranked one, or one drawn at random, as
  the measure of the ranking.

Two measures of what a single box does (``box_fidelity``): a true positive box should keep
its concept's score, and a negative box over a finding should move the concept's peak
off it. And on a model that learned a shortcut, ``shortcut_neutralisation`` draws a
negative box over the shortcut (a corner marker) on every image that has one.

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

from .._batching import iterate_batches
from .._distributed import current
from .._inference import evaluating
from ..model.interaction import Box, Interaction
from ..model.questions import Question, rank_questions
from . import metrics

ORACLE_KINDS = ("boxes", "concept_boxes", "reject", "both", "concept_both")
QUESTION_KINDS = ("question", "random_question")
TRIGGERS = ("review", "all")


def oracle_interaction(concepts_true, boxes: Sequence[tuple], concepts: Sequence[str], kind: str,
                       image_size: tuple[int, int]) -> Interaction:
    """What the oracle user says about one image.

    concepts_true: (K,) 0/1 ground truth in the order of ``concepts`` (NaN = unknown: never
    rejected); boxes: ``(concept, x0, y0, x1, y1)`` ground-truth boxes in pixels;
    image_size: (H, W). Boxes are clipped to the image; empty ones are skipped. Every
    ground-truth box is drawn, whatever its concept: for "boxes" "look here" names no
    concept, for "concept_boxes" it names the box's concept when the model has it.
    """
    if kind not in ORACLE_KINDS:
        raise ValueError(f"kind must be one of {ORACLE_KINDS}, got {kind!r}.")
    H, W = image_size
    drawn: list[Box] = []
    if kind != "reject":
        named = kind in ("concept_boxes", "concept_both")
        for concept, *coords in boxes:
            if metrics.box_pixels(coords, H, W) is None:
                continue
            concept = concept if named and concept in concepts else None
            clipped = Box(*(float(v) for v in coords), concept=concept).clipped(W, H)
            if clipped is not None:
                drawn.append(clipped)
    rejected: set[str] = set()
    if kind in ("reject", "both", "concept_both"):
        truth = metrics._numpy(concepts_true).astype(float)
        rejected = {name for name, present in zip(concepts, truth) if present == 0}
    return Interaction(boxes=tuple(drawn), rejected=frozenset(rejected))


def oracle_answer(question: Question, concepts_true, boxes: Sequence[tuple], concepts: Sequence[str]) -> Interaction | None:
    """The oracle's answer to a "check this next" question, as the Interaction it leads to
    (None: the answer changes nothing, or the truth is unknown).

    present: "no" when the ground truth says the concept is absent.
    location: "yes" when a ground-truth box of the concept overlaps the peak cell's
    pixels, "no" otherwise (also when the concept is absent).
    """
    k = list(concepts).index(question.concept)
    present = float(metrics._numpy(concepts_true)[k])
    if np.isnan(present):
        return None
    if question.kind == "present":
        return question.if_no if present == 0 else None
    x0, y0, x1, y1 = question.region
    there = any(c == question.concept and bx0 < x1 and x0 < bx1 and by0 < y1 and y0 < by1
                for c, bx0, by0, bx1, by1 in boxes)
    return question.if_yes if there else question.if_no


def oracle_predictions(model, encoding, concepts_true, boxes: Sequence[Sequence[tuple]],
                       kinds: Sequence[str] = ORACLE_KINDS, seed: int = 0) -> dict[str, np.ndarray]:
    """Predictions of one encoded batch without and with the oracle's feedback.

    encoding: ``model.encode(images)`` of B images; concepts_true: (B, K) in the model's
    concept order; boxes: B lists of ground-truth boxes. Returns (B,) arrays:
    ``prediction``, ``needs_review``, and for each kind ``touched/<kind>`` (the oracle has
    feedback for the case) and ``prediction/<kind>`` (the prediction with that feedback on
    every case; untouched cases keep ``prediction``). Kinds "question" and
    "random_question" answer one "check this next" question: the top-ranked one, or one
    drawn uniformly (``seed``).
    """
    B = len(encoding)
    base = model.reason(encoding)
    result = {
        "prediction": base.probs.argmax(-1).cpu().numpy(),
        "needs_review": base.needs_review.cpu().numpy(),
    }
    concepts_true = metrics._numpy(concepts_true)
    rng = np.random.default_rng(seed)
    for kind in kinds:
        if kind in QUESTION_KINDS:
            interactions = []
            for b in range(B):
                questions = rank_questions(model, encoding[b])
                question = questions[0] if kind == "question" else questions[rng.integers(len(questions))]
                interactions.append(oracle_answer(question, concepts_true[b], boxes[b], model.concepts) or Interaction())
        else:
            interactions = [oracle_interaction(concepts_true[b], boxes[b], model.concepts, kind, encoding.image_size) for b in range(B)]
        touched = np.array([not i.is_empty for i in interactions])
        prediction = result["prediction"].copy()
        if touched.any():
            # An empty Interaction leaves a case exactly as it was, so one call covers all.
            prediction = model.reason(encoding, interactions).probs.argmax(-1).cpu().numpy()
        result[f"touched/{kind}"] = touched
        result[f"prediction/{kind}"] = prediction
    return result


def simulate_interaction(model, dataset, batch_size: int = 32, kinds: Sequence[str] = ORACLE_KINDS + QUESTION_KINDS,
                         progress: bool = True, num_workers: int = 0) -> pd.DataFrame:
    """Run the oracle user over a dataset; one row per image.

    Columns: index, label, prediction, needs_review, and per kind ``touched/<kind>`` and
    ``prediction/<kind>`` (feedback on every touched case; see ``oracle_predictions``).
    Summarise with ``interaction_gains``.
    """
    for kind in kinds:
        if kind not in ORACLE_KINDS + QUESTION_KINDS:
            raise ValueError(f"kind must be one of {ORACLE_KINDS + QUESTION_KINDS}, got {kind!r}.")
    frames = []
    group = current()  # with several processes, each simulates its share and the rows are gathered
    with evaluating(model):
        for batch in iterate_batches(model, dataset, batch_size, progress and group.is_main, "simulate", num_workers,
                                     rows=group.shard(len(dataset), batch_size)):
            encoding = model.encode(batch.images)  # once; each kind only re-runs reason
            result = oracle_predictions(model, encoding, batch.concepts, batch.boxes, kinds, seed=int(batch.indices[0]))
            frames.append(pd.DataFrame({"index": batch.indices, "label": batch.labels.numpy(), **result}))
    frame = group.gather_frame(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
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


# --------------------------------------------------------------------------- single boxes
def box_fidelity(model, dataset, batch_size: int = 32, progress: bool = True, num_workers: int = 0) -> pd.DataFrame:
    """What one true box does to its own concept; one row per ground-truth box of a model concept.

    Columns: index (image), concept, width_cells / height_cells (box size on the feature
    grid), kept (the concept's score, max over its prototypes, with the box drawn as a
    positive box, divided by the score without it), peak_on_before (the concept's
    saliency peaks in the box without interaction: the Pointing Game's hit rule, tolerance
    0), peak_off_after (it peaks outside the box once the box is drawn as a negative box).
    """
    rows = []
    group = current()
    with evaluating(model):
        for batch in iterate_batches(model, dataset, batch_size, progress and group.is_main, "box fidelity", num_workers,
                                     rows=group.shard(len(dataset), batch_size)):
            encoding = model.encode(batch.images)
            H, W = encoding.image_size
            pairs = [(b, concept, tuple(float(v) for v in coords)) for b, boxes in enumerate(batch.boxes)
                     for concept, *coords in boxes
                     if concept in model.concepts and metrics.box_pixels(coords, H, W) is not None]
            if not pairs:
                continue
            images = [b for b, _, _ in pairs]
            concepts = [model.concepts.index(c) for _, c, _ in pairs]
            sub = encoding[images]
            before = model.reason(sub)
            positive = model.reason(sub, [Interaction(boxes=(Box(*xyxy).clipped(W, H),)) for _, _, xyxy in pairs])
            negative = model.reason(sub, [Interaction(boxes=(Box(*xyxy, positive=False).clipped(W, H),)) for _, _, xyxy in pairs])
            own = np.arange(len(pairs)), concepts
            kept = _concept_scores(model, positive.scores)[own] / np.maximum(_concept_scores(model, before.scores)[own], 1e-12)
            on_before = _peak_in_box(model, before.similarity_maps, (H, W), concepts, pairs)
            on_after = _peak_in_box(model, negative.similarity_maps, (H, W), concepts, pairs)
            stride = model.grid.stride
            for i, (b, concept, (x0, y0, x1, y1)) in enumerate(pairs):
                rows.append({"index": int(batch.indices[b]), "concept": concept,
                             "width_cells": (x1 - x0) / stride, "height_cells": (y1 - y0) / stride,
                             "kept": float(kept[i]), "peak_on_before": bool(on_before[i]), "peak_off_after": not on_after[i]})
    return group.gather_frame(pd.DataFrame(rows, columns=["index", "concept", "width_cells", "height_cells", "kept",
                                                          "peak_on_before", "peak_off_after"]))


def fidelity_summary(frame: pd.DataFrame, max_cells: float = 1.5) -> pd.DataFrame:
    """Per concept and overall: boxes, mean and 5th percentile of ``kept`` for lesions at
    most ``max_cells`` wide and high, and the share of negative boxes that moved the peak
    off the finding (over all boxes, and over those whose peak was on it before)."""
    small = frame[(frame["width_cells"] <= max_cells) & (frame["height_cells"] <= max_cells)]

    def summary(rows: pd.DataFrame, small_rows: pd.DataFrame) -> dict:
        on = rows[rows["peak_on_before"].astype(bool)]  # (an empty column is object: pandas would read it as names)
        return {"boxes": len(rows), f"small (<= {max_cells:g} cells)": len(small_rows),
                "kept (small, mean)": small_rows["kept"].mean(), "kept (small, 5th pct)": small_rows["kept"].quantile(0.05),
                "peak moved off": rows["peak_off_after"].mean(), "peak moved off (was on)": on["peak_off_after"].mean()}

    table = {c: summary(frame[frame["concept"] == c], small[small["concept"] == c]) for c in frame["concept"].unique()}
    table["overall"] = summary(frame, small)
    return pd.DataFrame.from_dict(table, orient="index")


def _concept_scores(model, scores) -> np.ndarray:
    """(B, K) the best active prototype's score of each concept."""
    mask = model.prototype_mask.to(scores.device)
    return scores.masked_fill(~mask, -np.inf).amax(-1).cpu().numpy()


def _peak_in_box(model, similarity_maps, image_size, concepts: list[int], pairs) -> np.ndarray:
    """(P,) bool: concept ``concepts[i]``'s map peaks inside pair i's box, the point located
    as the Pointing Game locates it (``metrics.concept_points``, tolerance 0). A map without
    any positive similarity points nowhere: not inside."""
    rows = np.arange(len(pairs))
    best, dead = metrics.concept_maps(similarity_maps, model.prototype_mask)
    own = best[rows, concepts]  # (P, h, w): pair i's concept in pair i's image
    points = model.grid.peak_pixels(own, tuple(image_size)).cpu().numpy()
    pointing = ((own.flatten(1).amax(1) > 0) & ~dead[rows, concepts]).cpu().numpy()
    H, W = image_size
    return np.array([bool(pointing[i]) and metrics.distance_to_boxes(points[i], [xyxy], H, W) == 0
                     for i, (_, _, xyxy) in enumerate(pairs)])


# --------------------------------------------------------------------------- shortcuts
class NoShortcutError(ValueError):
    """The dataset has no image with a shortcut box (a decorrelated split without markers)."""


def shortcut_neutralisation(model, dataset, shortcut_class: str, batch_size: int = 32, progress: bool = True,
                            num_workers: int = 0, margin: float | None = None) -> pd.Series:
    """A negative box over the shortcut (an item's ``shortcut_box``) on every image that has one.

    margin: pixels added around the shortcut's tight box, as a user draws a box *over* a
    marker rather than along its letters; default one feature cell (``model.grid.stride``),
    the tolerance shortcut detection uses for the same reason: the maps of prototypes that
    learned a marker a few pixels tall peak on its cell or the next one
    (docs/decisions.md#shortcut-negative-box).

    dataset: typically the decorrelated split (``SyntheticCXR.decorrelate()``). Returns the
    share of images predicted as ``shortcut_class`` with the shortcut (before and after
    the box) and without it, and macro F1 over all images before and after. A box can
    neutralise a shortcut (the share on shortcut images falls to the share on the others);
    it cannot teach the model the findings it never learned (F1 recovers little).
    """
    if shortcut_class not in model.classes:
        raise ValueError(f"shortcut_class {shortcut_class!r} is not one of the model's classes {list(model.classes)}.")
    target = list(model.classes).index(shortcut_class)
    margin = float(model.grid.stride) if margin is None else float(margin)
    labels, before, after, has = [], [], [], []
    with evaluating(model):
        for batch in iterate_batches(model, dataset, batch_size, progress, "shortcut box", num_workers):
            encoding = model.encode(batch.images)
            H, W = encoding.image_size
            interactions = [Interaction(boxes=(_grown(box, margin).clipped(W, H),)) if box is not None else Interaction()
                            for box in batch.shortcut_boxes]
            before.append(model.reason(encoding).prediction.cpu().numpy())
            after.append(model.reason(encoding, interactions).prediction.cpu().numpy())
            labels.append(batch.labels.numpy())
            has.append(np.array([box is not None for box in batch.shortcut_boxes]))
    labels, before, after, has = (np.concatenate(v) for v in (labels, before, after, has))
    if not has.any():
        raise NoShortcutError("No image of the dataset has a shortcut_box: nothing to draw a negative box over.")
    return pd.Series({
        "images with the shortcut": int(has.sum()),
        "images without": int((~has).sum()),
        f"predicted {shortcut_class}, with shortcut, before": float((before[has] == target).mean()),
        f"predicted {shortcut_class}, with shortcut, negative box": float((after[has] == target).mean()),
        f"predicted {shortcut_class}, without shortcut": float((before[~has] == target).mean()) if (~has).any() else np.nan,
        "macro F1 before": metrics.macro_f1(labels, before),
        "macro F1 with the negative box": metrics.macro_f1(labels, after),
    })


def _grown(box, margin: float) -> Box:
    """A negative box ``margin`` pixels wider than ``box`` (x0, y0, x1, y1) on every side."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return Box(x0 - margin, y0 - margin, x1 + margin, y1 + margin, positive=False)
