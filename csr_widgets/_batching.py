"""Batching: dataset items -> batches, for training, evaluation and torch's DataLoader.

Every dataset of the package yields one item format (docs/architecture.md#the-item-format):
``{"image": (C, H, W) float in [0, 1], "concepts": (K,) 0/1, "label": int, "boxes":
[(concept, x0, y0, x1, y1)], ...}``. ``collate`` stacks what has one shape per image and
keeps lists of the rest; ``iterate_batches`` walks a dataset in order and lines its
concept and class axes up with a model's.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from ._distributed import ProcessGroup


def collate(items: list[dict]) -> dict:
    """Stack what has one shape per image, keep lists of what does not.

    image (B, C, H, W), concepts (B, K), label (B,) long, masks (B, K, H, W) when present;
    boxes, shortcut_box and id stay Python lists of length B (None where an item lacks
    the key). Tensors and numpy arrays are stacked; images of different sizes are refused.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    batch = {}
    for key in dict.fromkeys(key for item in items for key in item):  # every key, in order
        values = [item.get(key) for item in items]
        if key == "label":
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        elif isinstance(values[0], (torch.Tensor, np.ndarray)):
            if any(v is None for v in values):
                raise ValueError(f"cannot stack {key!r}: some items lack it")
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack {key!r} of different shapes {sorted(shapes)}; give the dataset an image_size")
            batch[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            batch[key] = values
    return batch


def loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
           pin_memory: bool = False, group: ProcessGroup | None = None) -> DataLoader:
    """A DataLoader of ``collate``d batches; with ``shuffle``, an order that follows ``seed`` only.

    num_workers: processes that read and decode images while the model computes (0: in
    this process); pin_memory: page-locked batches, for faster copies to a GPU.
    group: a process group of several processes: each one reads its own share of every
    epoch through a ``DistributedSampler`` (shuffled by ``seed``, padded to equal shares);
    None: this process reads every batch.
    """
    generator = torch.Generator().manual_seed(seed)
    options = dict(batch_size=batch_size, collate_fn=collate, generator=generator, num_workers=num_workers,
                   pin_memory=pin_memory, persistent_workers=False)
    if group is not None and group.distributed:
        sampler = DistributedSampler(dataset, group.world_size, group.rank, shuffle=shuffle, seed=seed)
        return DataLoader(dataset, sampler=sampler, **options)
    return DataLoader(dataset, shuffle=shuffle, **options)


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


def alignment(model, dataset) -> tuple[np.ndarray, np.ndarray | None]:
    """Dataset concept column of each model concept (-1: missing), and the class map
    (dataset class index -> model class index; None when the orders agree)."""
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
                    num_workers: int = 0, rows: range | None = None) -> Iterator[Batch]:
    """Yield the dataset in order as ``Batch`` objects aligned to the model's concepts/classes.

    rows: only these consecutive dataset rows (a process's ``shard``; ``Batch.indices``
    stay positions in the whole dataset); None: every row.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    columns, class_map = alignment(model, dataset)
    rows = range(len(dataset)) if rows is None else rows
    part = dataset if len(rows) == len(dataset) else Subset(dataset, rows)
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        pin_memory=next(model.parameters()).is_cuda)
    start = rows.start
    for raw in tqdm(loader, total=len(loader), disable=not progress, desc=desc, leave=False):
        B = raw["image"].shape[0]
        concepts = raw["concepts"].float()[:, np.clip(columns, 0, None)]
        concepts[:, columns < 0] = float("nan")
        labels = raw["label"] if class_map is None else torch.as_tensor(class_map[raw["label"].numpy()])
        boxes = [list(b or ()) for b in raw.get("boxes", [None] * B)]
        shortcut_boxes = raw.get("shortcut_box", [None] * B)
        yield Batch(np.arange(start, start + B), raw["image"].float(), concepts, labels, boxes, shortcut_boxes)
        start += B
