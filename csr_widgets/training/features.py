"""Frozen-backbone features, computed once per image when F and C are frozen.

Stages 2 and 3 and the atlas never run the backbone again: every image's feature map f
is kept in memory (a ``FeatureCache``), and the local concept vectors (stage 2) and the
scores (stage 3) are derived from it by the model's own functions, so they cost seconds.

With several processes (``_distributed``), each one caches its own contiguous share of the
images (``ProcessGroup.shard``, cut at batch boundaries so that every image is computed
exactly as in one process), and what the stages need from the cache, the concept vectors,
the scores and the pooled features, is gathered in dataset order: small tensors, where
the feature maps are large (docs/training.md#how-the-work-is-split).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .._batching import loader
from .._distributed import current
from .._inference import evaluating
from ..model import CSRModel
from .losses import local_concept_vectors

# Images per batch when caching; also the unit at which processes split a dataset.
CACHE_BATCH = 64


@dataclass
class FeatureCache:
    """Frozen-backbone outputs for a whole dataset, the feature maps of this process's rows.

    features: (n_local, C, h, w) f of dataset rows [offset, offset + n_local) (all n rows in
              one process)
    concepts: (n, K);  labels: (n,): every row;  image_size: (H, W)
    """

    features: torch.Tensor
    concepts: torch.Tensor
    labels: torch.Tensor
    image_size: tuple[int, int]
    offset: int = 0

    def __len__(self) -> int:
        return len(self.concepts)

    @property
    def local_rows(self) -> range:
        """The dataset rows whose feature maps this process holds."""
        return range(self.offset, self.offset + len(self.features))

    def batches(self, batch_size: int):
        """Slices of ``features`` (this process's rows), ``batch_size`` at a time."""
        for start in range(0, len(self.features), batch_size):
            yield slice(start, start + batch_size)

    def pooled_features(self) -> torch.Tensor:
        """(n, C, 1, 1) every row's spatially pooled f (what the novelty statistics read)."""
        return current().gather_rows(self.features.mean(dim=(-2, -1), keepdim=True))

    def gathered(self) -> "FeatureCache":
        """The cache with every row's feature map in this process (memory: the whole set)."""
        if len(self.features) == len(self):
            return self
        return FeatureCache(current().gather_rows(self.features), self.concepts, self.labels, self.image_size)


def autocast(model: CSRModel, bf16: bool) -> AbstractContextManager:
    """bfloat16 autocast on the model's device when ``bf16`` (docs/training.md#precision)."""
    return torch.autocast(model.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def cache_features(model: CSRModel, dataset: Dataset, batch_size: int = CACHE_BATCH, progress: bool = True,
                   on_progress: Callable[[float], None] | None = None, num_workers: int = 0,
                   bf16: bool = False) -> FeatureCache:
    """Run the frozen backbone once over a dataset (this process's share of it).

    ``on_progress(fraction)`` after each batch; num_workers: DataLoader workers; bf16:
    under bfloat16 autocast (the cache itself stays float32).
    """
    group = current()
    rows = group.shard(len(dataset), batch_size)
    part = dataset if len(rows) == len(dataset) else Subset(dataset, rows)
    features, concepts, labels = [], [], []
    batches = loader(part, batch_size, num_workers=num_workers, pin_memory=model.device.type == "cuda")  # this process's share
    image_size = None
    with evaluating(model, autograd=torch.no_grad):  # the cache feeds stages 2 and 3: no inference tensors
        for step, batch in enumerate(tqdm(batches, desc="caching features", disable=not (progress and group.is_main), leave=False)):
            with autocast(model, bf16):
                features.append(model.features(batch["image"]).float().cpu())
            concepts.append(batch["concepts"])
            labels.append(batch["label"])
            image_size = tuple(batch["image"].shape[-2:])
            if on_progress is not None:
                on_progress((step + 1) / len(batches))
    if not features:  # a process with no rows still takes part in the gathers
        image_size = tuple(dataset[0]["image"].shape[-2:])
        features, concepts, labels = [_no_features(model, image_size)], [torch.zeros(0, len(model.concepts))], [torch.zeros(0, dtype=torch.long)]
    return FeatureCache(torch.cat(features), group.gather_rows(torch.cat(concepts)), group.gather_rows(torch.cat(labels)),
                        image_size, offset=rows.start)


@torch.no_grad()
def cached_scores(model: CSRModel, cache: FeatureCache, batch_size: int = 256) -> torch.Tensor:
    """(n, K, M) scores s without interaction, through the model's own encode/reason."""
    device = model.device
    K, M, _ = model.prototypes.shape
    scores = [model.reason(model.encode_features(cache.features[rows].to(device), cache.image_size)).scores.cpu()
              for rows in cache.batches(batch_size)]
    return current().gather_rows(torch.cat(scores) if scores else torch.zeros(0, K, M))


@torch.no_grad()
def concept_vectors(model: CSRModel, cache: FeatureCache, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local concept vectors (Eq. 2) of every present concept of every image.

    -> vectors (V, C), their concept index (V,), their image index (V,) in the dataset.
    """
    vectors, concepts, images = [], [], []
    device = model.device
    local_concepts = cache.concepts[cache.local_rows.start : cache.local_rows.stop]
    for rows in cache.batches(batch_size):
        features = cache.features[rows].to(device)
        v = local_concept_vectors(features, model.concept_head(features)).cpu()  # (B, K, C)
        image, concept = local_concepts[rows].nonzero(as_tuple=True)
        vectors.append(v[image, concept])
        concepts.append(concept)
        images.append(image + rows.start + cache.offset)
    if not vectors:
        vectors, concepts, images = [torch.zeros(0, cache.features.shape[1])], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    group = current()
    return group.gather_rows(torch.cat(vectors)), group.gather_rows(torch.cat(concepts)), group.gather_rows(torch.cat(images))


def _no_features(model: CSRModel, image_size: tuple[int, int]) -> torch.Tensor:
    """(0, C, h, w): the feature maps of no image, shaped like those of ``image_size``."""
    with evaluating(model):
        probe = model.features(torch.zeros(1, model.config.in_channels, *image_size, device=model.device))
    return torch.zeros(0, *probe.shape[1:])
