"""evaluate(): one row per image; summaries; the paper-style Tables 1-3 as text.

``evaluate`` runs a model over a dataset (batched, on the model's device, under
``torch.inference_mode``) and returns a pandas DataFrame with one row per image:

==========================  ===============================================================
column                      meaning
==========================  ===============================================================
index                       position in the dataset
label, prediction           class indices (model class order); correct: prediction == label
needs_review                the review rule (p(top-1) - p(top-2) < review_margin)
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..model.interaction import Interaction
from . import metrics

DEFAULT_TOLERANCES = (0, 15)
# Upper bound on the elements of one saliency tensor (B', K, H, W) held at a time: 64 MB.
SALIENCY_ELEMENTS = 2**24


# --------------------------------------------------------------------------- batching
@dataclass
class Batch:
    """One collated batch in the model's concept and class order.

    indices:        (B,) positions in the dataset
    images:         (B, C, H, W) float in [0, 1] (on the CPU; encode moves them)
    concepts:       (B, K) float 0/1, NaN for a model concept the dataset does not have
    labels:         (B,) long class indices in the model's class order
    boxes:          B lists of (concept_name, x0, y0, x1, y1)
    shortcut_boxes: B entries, None or (x0, y0, x1, y1)
    """

    indices: np.ndarray
    images: torch.Tensor
    concepts: torch.Tensor
    labels: torch.Tensor
    boxes: list[list[tuple]]
    shortcut_boxes: list[tuple | None]


def _collate(items: list[dict]) -> dict:
    # Boxes vary in number per image, so torch's default collate cannot stack them.
    return {
        "image": torch.stack([torch.as_tensor(i["image"], dtype=torch.float32) for i in items]),
        "concepts": torch.stack([torch.as_tensor(i["concepts"], dtype=torch.float32) for i in items]),
        "label": torch.as_tensor([int(i["label"]) for i in items], dtype=torch.long),
        "boxes": [list(i.get("boxes", ())) for i in items],
        "shortcut_box": [i.get("shortcut_box") for i in items],
    }


def _alignment(model, dataset) -> tuple[np.ndarray, np.ndarray | None]:
    """Dataset concept column of each model concept (-1: missing), and the class map."""
    names = list(getattr(dataset, "concepts", model.concepts))
    columns = np.array([names.index(c) if c in names else -1 for c in model.concepts])
    if (columns < 0).all():
        raise ValueError(f"The dataset's concepts {names} share no name with the model's {model.concepts}.")
    classes = getattr(dataset, "classes", None)
    class_map = None
    if classes is not None and list(classes) != list(model.classes):
        unknown = sorted(set(classes) - set(model.classes))
        if unknown:
            raise ValueError(f"The dataset's classes {unknown} are not classes of the model ({model.classes}).")
        class_map = np.array([model.classes.index(c) for c in classes])
    return columns, class_map


def iterate_batches(model, dataset, batch_size: int = 32, progress: bool = True, desc: str = "evaluate",
                    num_workers: int = 0) -> Iterator[Batch]:
    """Yield the dataset in order as ``Batch`` objects aligned to the model's concepts/classes."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    columns, class_map = _alignment(model, dataset)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    start = 0
    for raw in tqdm(loader, total=len(loader), disable=not progress, desc=desc, leave=False):
        B = raw["image"].shape[0]
        concepts = raw["concepts"][:, np.clip(columns, 0, None)]
        concepts[:, columns < 0] = float("nan")
        labels = raw["label"] if class_map is None else torch.as_tensor(class_map[raw["label"].numpy()])
        yield Batch(np.arange(start, start + B), raw["image"], concepts, labels, raw["boxes"], raw["shortcut_box"])
        start += B


class _EvalMode:
    """Context: eval mode and inference mode, the previous training flag restored after."""

    def __init__(self, model):
        self.model, self.inference = model, torch.inference_mode()

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.inference.__enter__()
        return self.model

    def __exit__(self, *exc):
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)
        return False


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
    with _EvalMode(model):
        for batch in iterate_batches(model, dataset, batch_size, progress, "evaluate", num_workers):
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
    result = pd.concat(rows, ignore_index=True)
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
    aucs = concept_auc_summary(frame)
    summary["concept_auc"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else np.nan
    summary["review_rate"] = float(frame["needs_review"].mean())
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
        try:
            return table.to_markdown(floatfmt=".1f")
        except ImportError:  # pandas needs the optional `tabulate` for markdown
            pass
    return table.to_string(float_format=lambda v: f"{v:.1f}")


def format_tables(frame: pd.DataFrame, gains: pd.DataFrame | None = None, refined: pd.DataFrame | None = None,
                  markdown: bool = False, title: str | None = None) -> str:
    """Tables 1-3 as text from precomputed results (percentages, one decimal).

    frame: ``evaluate`` output; gains: ``simulation.interaction_gains`` output; refined: an
    ``evaluate`` frame of the refined (pruned) model on the same data, for Table 2's
    "after" columns.
    """
    parts = [title] if title else []
    summary = classification_summary(frame)
    classes = frame.attrs.get("classes") or _names(frame, "prob")
    table1 = pd.DataFrame(
        {"images": [int(summary["images"])], "accuracy": [100 * summary["accuracy"]],
         "macro F1": [100 * summary["macro_f1"]],
         **{f"F1 {c}": [100 * summary[f"f1/{c}"]] for c in classes},
         "concept AUC": [100 * summary["concept_auc"]], "review rate": [100 * summary["review_rate"]]},
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
        parts += ["Table 3. Simulated interaction (oracle user; macro F1 %, gain in points)", _render(table3, markdown), ""]
    parts.append(PAPER_REFERENCE)
    return "\n".join(parts)


def paper_tables(model, dataset, *, refined=None, batch_size: int = 32, tolerances: Sequence[float] = DEFAULT_TOLERANCES,
                 simulate: bool = True, progress: bool = False, markdown: bool = False) -> str:
    """Evaluate ``model`` on ``dataset`` and return Tables 1-3 as text (for ``csr-widgets evaluate``).

    refined: the refinement whose Pointing Game fills Table 2's "after" columns: a (K, M)
    bool prototype mask, or a model of the same architecture whose ``prototype_mask`` is
    used (the Pointing Game does not depend on the task head, so a refit is not needed).
    simulate: also run the oracle user for Table 3 (one more pass over the data).
    """
    frame = evaluate(model, dataset, batch_size=batch_size, tolerances=tolerances, progress=progress)
    refined_frame = None
    if refined is not None:
        mask = refined if isinstance(refined, torch.Tensor) else refined.prototype_mask
        refined_frame = evaluate(model, dataset, batch_size=batch_size, tolerances=tolerances, progress=progress,
                                 prototype_mask=mask.to(model.device, torch.bool))
    gains = None
    if simulate:
        from .simulation import interaction_gains, simulate_interaction

        gains = interaction_gains(simulate_interaction(model, dataset, batch_size=batch_size, progress=progress))
    return format_tables(frame, gains, refined_frame, markdown=markdown)
