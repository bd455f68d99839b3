"""evaluate(): one row per image; summaries; the paper-style Tables 1-4 as text.

``evaluate`` runs a model over a dataset (batched, on the model's device, under
``torch.inference_mode``) and returns a pandas DataFrame with one row per image:

==========================  ===============================================================
column                      meaning
==========================  ===============================================================
index                       position in the dataset
label, prediction           class indices (model class order); correct: prediction == label
needs_review                the review rule (p(top-1) - p(top-2) < review_margin)
out_of_distribution         the image is unlike the training images (model/novelty.py)
margin                      p(top-1) - p(top-2)
has_shortcut                the item has a ``shortcut_box`` (SyntheticCXR)
prob/<class>                class probabilities
concept/<c>                 ground-truth concept (0/1; NaN if the dataset lacks it)
concept_prob/<c>            sigmoid of the concept head's logit
point_y/<c>, point_x/<c>    pixel of the peak of the concept's map (sub-cell, see metrics.py)
distance/<c>                pixels from that point to the nearest box of c (NaN: not evaluated)
hit@<t>/<c>                 Pointing Game at tolerance t: 1 / 0 / NaN (not evaluated)
shortcut@<t>/<c>            the evaluated point lies within t px of the shortcut box
energy/<c>                  energy-based Pointing Game
==========================  ===============================================================

With an ``interaction`` the pointing columns use the similarity maps after the
importance map A (what the user sees); without one they are the raw maps.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .._batching import Batch, iterate_batches
from .._distributed import current
from .._inference import evaluating
from ..model.interaction import Interaction
from . import metrics
from .simulation import box_fidelity, fidelity_summary, interaction_gains, simulate_interaction

DEFAULT_TOLERANCES = (0, 15)
# Upper bound on the elements of one saliency tensor (B', K, H, W) held at a time: 64 MB.
SALIENCY_ELEMENTS = 2**24


def _interactions_for(interaction, indices: np.ndarray):
    if interaction is None or isinstance(interaction, Interaction):
        return interaction
    if callable(interaction):
        return [interaction(int(i)) for i in indices]
    return [interaction[int(i)] for i in indices]


# --------------------------------------------------------------------------- evaluate
def evaluate(model, dataset, batch_size: int = 32,
             interaction: Interaction | Sequence[Interaction] | Callable[[int], Interaction] | None = None,
             tolerances: Sequence[float] = DEFAULT_TOLERANCES, progress: bool = True, num_workers: int = 0,
             prototype_mask: torch.Tensor | None = None) -> pd.DataFrame:
    """Run ``model`` over ``dataset``; one row per image (columns: module docstring).

    interaction: None, one Interaction for every image, a sequence with one per dataset
    image, or a callable ``index -> Interaction``. prototype_mask: (K, M) bool used for the
    concept saliency instead of ``model.prototype_mask`` (e.g. to score a refinement
    without touching the model). The frame's ``attrs`` hold concepts, classes, tolerances.
    """
    concepts, classes = list(model.concepts), list(model.classes)
    mask = model.prototype_mask if prototype_mask is None else prototype_mask
    if tuple(mask.shape) != tuple(model.prototype_mask.shape):
        raise ValueError(f"prototype_mask must have shape {tuple(model.prototype_mask.shape)}, got {tuple(mask.shape)}.")
    rows: list[pd.DataFrame] = []
    group = current()  # with several processes, each evaluates its share and the rows are gathered
    with evaluating(model):
        for batch in iterate_batches(model, dataset, batch_size, progress and group.is_main, "evaluate", num_workers,
                                     rows=group.shard(len(dataset), batch_size)):
            encoding = model.encode(batch.images)
            out = model.reason(encoding, _interactions_for(interaction, batch.indices))
            pointing, energy = _point(model, out.similarity_maps, encoding.image_size, mask, batch)
            probs = out.probs.float().cpu().numpy()
            top = np.sort(probs, axis=1)[:, ::-1]
            frame = {
                "index": batch.indices,
                "label": batch.labels.numpy(),
                "prediction": probs.argmax(1),
                "needs_review": out.needs_review.cpu().numpy(),
                "out_of_distribution": out.out_of_distribution.cpu().numpy(),
                "margin": top[:, 0] - top[:, 1],
                "has_shortcut": np.array([b is not None for b in batch.shortcut_boxes]),
            }
            frame.update({f"prob/{c}": probs[:, n] for n, c in enumerate(classes)})
            concept_true = batch.concepts.numpy()
            concept_prob = out.concept_probs.float().cpu().numpy()
            for k, c in enumerate(concepts):
                frame[f"concept/{c}"] = concept_true[:, k]
                frame[f"concept_prob/{c}"] = concept_prob[:, k]
                frame[f"point_y/{c}"] = pointing.points[:, k, 0]
                frame[f"point_x/{c}"] = pointing.points[:, k, 1]
                frame[f"distance/{c}"] = pointing.distance[:, k]
                for t in tolerances:
                    frame[f"hit@{t:g}/{c}"] = pointing.hits(t)[:, k]
                    frame[f"shortcut@{t:g}/{c}"] = pointing.on_shortcut(t)[:, k]
                frame[f"energy/{c}"] = energy[:, k]
            rows.append(pd.DataFrame(frame))
    result = group.gather_frame(pd.concat(rows, ignore_index=True) if rows else pd.DataFrame())
    result.insert(3, "correct", result["label"] == result["prediction"])
    result.attrs.update(concepts=concepts, classes=classes, tolerances=[float(t) for t in tolerances])
    return result


def _point(model, similarity_maps: torch.Tensor, image_size: tuple[int, int], mask: torch.Tensor,
           batch: Batch) -> tuple[metrics.Pointing, np.ndarray]:
    """Pointing Game and energy for a batch, a few images at a time: saliency at image size
    is (B, K, H, W), which for 512 px images and 14 concepts is ~15 MB per image."""
    B, K = similarity_maps.shape[:2]
    step = max(1, SALIENCY_ELEMENTS // (K * image_size[0] * image_size[1]))
    pointings, energies = [], []
    for start in range(0, B, step):
        part = slice(start, start + step)
        saliency = metrics.concept_saliency(similarity_maps[part], model.grid, image_size, mask)
        points = metrics.concept_points(similarity_maps[part], model.grid, image_size, mask)
        pointings.append(metrics.point_concepts(saliency, batch.boxes[part], model.concepts, batch.shortcut_boxes[part], points))
        energies.append(metrics.energy_pointing(saliency, batch.boxes[part], model.concepts))
    pointing = metrics.Pointing(*(np.concatenate([getattr(p, f) for p in pointings]) for f in ("points", "distance", "shortcut_distance")))
    return pointing, np.concatenate(energies)


def _names(frame: pd.DataFrame, prefix: str) -> list[str]:
    return [c.split("/", 1)[1] for c in frame.columns if c.startswith(prefix + "/")]


def _tolerances(frame: pd.DataFrame) -> list[float]:
    found = sorted({float(c[4:].split("/", 1)[0]) for c in frame.columns if c.startswith("hit@")})
    return found


# --------------------------------------------------------------------------- summaries
def classification_summary(frame: pd.DataFrame) -> pd.Series:
    """accuracy, macro_f1, f1/<class>, concept_auc (mean over concepts), review_rate."""
    classes = frame.attrs.get("classes") or _names(frame, "prob")
    labels, predictions = frame["label"].to_numpy(), frame["prediction"].to_numpy()
    summary = {
        "images": len(frame),
        "accuracy": metrics.accuracy(labels, predictions),
        "macro_f1": metrics.macro_f1(labels, predictions),
    }
    for name, f1 in zip(classes, metrics.per_class_f1(labels, predictions, len(classes))):
        summary[f"f1/{name}"] = f1
    summary["concept_auc"] = metrics.mean_auc(concept_auc_summary(frame))
    summary["review_rate"] = float(frame["needs_review"].mean())
    if "out_of_distribution" in frame:
        summary["ood_rate"] = float(frame["out_of_distribution"].mean())
    return pd.Series(summary)


def concept_auc_summary(frame: pd.DataFrame) -> pd.Series:
    """ROC AUC of the concept head per concept (NaN when a concept has a single class)."""
    concepts = _names(frame, "concept")
    truth = frame[[f"concept/{c}" for c in concepts]].to_numpy(float)
    scores = frame[[f"concept_prob/{c}" for c in concepts]].to_numpy(float)
    return pd.Series(metrics.concept_auc(truth, scores), index=pd.Index(concepts, name="concept"), name="auc")


def pointing_summary(frame: pd.DataFrame, tolerances: Sequence[float] | None = None) -> pd.DataFrame:
    """Pointing Game per concept and "overall" (pooled), from an ``evaluate`` frame.

    Columns: evaluated, pg@<t> and shortcut@<t> for each tolerance, energy (mean over the
    evaluated pairs).
    """
    concepts = _names(frame, "distance")
    tolerances = _tolerances(frame) if tolerances is None else list(tolerances)
    distance = frame[[f"distance/{c}" for c in concepts]].to_numpy(float)
    table = pd.DataFrame(index=pd.Index(concepts + ["overall"], name="concept"))
    table["evaluated"] = metrics.pointing_game(distance, concepts)["evaluated"]
    for t in tolerances:
        table[f"pg@{t:g}"] = metrics.pointing_game(distance, concepts, t)["pointing_game"]
        column = [f"shortcut@{t:g}/{c}" for c in concepts]
        if all(c in frame for c in column):
            # 1/0 per evaluated pair on an image with a shortcut, NaN elsewhere.
            landed = frame[column].to_numpy(float)
            counted = ~np.isnan(landed)
            n = np.append(counted.sum(0), counted.sum())
            s = np.append(np.nansum(landed, 0), np.nansum(landed))
            table[f"shortcut@{t:g}"] = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    table = table[["evaluated"] + [c for c in table if c.startswith("pg@")] + [c for c in table if c.startswith("shortcut@")]]
    energy = frame[[f"energy/{c}" for c in concepts]].to_numpy(float)
    with warnings.catch_warnings():  # "mean of empty slice" for a concept never evaluated
        warnings.simplefilter("ignore", RuntimeWarning)
        table["energy"] = np.append(np.nanmean(energy, 0), np.nanmean(energy)) if energy.size else np.nan
    return table


# --------------------------------------------------------------------------- tables
PAPER_REFERENCE = (
    "Paper (CSR, CVPR 2025): macro F1 TBX11K 94.4, VinDr-CXR 54.6, ISIC 71.5; "
    "Pointing Game 60.9 (79.5 after atlas refinement); interaction +0.3 to +0.7 F1."
)


def _render(table: pd.DataFrame, markdown: bool) -> str:
    if markdown:
        return table.to_markdown(floatfmt=".1f")  # pandas needs tabulate (a dependency) for this
    return table.to_string(float_format=lambda v: f"{v:.1f}")


def format_tables(frame: pd.DataFrame, gains: pd.DataFrame | None = None, refined: pd.DataFrame | None = None,
                  markdown: bool = False, title: str | None = None, fidelity: pd.DataFrame | None = None) -> str:
    """Tables 1-4 as text from precomputed results (percentages, one decimal).

    frame: ``evaluate`` output; gains: ``simulation.interaction_gains`` output; refined: an
    ``evaluate`` frame of the refined (pruned) model on the same data, for Table 2's
    "after" columns; fidelity: ``simulation.box_fidelity`` output, for Table 4.
    """
    parts = [title] if title else []
    summary = classification_summary(frame)
    classes = frame.attrs.get("classes") or _names(frame, "prob")
    table1 = pd.DataFrame(
        {"images": [int(summary["images"])], "accuracy": [100 * summary["accuracy"]],
         "macro F1": [100 * summary["macro_f1"]],
         **{f"F1 {c}": [100 * summary[f"f1/{c}"]] for c in classes},
         "concept AUC": [100 * summary["concept_auc"]], "review rate": [100 * summary["review_rate"]],
         **({"out of distribution": [100 * summary["ood_rate"]]} if "ood_rate" in summary else {})},
        index=pd.Index(["CSR (this model)"], name="model"),
    )
    parts += ["Table 1. Classification (%)", _render(table1, markdown), ""]

    before = pointing_summary(frame)
    columns = {"evaluated": "n"} | {c: c.replace("pg@", "PG@").replace("shortcut@", "on shortcut@") for c in before if c != "evaluated"}
    table2 = before.rename(columns=columns)
    for c in table2.columns[1:]:
        table2[c] = 100 * table2[c]
    if refined is not None:
        after = pointing_summary(refined)
        table2 = pd.concat({"before": table2, "after refinement": (100 * after.drop(columns="evaluated")).rename(columns=columns)}, axis=1)
    parts += ["Table 2. Pointing Game (%, tolerance in px; energy = share of positive saliency in the boxes)",
              _render(table2, markdown), ""]

    if gains is not None:
        table3 = gains[["cases", "flagged", "touched", "changed", "macro_f1_before", "macro_f1_after", "gain"]].copy()
        for c in ("macro_f1_before", "macro_f1_after", "gain"):
            table3[c] = 100 * table3[c]
        table3 = table3.rename(columns={"macro_f1_before": "F1 before", "macro_f1_after": "F1 after", "gain": "gain"})
        parts += ["Table 3. Simulated interaction (oracle user; macro F1 %, gain in points). Kinds: boxes = true boxes "
                  "for all concepts (the paper's), concept_boxes = each for its own concept, reject = absent concepts "
                  "rejected, both / concept_both = with rejection, question / random_question = one 'check this next' "
                  "question answered (the top-ranked one / a random one)", _render(table3, markdown), ""]
    if fidelity is not None:
        summary = fidelity_summary(fidelity)
        table4 = 100 * summary[["kept (small, mean)", "kept (small, 5th pct)", "peak moved off"]]
        table4.insert(0, "boxes", summary["boxes"])
        parts += ["Table 4. One true box (%): the share of its concept's score a positive box keeps on lesions "
                  "<= 1.5 cells wide, and how often a negative box moves the concept's peak off the finding",
                  _render(table4, markdown), ""]
    parts.append(PAPER_REFERENCE)
    return "\n".join(parts)


def paper_tables(model, dataset, *, refined=None, batch_size: int = 32, tolerances: Sequence[float] = DEFAULT_TOLERANCES,
                 simulate: bool = True, progress: bool = False, markdown: bool = False, num_workers: int = 0) -> str:
    """Evaluate ``model`` on ``dataset`` and return Tables 1-4 as text (for ``csr-widgets evaluate``).

    refined: the refinement whose Pointing Game fills Table 2's "after" columns: a (K, M)
    bool prototype mask, or a model of the same architecture whose ``prototype_mask`` is
    used (the Pointing Game does not depend on the task head, so a refit is not needed).
    simulate: also run the oracle user for Tables 3 and 4 (two more passes over the data).
    num_workers: DataLoader workers reading the images. Under torchrun every pass is split
    between the processes and gathered: every process returns the same text.
    """
    frame = evaluate(model, dataset, batch_size=batch_size, tolerances=tolerances, progress=progress, num_workers=num_workers)
    refined_frame = None
    if refined is not None:
        mask = refined if isinstance(refined, torch.Tensor) else refined.prototype_mask
        refined_frame = evaluate(model, dataset, batch_size=batch_size, tolerances=tolerances, progress=progress, num_workers=num_workers,
                                 prototype_mask=mask.to(model.device, torch.bool))
    gains = fidelity = None
    if simulate:
        gains = interaction_gains(simulate_interaction(model, dataset, batch_size=batch_size, progress=progress, num_workers=num_workers))
        fidelity = box_fidelity(model, dataset, batch_size=batch_size, progress=progress, num_workers=num_workers)
    return format_tables(frame, gains, refined_frame, markdown=markdown, fidelity=fidelity)
