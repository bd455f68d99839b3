"""The prototype atlas (Eq. 11): what each prototype looks like in the training data.

Each prototype p_km is linked to the training image whose projected local concept vector
v'_k is most similar to it (argmax of the cosine, among images where concept k is present),
and to the location in that image where its similarity map peaks; the atlas keeps a crop
there, so a clinician can see "this looks like that" and prune shortcut prototypes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch.nn import functional as F
from torch.utils.data import Dataset

from ..model import CSRModel

FORMAT = "csr_widgets.atlas/1"


@dataclass
class Atlas:
    """Per prototype (K concepts x M prototypes):

    image_index: (K, M) long   training image of the best match (-1: concept never present)
    location:    (K, M, 2)     (x, y) pixel of the peak of the prototype's map in that image (FeatureGrid.peak_pixels)
    similarity:  (K, M)        cosine of p_km and that image's v'_k
    usage:       (K, M) long   training vectors of concept k whose nearest prototype is m
    crop_boxes:  (K, M, 4)     (x0, y0, x1, y1) of the crop in the image's pixels
    crops:       (K, M, S, S) or (K, M, S, S, 3) uint8 image crops
    concepts:    the model's concept names, in order
    """

    image_index: torch.Tensor
    location: torch.Tensor
    similarity: torch.Tensor
    usage: torch.Tensor
    crop_boxes: torch.Tensor
    crops: torch.Tensor
    concepts: list[str]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.similarity.shape)

    def crop(self, concept: int | str, prototype: int) -> np.ndarray:
        """The uint8 crop of one prototype's best match."""
        k = self.concepts.index(concept) if isinstance(concept, str) else concept
        return self.crops[k, prototype].numpy()

    def save(self, path) -> Path:
        path = Path(path)
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self) if f.name != "concepts"}
        save_file(tensors, str(path), metadata={"format": FORMAT, "concepts": json.dumps(self.concepts)})
        return path

    @classmethod
    def load(cls, path) -> "Atlas":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No atlas at {path}.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:  # safetensors raises several types for a damaged file
            raise ValueError(f"{path} is not a readable atlas ({error}).") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a csr_widgets atlas (format {metadata.get('format')!r}).")
        missing = [f.name for f in fields(cls) if f.name != "concepts" and f.name not in tensors]
        if missing:
            raise ValueError(f"{path} lacks atlas fields {missing}.")
        return cls(concepts=json.loads(metadata["concepts"]), **{k: tensors[k] for k in tensors})

    def check(self, model: CSRModel) -> None:
        """Refuse an atlas built for another model."""
        expected = (len(model.concepts), model.config.prototypes_per_concept)
        if self.concepts != model.concepts or self.shape != expected:
            raise ValueError(f"This atlas ({self.concepts}, {self.shape}) was not built for this model ({model.concepts}, {expected}).")


@torch.no_grad()
def build_atlas(model: CSRModel, dataset: Dataset, crop_size: int = 64, crop_fraction: float = 0.25, progress: bool = True) -> Atlas:
    """Eq. 11 over a training set: the best match of every prototype, with its crop.

    crop_fraction: side of the crop as a fraction of the image's shorter side.
    """
    from ..training.loop import cache_features, concept_vectors

    model.eval()
    cache = cache_features(model, dataset, progress=progress)
    vectors, concepts, images = concept_vectors(model, cache)
    K, M, _ = model.prototypes.shape
    prototypes = F.normalize(model.prototypes, dim=-1)
    projected = model.projector(vectors.to(model.device))  # (V, D)
    cosines = torch.einsum("vd,kmd->vkm", projected, prototypes).cpu()  # (V, K, M)
    own = concepts[:, None] == torch.arange(K)[None, :]  # (V, K): vector v is of concept k
    masked = cosines.masked_fill(~own[..., None], -torch.inf)
    similarity, best = masked.max(0)  # (K, M)
    present = own.any(0)[:, None].expand(K, M)
    image_index = torch.where(present, images[best], torch.full_like(best, -1))

    usage = torch.zeros(K, M, dtype=torch.long)
    nearest = cosines[torch.arange(len(concepts)), concepts].argmax(-1)  # (V,)
    usage.index_put_((concepts, nearest), torch.ones_like(concepts), accumulate=True)

    # where in its image each prototype's similarity map peaks
    flat = image_index.clamp(min=0).flatten()
    patches = model.project(cache.features[flat].to(model.device))  # (KM, h, w, D)
    own_maps = torch.einsum("nhwd,nd->nhw", patches, prototypes.flatten(0, 1)).cpu()  # each prototype's own map
    H, W = cache.image_size
    location = model.grid.peak_pixels(own_maps, (H, W)).flip(-1).view(K, M, 2)  # (y, x) -> (x, y)

    side = max(1.0, crop_fraction * min(H, W))
    x0 = (location[..., 0] - side / 2).clamp(0, max(W - side, 0))
    y0 = (location[..., 1] - side / 2).clamp(0, max(H - side, 0))
    crop_boxes = torch.stack([x0, y0, (x0 + side).clamp(max=W), (y0 + side).clamp(max=H)], -1)
    crops = _crops(dataset, image_index, crop_boxes, crop_size)
    similarity = torch.where(present, similarity, torch.full_like(similarity, float("nan")))
    return Atlas(image_index, location, similarity, usage, crop_boxes, crops, list(model.concepts))


def _crops(dataset: Dataset, image_index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    K, M = image_index.shape
    crops = None
    cached: dict[int, torch.Tensor] = {}
    for (k, m), index in np.ndenumerate(image_index.numpy()):
        if index < 0:
            continue
        if index not in cached:
            cached[index] = dataset[int(index)]["image"]
        image = cached[index]
        x0, y0, x1, y1 = boxes[k, m].round().long().tolist()
        patch = F.interpolate(image[None, :, y0:y1, x0:x1], size=(size, size), mode="bilinear", align_corners=False)[0]
        if crops is None:
            channels = image.shape[0]
            crops = torch.zeros((K, M, size, size) + ((3,) if channels == 3 else ()), dtype=torch.uint8)
        pixels = (patch.clamp(0, 1) * 255).round().to(torch.uint8)
        crops[k, m] = pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0)
    return crops if crops is not None else torch.zeros(K, M, size, size, dtype=torch.uint8)


def load_atlas(name_or_path) -> Atlas:
    """An atlas file, or the atlas of a bundled model by name (e.g. "synthetic-cxr")."""
    from ..pretrained import RECIPES, bundled_path

    if isinstance(name_or_path, str) and name_or_path in RECIPES:
        return Atlas.load(bundled_path(name_or_path).with_suffix(".atlas.safetensors"))
    return Atlas.load(name_or_path)
