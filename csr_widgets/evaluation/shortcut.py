"""The shortcut experiment: find prototypes that learned a shortcut, prune them, compare.

A shortcut (a corner text marker, a pacemaker-like device in SyntheticCXR) correlated
with a class in training lets prototypes learn it instead of the findings. On a
decorrelated split this costs F1; pruning those prototypes (``prototype_mask[k, m] =
False``) and refitting the task head should recover it (docs/method.md#atlas-and-pruning).

Detection (automatic, **ours**, docs/decisions.md#shortcut-detection):

- by maxima: on the images that contain the shortcut, the peak pixel of a prototype's
  similarity map (``FeatureGrid.peak_pixels``: the same peak, tie and distance rules as
  the Pointing Game, see metrics.py) lies within ``tolerance`` px of the shortcut box in more than ``threshold``
  of the images;
- by the atlas (optional): the prototype's atlas match (the training image and pixel it
  is linked to, Eq. 11) lies on that image's shortcut box.

Without a shortcut box, ``off_target_prototypes`` stands in for the expert's atlas
refinement (Table 2's "after refinement"): it flags prototypes whose atlas match misses
every box of their own concept.

The training and the task-head refit come from ``csr_widgets.training``, imported only
when the full experiment runs.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .._batching import iterate_batches
from .._inference import evaluating
from ..model.grid import FeatureGrid
from . import metrics
from .atlas import Atlas
from .report import classification_summary, evaluate, pointing_summary
from .simulation import NoShortcutError, shortcut_neutralisation


def shortcut_hits(similarity_maps: torch.Tensor, grid: FeatureGrid, image_size: tuple[int, int],
                  shortcut_boxes: Sequence[tuple | None], tolerance: float = 0) -> tuple[np.ndarray, int]:
    """Count, per prototype, the images whose map peaks on the shortcut box.

    similarity_maps: (B, K, M, h, w); shortcut_boxes: B entries, None or (x0, y0, x1, y1).
    Returns ((K, M) int counts, number of images with a shortcut box). Images without
    one are skipped.
    """
    keep = [b for b, box in enumerate(shortcut_boxes) if box is not None and metrics.box_pixels(box, *image_size) is not None]
    K, M = similarity_maps.shape[1:3]
    counts = np.zeros((K, M), dtype=int)
    for b in keep:
        points = grid.peak_pixels(similarity_maps[b], tuple(image_size)).cpu().numpy()  # (K, M, 2)
        distance = metrics.distance_to_boxes(points, [shortcut_boxes[b]], *image_size)
        counts += distance <= tolerance
    return counts, len(keep)


def shortcut_prototype_rates(model, dataset, tolerance: float = 0, batch_size: int = 32, progress: bool = False,
                             num_workers: int = 0) -> pd.DataFrame:
    """One row per prototype (concept, prototype): images, on_shortcut, rate.

    ``rate`` = fraction of the images with a shortcut on which the prototype's maximum
    lands on the shortcut box. Uses the similarity maps that ``reason`` returns without
    interaction (so similarity hooks apply). Raises if no image has a shortcut.
    """
    K, M = model.prototype_mask.shape
    counts, images = np.zeros((K, M), dtype=int), 0
    with evaluating(model):
        for batch in iterate_batches(model, dataset, batch_size, progress, "shortcut", num_workers):
            if all(box is None for box in batch.shortcut_boxes):
                continue
            encoding = model.encode(batch.images)
            maps = model.reason(encoding).similarity_maps
            c, n = shortcut_hits(maps, model.grid, encoding.image_size, batch.shortcut_boxes, tolerance)
            counts, images = counts + c, images + n
    if images == 0:
        raise ValueError("No image of the dataset has a shortcut_box: shortcut prototypes cannot be found by their maxima.")
    concept_index = np.repeat(np.arange(K), M)
    return pd.DataFrame({
        "concept": [model.concepts[k] for k in concept_index],
        "prototype": np.tile(np.arange(M), K),
        "images": images,
        "on_shortcut": counts.reshape(-1),
        "rate": counts.reshape(-1) / images,
        "pruned": ~model.prototype_mask.cpu().numpy().reshape(-1),
    })


def _atlas_rows(atlas) -> list[tuple]:
    """Rows (k, m, image_index, x, y) from an Atlas, a mapping or an iterable of rows."""
    if isinstance(atlas, Atlas):
        return atlas.rows()
    if isinstance(atlas, Mapping):
        return [(k, m, *where) for (k, m), where in atlas.items()]
    return list(atlas)


def atlas_shortcut_prototypes(atlas, dataset, shape: tuple[int, int], tolerance: float = 0) -> torch.Tensor:
    """(K, M) bool: prototypes whose atlas match lies on its image's shortcut box.

    atlas: an ``Atlas`` (its ``image_index`` (K, M) and ``location`` (K, M, 2) (x, y)), or
    ``{(k, m): (image_index, x, y)}``, or rows ``(k, m, image_index, x, y)``: the image of
    ``dataset`` (the one the atlas was built on) each prototype is linked to, and the pixel
    of the match in that image. Prototypes without a match (index -1) are never flagged.
    """
    found = torch.zeros(shape, dtype=torch.bool)
    for k, m, index, x, y in _atlas_rows(atlas):
        if int(index) < 0:
            continue
        item = dataset[int(index)]
        box = item.get("shortcut_box")
        if box is None:
            continue
        H, W = item["image"].shape[-2:]
        point = np.array([round(float(y)), round(float(x))])
        if metrics.distance_to_boxes(point, [box], H, W) <= tolerance:
            found[int(k), int(m)] = True
    return found


def off_target_prototypes(atlas, dataset, tolerance: float = 0) -> torch.Tensor:
    """(K, M) bool: prototypes whose atlas match misses every box of their own concept.

    An automatic stand-in for the expert's atlas refinement (**ours**,
    docs/decisions.md#automatic-refinement): prototype p_km is
    linked (Eq. 11) to a training image where concept k is present and to the pixel where
    its map peaks; when that pixel lies farther than ``tolerance`` px from every box of
    concept k in that image, the prototype answers to something other than the finding.
    Images without a box of concept k give no verdict. A concept whose prototypes would
    all be flagged keeps them all (flags cleared): pruning a whole concept would remove it
    from the Pointing Game rather than refine it.

    atlas: as for ``atlas_shortcut_prototypes``, plus the concept names in ``atlas.concepts``
    (rows and mappings use the dataset's concept names at index k); dataset: the set the
    atlas was built on.
    """
    concepts = list(getattr(atlas, "concepts", None) or dataset.concepts)
    shape = atlas.shape if isinstance(atlas, Atlas) else None
    rows = _atlas_rows(atlas)
    if shape is None:
        shape = (len(concepts), max(int(m) for _, m, *_ in rows) + 1) if rows else (len(concepts), 0)
    found = torch.zeros(shape, dtype=torch.bool)
    for k, m, index, x, y in rows:
        if int(index) < 0:
            continue
        item = dataset[int(index)]
        boxes = metrics.boxes_by_concept(item.get("boxes", ()), concepts)[int(k)]
        H, W = item["image"].shape[-2:]
        if not boxes or all(metrics.box_pixels(b, H, W) is None for b in boxes):
            continue
        point = np.array([round(float(y)), round(float(x))])
        found[int(k), int(m)] = bool(metrics.distance_to_boxes(point, boxes, H, W) > tolerance)
    found[found.all(dim=1)] = False
    return found


def find_shortcut_prototypes(model, dataset, threshold: float = 0.5, tolerance: float = 0, atlas=None,
                             atlas_dataset=None, batch_size: int = 32, progress: bool = False,
                             rates: pd.DataFrame | None = None) -> torch.Tensor:
    """(K, M) bool: True for prototypes that look at the shortcut.

    By maxima: ``rate > threshold`` on the dataset's images with a shortcut (see
    ``shortcut_prototype_rates``); or, when ``atlas`` is given, by an atlas match on a
    shortcut box of ``atlas_dataset`` (the atlas's training set; default ``dataset``; see
    ``atlas_shortcut_prototypes``). Prototypes already pruned are not reported again.
    ``rates``: a ``shortcut_prototype_rates`` table already computed on ``dataset`` (saves a
    pass over the data).
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}.")
    if rates is None:
        rates = shortcut_prototype_rates(model, dataset, tolerance, batch_size, progress)
    found = torch.from_numpy(rates["rate"].to_numpy().reshape(model.prototype_mask.shape) > threshold)
    if atlas is not None:
        source = dataset if atlas_dataset is None else atlas_dataset
        found |= atlas_shortcut_prototypes(atlas, source, tuple(model.prototype_mask.shape), tolerance)
    return found & model.prototype_mask.cpu()


def _as_mask(prototypes, model) -> torch.Tensor:
    shape = tuple(model.prototype_mask.shape)
    if isinstance(prototypes, (torch.Tensor, np.ndarray)):
        mask = torch.as_tensor(prototypes, dtype=torch.bool)
        if tuple(mask.shape) != shape:
            raise ValueError(f"A prototype mask to prune must have shape {shape}, got {tuple(mask.shape)}.")
        return mask
    mask = torch.zeros(shape, dtype=torch.bool)
    for k, m in prototypes:
        k = model.concept_index([k])[0] if isinstance(k, str) else int(k)
        mask[k, int(m)] = True
    return mask


def prune_prototypes(model, prototypes) -> torch.Tensor:
    """Prune prototypes in place: ``model.prototype_mask[k, m] = False``.

    prototypes: a (K, M) bool tensor/array (True = prune) or pairs (k or concept name, m).
    Returns the previous mask (a copy), so that ``model.prototype_mask.copy_(previous)``
    undoes it.
    """
    previous = model.prototype_mask.clone()
    with torch.no_grad():
        model.prototype_mask &= ~_as_mask(prototypes, model).to(model.prototype_mask.device)
    return previous


def _scoreboard(frame: pd.DataFrame, pruned: int) -> dict:
    summary = classification_summary(frame)
    pointing = pointing_summary(frame).loc["overall"]
    row = {"accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"]}
    row.update({c: pointing[c] for c in pointing.index if c.startswith(("pg@", "shortcut@")) or c == "energy"})
    row["pruned_prototypes"] = pruned
    return row


@dataclass
class PruningComparison:
    """before/after: evaluate() frames; table: one row each (accuracy, macro_f1, pg@t,
    shortcut@t, energy, pruned_prototypes); model: the pruned (and refit) copy."""

    table: pd.DataFrame
    before: pd.DataFrame
    after: pd.DataFrame
    model: object


def compare_pruning(model, dataset, prototypes, refit: Callable | None = None, batch_size: int = 32,
                    progress: bool = False) -> PruningComparison:
    """Evaluate ``model``, prune ``prototypes`` on a copy, refit, evaluate the copy.

    refit: called as ``refit(pruned_model)`` after pruning (e.g. a task-head refit); it may
    return a model to use instead. ``model`` itself is left unchanged.
    """
    before = evaluate(model, dataset, batch_size=batch_size, progress=progress)
    pruned = copy.deepcopy(model)
    prune_prototypes(pruned, prototypes)
    if refit is not None:
        returned = refit(pruned)
        pruned = returned if isinstance(returned, type(model)) else pruned
    after = evaluate(pruned, dataset, batch_size=batch_size, progress=progress)
    table = pd.DataFrame.from_dict({
        "before": _scoreboard(before, int((~model.prototype_mask).sum())),
        "after": _scoreboard(after, int((~pruned.prototype_mask).sum())),
    }, orient="index")
    return PruningComparison(table=table, before=before, after=after, model=pruned)


@dataclass
class ShortcutExperiment:
    """Everything the shortcut experiment produced.

    table: rows "correlated (val)", "decorrelated (test), before", "decorrelated (test),
    after pruning" with accuracy, macro_f1, pointing columns; rates: the per-prototype
    detection table; shortcut_mask: (K, M) bool of the pruned prototypes; negative_box:
    ``simulation.shortcut_neutralisation`` of the unpruned model on the decorrelated split
    (a negative box over the marker on every image that has one), None without a
    shortcut class among the model's classes or without a test image that carries the shortcut.
    """

    model: object
    pruned_model: object
    shortcut_mask: torch.Tensor
    rates: pd.DataFrame
    table: pd.DataFrame
    negative_box: pd.Series | None = None


def run_shortcut_experiment(train_set, val_set, test_set, config=None, model=None, *, train_kwargs: dict | None = None,
                            refit_kwargs: dict | None = None, threshold: float = 0.5, tolerance: float | None = None,
                            atlas=None, batch_size: int = 32, progress: bool = False,
                            shortcut_class: str | None = None) -> ShortcutExperiment:
    """Train on a shortcut-correlated set, detect and prune shortcut prototypes, compare.

    train_set, val_set: shortcut correlated with a class (detection by maxima runs on
    val_set; an ``atlas`` is taken to be built on train_set); test_set: the decorrelated
    split. Give ``config`` (a CSRConfig) to train a new model with
    ``csr_widgets.training.train(model, train_set, val_set, **train_kwargs)`` (e.g.
    ``plan=TrainingPlan(...)``), or a trained ``model`` (not modified). The pruned copy's
    task head is refit with ``refit_task_head(pruned, train_set, **refit_kwargs)``.
    tolerance: pixels around the shortcut box that still count as "on" it for detection;
    default one feature cell (``model.grid.stride``): a marker a few pixels tall is smaller
    than a cell, and a map peaking on the marker's cell often peaks just outside its tight
    box (at tolerance 0 a tiny run found none of its marker prototypes).
    shortcut_class: the class the shortcut correlates with (default: the test set's
    ``shortcut_class``, as SyntheticCXR has it), for the negative-box measurement.
    """
    from ..training import refit_task_head  # lazily: training imports the model, not this module

    if model is None:
        if config is None:
            raise ValueError("Give either a CSRConfig to train a model, or a trained model.")
        from ..model import CSRModel
        from ..training import train

        plan = (train_kwargs or {}).get("plan")
        with torch.random.fork_rng():  # the initial weights follow the plan's seed, not the global RNG
            torch.manual_seed(plan.seed if plan is not None else 0)
            model = CSRModel(config)
        train(model, train_set, val_set, **{"progress": progress, **(train_kwargs or {})})  # in place
    if tolerance is None:
        tolerance = float(model.grid.stride)
    rates = shortcut_prototype_rates(model, val_set, tolerance, batch_size, progress)
    found = find_shortcut_prototypes(model, val_set, threshold, tolerance, atlas, train_set, rates=rates)

    def refit(pruned):
        return refit_task_head(pruned, train_set, **{"progress": progress, **(refit_kwargs or {})})

    comparison = compare_pruning(model, test_set, found, refit, batch_size, progress)
    correlated = _scoreboard(evaluate(model, val_set, batch_size=batch_size, progress=progress), int((~model.prototype_mask).sum()))
    table = pd.DataFrame.from_dict({
        "correlated (val)": correlated,
        "decorrelated (test), before": comparison.table.loc["before"].to_dict(),
        "decorrelated (test), after pruning": comparison.table.loc["after"].to_dict(),
    }, orient="index")
    shortcut_class = shortcut_class or getattr(test_set, "shortcut_class", None)
    negative_box = None  # only where it can be measured: a finished experiment never fails here
    if shortcut_class in model.classes:
        try:
            negative_box = shortcut_neutralisation(model, test_set, shortcut_class, batch_size, progress)
        except NoShortcutError:
            pass
    return ShortcutExperiment(model=model, pruned_model=comparison.model, shortcut_mask=found, rates=rates, table=table,
                              negative_box=negative_box)
