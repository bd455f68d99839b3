"""The prototype atlas (Eq. 11): what each prototype looks like in the training data.

Each prototype p_km is linked to the training image whose projected local concept vector
v'_k is most similar to it (argmax of the cosine, among images where concept k is present),
and to the location in that image where its similarity map peaks; the atlas keeps a crop
there, so a clinician can see "this looks like that" and prune shortcut prototypes.

Reading an atlas happens here only: ``Atlas.load`` reads a file (``load_atlas`` also
finds a bundled model's), ``Atlas.entry(k, m)`` is one prototype's match as the widgets
show it, ``Atlas.rows()`` every match as the shortcut detection reads it, and
``atlas_entry`` reads the simpler atlases the widgets also accept.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.utils.data import Dataset

from .._distributed import current
from .._inference import evaluating
from .._tensor_files import read_tensors
from ..model import CSRModel

FORMAT = "csr_widgets.atlas/1"


@dataclass(frozen=True, eq=False)
class AtlasEntry:
    """One prototype's best match in the training data, as the widgets show it.

    crop:         (h, w), (h, w, 3) or (h, w, 4) uint8: the training-image patch (Eq. 11)
    source_index: index of that image in the training dataset (None: not known)
    location:     (x0, y0, x1, y1) of the crop in that image's pixels, x1/y1 exclusive
    similarity:   the prototype's cosine similarity there (None: not known)
    heatmap:      optional (h, w) float32 in [0, 1] aligned with the crop
    """

    crop: np.ndarray
    source_index: int | None
    location: tuple[float, float, float, float] | None
    similarity: float | None
    heatmap: np.ndarray | None = None


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

    def entry(self, k: int, m: int) -> AtlasEntry | None:
        """Prototype (k, m)'s best match; None when concept k never appeared in the training data."""
        index = int(self.image_index[k, m])
        if index < 0:
            return None
        return _entry(self.crops[k, m].numpy(), index, self.crop_boxes[k, m].tolist(), float(self.similarity[k, m]), None)

    def rows(self) -> list[tuple]:
        """``(k, m, image_index, x, y)`` for every prototype with a match: the training image
        it is linked to and the pixel (x, y) where its map peaks in that image."""
        index, location = self.image_index.cpu().numpy(), self.location.cpu().numpy()
        return [(k, m, index[k, m], *location[k, m]) for k, m in zip(*np.nonzero(index >= 0))]

    def save(self, path) -> Path:
        path = Path(path)
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self) if f.name != "concepts"}
        save_file(tensors, str(path), metadata={"format": FORMAT, "concepts": json.dumps(self.concepts)})
        return path

    @classmethod
    def load(cls, path) -> "Atlas":
        """Read an atlas file written by ``save`` (``load_atlas`` also takes a bundled model's name)."""
        tensors, metadata = read_tensors(path, "atlas")
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


def build_atlas(model: CSRModel, dataset: Dataset, crop_size: int = 64, crop_fraction: float = 0.25, progress: bool = True) -> Atlas:
    """Eq. 11 over a training set: the best match of every prototype, with its crop.

    crop_fraction: side of the crop as a fraction of the image's shorter side. The model
    is read in eval mode and left in the mode it came in.
    """
    with evaluating(model, autograd=torch.no_grad):
        return _match(model, dataset, crop_size, crop_fraction, progress)


def _match(model: CSRModel, dataset: Dataset, crop_size: int, crop_fraction: float, progress: bool) -> Atlas:
    from ..training.features import cache_features, concept_vectors

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

    location = _peaks(model, cache, image_index, prototypes)

    H, W = cache.image_size
    side = max(1.0, crop_fraction * min(H, W))
    x0 = (location[..., 0] - side / 2).clamp(0, max(W - side, 0))
    y0 = (location[..., 1] - side / 2).clamp(0, max(H - side, 0))
    crop_boxes = torch.stack([x0, y0, (x0 + side).clamp(max=W), (y0 + side).clamp(max=H)], -1)
    crops = _crops(dataset, image_index, crop_boxes, crop_size)
    similarity = torch.where(present, similarity, torch.full_like(similarity, float("nan")))
    return Atlas(image_index, location, similarity, usage, crop_boxes, crops, list(model.concepts))


def _peaks(model: CSRModel, cache, image_index: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(K, M, 2) the (x, y) pixel where each prototype's own map peaks in its matched image.

    Each process reads the matches whose image it holds (its rows of the feature cache);
    the others' entries are zeros, so the sum over processes is every peak, exactly.
    """
    K, M = image_index.shape
    flat = image_index.clamp(min=0).flatten()  # a concept never present: its peak in image 0 (unused)
    here = (flat >= cache.local_rows.start) & (flat < cache.local_rows.stop)
    location = torch.zeros(K * M, 2)
    if here.any():
        patches = model.project(cache.features[flat[here] - cache.offset].to(model.device))  # (n, h, w, D)
        own_maps = torch.einsum("nhwd,nd->nhw", patches, prototypes.flatten(0, 1)[here.to(prototypes.device)]).cpu()
        # the sub-cell peak, as the Pointing Game locates it (docs/decisions.md#sub-cell-peaks)
        location[here] = model.grid.peak_pixels(own_maps, cache.image_size).flip(-1)  # (y, x) -> (x, y)
    return current().total(location).view(K, M, 2)


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


def atlas_entry(atlas, k: int, m: int) -> AtlasEntry | None:
    """Prototype (k, m)'s entry in any atlas the widgets accept; None when it has none.

    atlas: an ``Atlas``; or any object whose ``atlas.entry(k, m)`` or ``atlas[k, m]`` is
    None or an object or mapping with the fields of ``AtlasEntry`` (crop required);
    or None (no atlas).
    """
    if atlas is None:
        return None
    try:
        entry = atlas.entry(k, m) if hasattr(atlas, "entry") else atlas[k, m]
    except (KeyError, IndexError):
        return None
    if entry is None or isinstance(entry, AtlasEntry):
        return entry

    def field(name):
        return entry.get(name) if isinstance(entry, Mapping) else getattr(entry, name, None)

    if field("crop") is None:
        raise ValueError(f"Atlas entry ({k}, {m}) has no crop: an entry needs crop, source_index, location, similarity.")
    return _entry(field("crop"), field("source_index"), field("location"), field("similarity"), field("heatmap"))


def _entry(crop, source_index, location, similarity, heatmap) -> AtlasEntry:
    """An AtlasEntry from loosely typed values (arrays, tensors' items, sequences)."""
    similarity = None if similarity is None or not np.isfinite(float(similarity)) else float(similarity)
    return AtlasEntry(
        crop=np.asarray(crop),
        source_index=None if source_index is None else int(source_index),
        location=None if location is None else tuple(float(v) for v in np.asarray(location).reshape(-1)[:4]),
        similarity=similarity,
        heatmap=None if heatmap is None else np.asarray(heatmap, dtype=np.float32),
    )
