"""Frozen-backbone features, computed once per image when F and C are frozen.

Stages 2 and 3 and the atlas never run the backbone again: every image's feature map f
is kept in memory (a ``FeatureCache``), and the local concept vectors (stage 2) and the
scores (stage 3) are derived from it by the model's own functions, so they cost seconds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .._batching import loader
from .._inference import evaluating
from ..model import CSRModel
from .losses import local_concept_vectors


@dataclass
class FeatureCache:
    """Frozen-backbone outputs for a whole dataset.

    features: (n, C, h, w) f;  concepts: (n, K);  labels: (n,);  image_size: (H, W)
    """

    features: torch.Tensor
    concepts: torch.Tensor
    labels: torch.Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield slice(start, start + batch_size)


def cache_features(model: CSRModel, dataset: Dataset, batch_size: int = 64, progress: bool = True,
                   on_progress: Callable[[float], None] | None = None) -> FeatureCache:
    """Run the frozen backbone once over a dataset. ``on_progress(fraction)`` after each batch."""
    features, concepts, labels = [], [], []
    batches = loader(dataset, batch_size)
    with evaluating(model, autograd=torch.no_grad):  # the cache feeds stages 2 and 3: no inference tensors
        for step, batch in enumerate(tqdm(batches, desc="caching features", disable=not progress, leave=False)):
            features.append(model.features(batch["image"]).cpu())
            concepts.append(batch["concepts"])
            labels.append(batch["label"])
            image_size = tuple(batch["image"].shape[-2:])
            if on_progress is not None:
                on_progress((step + 1) / len(batches))
    return FeatureCache(torch.cat(features), torch.cat(concepts), torch.cat(labels), image_size)


@torch.no_grad()
def cached_scores(model: CSRModel, cache: FeatureCache, batch_size: int = 256) -> torch.Tensor:
    """(n, K, M) scores s without interaction, through the model's own encode/reason."""
    device = model.device
    return torch.cat([
        model.reason(model.encode_features(cache.features[rows].to(device), cache.image_size)).scores.cpu()
        for rows in cache.batches(batch_size)
    ])


@torch.no_grad()
def concept_vectors(model: CSRModel, cache: FeatureCache, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local concept vectors (Eq. 2) of every present concept of every image.

    -> vectors (V, C), their concept index (V,), their image index (V,).
    """
    vectors, concepts, images = [], [], []
    device = model.device
    for rows in cache.batches(batch_size):
        features = cache.features[rows].to(device)
        v = local_concept_vectors(features, model.concept_head(features)).cpu()  # (B, K, C)
        image, concept = cache.concepts[rows].nonzero(as_tuple=True)
        vectors.append(v[image, concept])
        concepts.append(concept)
        images.append(image + rows.start)
    return torch.cat(vectors), torch.cat(concepts), torch.cat(images)
