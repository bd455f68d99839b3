"""CSRModel: backbone -> concepts -> projector -> prototypes -> similarity maps -> task head.

The forward pass is split in two (docs/architecture.md#encode-and-reason): ``encode``
runs everything that does not depend on the user (F, C, P, S) once per image; ``reason``
runs everything that does (the importance map A, the masks, the spatial max, H) and is
cheap enough to re-run on every mouse event.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from ..config import CSRConfig
from .backbone import Backbone
from .checkpoint import load_weights, read_config, save_model
from .grid import FeatureGrid
from .heads import ConceptHead, Projector, TaskHead
from .interaction import Interaction, concept_importance
from .novelty import NoveltyDetector

MAX_ASPECT = 10  # longer side / shorter side beyond which an image is refused
SimilarityHook = Callable[["CSRModel", torch.Tensor], "torch.Tensor | None"]


@dataclass
class Encoding:
    """What ``encode`` computes once per image batch.

    similarity_maps: (B, K, M, h, w) S, cosine similarity of every prototype to every patch
    concept_maps:    (B, K, h, w)    CAM, the concept head's activation maps
    concept_logits:  (B, K)          CAM pooled over (h, w): `CSRModel.pool_concepts`
    image_size:      (H, W)          size of the images given to ``encode``, in pixels
    feature_distance: (B,)           how far each image's pooled features lie from the
                                     training images' (``NoveltyDetector``); None: unknown
    scores:          (B, K, M)       s = max_hw max(S, 0) without any box: the answer when
                                     nothing is drawn, and the floor's reference; derived
                                     from similarity_maps on first use and kept (treat an
                                     Encoding as a value: edit its maps before that use)
    """

    similarity_maps: torch.Tensor
    concept_maps: torch.Tensor
    concept_logits: torch.Tensor
    image_size: tuple[int, int]
    feature_distance: torch.Tensor | None = None
    _scores: torch.Tensor | None = field(default=None, repr=False)

    @property
    def scores(self) -> torch.Tensor:
        if self._scores is None:
            self._scores = self.similarity_maps.amax(dim=(-2, -1)).clamp(min=0)
        return self._scores

    def __len__(self) -> int:
        return self.similarity_maps.shape[0]

    def _map(self, function) -> "Encoding":
        """The same encoding with ``function`` applied to every tensor (index, move, expand)."""
        optional = {name: None if t is None else function(t) for name, t in
                    (("feature_distance", self.feature_distance), ("_scores", self._scores))}
        return Encoding(*(function(t) for t in (self.similarity_maps, self.concept_maps, self.concept_logits)),
                        self.image_size, **optional)

    def __getitem__(self, index) -> "Encoding":
        """The encoding of a sub-batch (an int keeps the batch axis)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return self._map(lambda t: t[index])

    def to(self, device) -> "Encoding":
        return self._map(lambda t: t.to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.similarity_maps, self.concept_maps, self.concept_logits, self.scores))


@dataclass
class Reasoning:
    """What ``reason`` returns (N classes, K concepts, M prototypes per concept).

    similarity_maps: (B, K, M, h, w) S after the importance map and the similarity hooks
    importance_map:  (B, h, w)       A of the boxes that act on every concept, on the
                                     feature grid (all ones without such boxes)
    concept_importance: (B, K, h, w) A_k, what each concept's maps were multiplied by: A,
                                     except for concepts that a concept box names
    scores:          (B, K, M)       s = max_hw max(A_k * S, 0), floored at the absent
                                     baseline where boxes lowered it (config.box_floor),
                                     rejected concepts replaced
    concept_logits:  (B, K)          from the concept head (not changed by the user)
    logits:          (B, N)          = contributions.sum(-1) + task head bias
    probs:           (B, N)          softmax of logits
    contributions:   (B, N, K)       each concept's share of each class logit
    needs_review:    (B,)            p(top-1) - p(top-2) < config.review_margin
    out_of_distribution: (B,)        the image is unlike the training images (its pooled
                                     features lie beyond the novelty threshold): do not
                                     trust the prediction, however confident
    """

    similarity_maps: torch.Tensor
    importance_map: torch.Tensor
    concept_importance: torch.Tensor
    scores: torch.Tensor
    concept_logits: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    contributions: torch.Tensor
    needs_review: torch.Tensor
    out_of_distribution: torch.Tensor

    @property
    def concept_probs(self) -> torch.Tensor:
        """(B, K) sigmoid of the concept logits."""
        return torch.sigmoid(self.concept_logits)

    @property
    def prediction(self) -> torch.Tensor:
        """(B,) index of the most probable class."""
        return self.probs.argmax(-1)

    def to(self, device) -> "Reasoning":
        return Reasoning(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class CSRModel(nn.Module):
    """Concept-based Similarity Reasoning (Huy et al., CVPR 2025).

    Public extension points used by the widgets (and nothing else):
      - ``register_similarity_hook(fn)``: fn(model, similarity_maps) may return new maps;
      - ``concept_mask`` (K,) bool buffer: False = concept rejected for every image;
      - ``prototype_mask`` (K, M) bool buffer: False = prototype pruned (it enters H as 0).
    """

    def __init__(self, config: CSRConfig):
        super().__init__()
        if not isinstance(config, CSRConfig):
            raise TypeError(f"CSRModel needs a CSRConfig, got {type(config).__name__}.")
        self.config = config
        # Parameters made under inference_mode would be inference tensors, which can never
        # be trained: a notebook cell that builds a model inside it must still get a real one.
        with torch.inference_mode(False):
            K, M, D = config.num_concepts, config.prototypes_per_concept, config.embedding_dim
            self.backbone = Backbone(config)
            channels = self.backbone.out_channels
            self.concept_head = ConceptHead(channels, K)
            self.projector = Projector(channels, D, config.projector_blocks)
            self.prototypes = nn.Parameter(F.normalize(torch.randn(K, M, D), dim=-1))
            self.task_head = TaskHead(K, M, config.num_classes)
            self.novelty = NoveltyDetector(channels)
            self.register_buffer("concept_mask", torch.ones(K, dtype=torch.bool))
            self.register_buffer("prototype_mask", torch.ones(K, M, dtype=torch.bool))
            # Mean score of each prototype over training images without its concept: what a
            # rejected concept's scores become. Zeros until stage 3 measures it.
            self.register_buffer("absent_baseline", torch.zeros(K, M))
            mean = torch.tensor(config.pixel_mean).view(1, -1, 1, 1)
            std = torch.tensor(config.pixel_std).view(1, -1, 1, 1)
            self.register_buffer("pixel_mean", mean, persistent=False)
            self.register_buffer("pixel_std", std, persistent=False)
        self._similarity_hooks: OrderedDict[int, SimilarityHook] = OrderedDict()

    # ----------------------------------------------------------------- properties
    @property
    def concepts(self) -> list[str]:
        return self.config.concepts

    @property
    def classes(self) -> list[str]:
        return self.config.classes

    @property
    def grid(self) -> FeatureGrid:
        return self.backbone.grid

    @property
    def device(self) -> torch.device:
        return self.prototypes.device

    # ----------------------------------------------------------------- hooks
    def register_similarity_hook(self, hook: SimilarityHook) -> RemovableHandle:
        """Call ``hook(model, similarity_maps)`` on (B, K, M, h, w) maps after A, in ``reason``.

        A hook may return a tensor of the same shape to replace the maps. Returns a handle
        whose ``remove()`` unregisters it.
        """
        handle = RemovableHandle(self._similarity_hooks)
        self._similarity_hooks[handle.id] = hook
        return handle

    def concept_index(self, names: Sequence[str] | set[str]) -> list[int]:
        """Positions of concept names, with a clear error for unknown ones."""
        unknown = sorted(set(names) - set(self.concepts))
        if unknown:
            raise ValueError(f"Unknown concept names {unknown}; this model's concepts are {self.concepts}.")
        return [self.concepts.index(name) for name in names]

    # ----------------------------------------------------------------- the pass
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images in [0, 1] -> f (B, C, h, w). Validates the images."""
        images = self._check_images(images)
        return self.backbone((images - self.pixel_mean) / self.pixel_std)

    def pool_concepts(self, concept_maps: torch.Tensor) -> torch.Tensor:
        """CAM (B, K, h, w) -> concept logits (B, K): global average, or log-mean-exp
        (``config.concept_pooling``, see the config for why)."""
        if self.config.concept_pooling == "mean":
            return concept_maps.mean(dim=(-2, -1))
        r = self.config.pooling_sharpness
        cells = concept_maps.shape[-1] * concept_maps.shape[-2]
        return (torch.logsumexp(r * concept_maps.flatten(-2), dim=-1) - math.log(cells)) / r

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """f (B, C, h, w) -> z (B, h, w, D), L2-normalised along D."""
        return self.projector(features.permute(0, 2, 3, 1))

    def similarity(self, patches: torch.Tensor) -> torch.Tensor:
        """z (B, h, w, D) -> S (B, K, M, h, w), cosine similarity to every prototype.

        S is a permuted view of a (B, h, w, K, M) tensor: the spatial max in ``reason`` then
        reduces over outer axes, which is several times faster than over the last two.
        """
        K, M, D = self.prototypes.shape
        prototypes = F.normalize(self.prototypes, dim=-1).view(K * M, D)
        return (patches @ prototypes.T).unflatten(-1, (K, M)).permute(0, 3, 4, 1, 2)

    def encode(self, images: torch.Tensor) -> Encoding:
        """Everything that does not depend on the user: F, C, P and S. Once per image."""
        return self.encode_features(self.features(images), tuple(images.shape[-2:]))

    def encode_features(self, features: torch.Tensor, image_size: tuple[int, int]) -> Encoding:
        """C, P and S on backbone features f (B, C, h, w): training caches f once F is frozen."""
        concept_maps = self.concept_head(features)
        return Encoding(
            similarity_maps=self.similarity(self.project(features)),
            concept_maps=concept_maps,
            concept_logits=self.pool_concepts(concept_maps),
            image_size=tuple(image_size),
            feature_distance=self.novelty.distance(features),
        )

    def reason(self, encoding: Encoding, interaction: Interaction | Sequence[Interaction] | None = None) -> Reasoning:
        """Everything the user can change: A, the masks, the spatial max and H."""
        if not isinstance(encoding, Encoding):
            raise TypeError(f"reason() takes the Encoding that encode() returns, got {type(encoding).__name__}.")
        interactions = self._check_interactions(interaction, len(encoding))
        maps = encoding.similarity_maps
        B, K, M, h, w = maps.shape
        importance = self.importance(interactions, encoding.image_size, (h, w))
        shared = per_concept = None
        if importance is not None:
            shared, per_concept = importance
            maps = maps * (shared[:, None, None] if per_concept is None else per_concept[:, :, None])
        for hook in self._similarity_hooks.values():
            replaced = hook(self, maps)
            if replaced is not None:
                if replaced.shape != maps.shape:
                    raise ValueError(f"A similarity hook returned shape {tuple(replaced.shape)}, expected {tuple(maps.shape)}.")
                maps = replaced
        if importance is None and not self._similarity_hooks:
            scores = encoding.scores  # nothing changed the maps: their maxima are known
        else:
            scores = maps.amax(dim=(-2, -1)).clamp(min=0)  # = max_hw max(A * S, 0)
        if importance is not None and self.config.box_floor:
            scores = self._floor(scores, encoding.scores, interactions)
        rejected = self._rejected(interactions, B)
        if rejected is not None:
            replacement = self.absent_baseline if self.config.rejection == "baseline" else scores.new_zeros(())
            scores = torch.where(rejected[:, :, None], replacement, scores)
        contributions, logits = self.classify(scores)
        probs = logits.softmax(-1)
        top = probs.topk(2, dim=-1).values
        margin = top[..., 0] - top[..., 1]
        if shared is None:
            shared = maps.new_ones(()).expand(B, h, w)
        if per_concept is None:
            per_concept = shared[:, None].expand(B, K, h, w)
        return Reasoning(
            similarity_maps=maps,
            importance_map=shared,
            concept_importance=per_concept,
            scores=scores,
            concept_logits=encoding.concept_logits,
            logits=logits,
            probs=probs,
            contributions=contributions,
            needs_review=margin < self.config.review_margin,
            out_of_distribution=self._novel(encoding),
        )

    def _floor(self, scores: torch.Tensor, unboxed: torch.Tensor, interactions: list[Interaction]) -> torch.Tensor:
        """s' = max(s_A, min(s, b)) on the images that have boxes: a box may take a
        prototype's score down to its absent baseline b, never below it (ours,
        docs/decisions.md#floor-at-absent). Below "absent" the task head reads "healthier
        than healthy": without the floor, true boxes cost 30 F1 points on the bundled model.

        scores, unboxed: (B, K, M) with and without the boxes (``unboxed`` before hooks).
        """
        floor = torch.minimum(unboxed, self.absent_baseline)
        floored = torch.maximum(scores, floor)
        if all(i.boxes for i in interactions):
            return floored
        boxed = torch.tensor([bool(i.boxes) for i in interactions], device=scores.device)
        return torch.where(boxed[:, None, None], floored, scores)

    def _novel(self, encoding: Encoding) -> torch.Tensor:
        """(B,) bool: beyond the novelty threshold (False where the distance is unknown)."""
        if encoding.feature_distance is None:
            return torch.zeros(len(encoding), dtype=torch.bool, device=encoding.concept_logits.device)
        return encoding.feature_distance > self.novelty.threshold

    def classify(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """H on scores (B, K, M) -> contributions (B, N, K) and logits (B, N).

        Pruned prototypes enter H as 0 after standardisation. Training calls this too, so
        the task head is fitted on exactly what ``reason`` computes.
        """
        standardised = self.task_head.standardise(scores) * self.prototype_mask
        contributions = self.task_head.contributions(standardised)
        return contributions, contributions.sum(-1) + self.task_head.bias

    def forward(self, images: torch.Tensor, interaction: Interaction | Sequence[Interaction] | None = None) -> Reasoning:
        return self.reason(self.encode(images), interaction)

    def importance(self, interactions: list[Interaction] | None, image_size: tuple[int, int],
                   cells: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Each image's boxes on the feature grid (``config.box_footprint``):

        A (B, h, w) of the boxes that act on every concept, and A_k (B, K, h, w), the map
        each concept's similarity maps are multiplied by (None when no box names a
        concept: then A_k = A). None when no image has a box.
        """
        if interactions is None or not any(i.boxes for i in interactions):
            return None
        H, W = image_size
        shared, named = [], []
        for interaction in interactions:
            boxes = [b.clipped(W, H) for b in interaction.boxes]
            if any(b is None for b in boxes):
                outside = [b for b, c in zip(interaction.boxes, boxes) if c is None]
                raise ValueError(f"Boxes {outside} lie entirely outside the {W}x{H} image (x0, y0, x1, y1 in pixels).")
            alpha = self.config.alpha if interaction.alpha is None else interaction.alpha
            common, own = concept_importance(boxes, self.concepts, H, W, alpha, self.grid, cells, self.config.box_footprint)
            shared.append(common)
            named.append(own)
        shared = np.stack(shared)
        per_concept = None
        if any(named):
            per_concept = np.repeat(shared[:, None], len(self.concepts), axis=1)
            for b, own in enumerate(named):
                for k, concept_map in own.items():
                    per_concept[b, k] = concept_map
            per_concept = torch.from_numpy(per_concept).to(self.device, self.prototypes.dtype)
        return torch.from_numpy(shared).to(self.device, self.prototypes.dtype), per_concept

    # ----------------------------------------------------------------- checks
    def _check_images(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"Images must be a torch.Tensor of shape (B, {self.config.in_channels}, H, W), got "
                f"{type(images).__name__}; csr_widgets.data.read_image converts arrays, PIL images and files."
            )
        if images.ndim != 4:
            hint = " (one image? use images.unsqueeze(0))" if images.ndim == 3 else ""
            raise ValueError(f"Images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}{hint}.")
        if images.shape[0] == 0:
            raise ValueError("Empty batch: images has 0 images.")
        if not images.is_floating_point():
            raise TypeError(
                f"Images must be floating point in [0, 1], got {images.dtype}; convert 8-bit images "
                "with images.float() / 255 (16-bit: / 65535)."
            )
        if images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Images have {images.shape[1]} channels but this model takes in_channels="
                f"{self.config.in_channels}; convert them (e.g. images.mean(1, keepdim=True) for grey, "
                "images.expand(-1, 3, -1, -1) for RGB)."
            )
        if not torch.isfinite(images).all():
            raise ValueError("Images contain NaN or infinite pixels.")
        H, W = images.shape[-2:]
        if max(H, W) > MAX_ASPECT * min(H, W):
            raise ValueError(
                f"Images of {W}x{H} px have an aspect ratio beyond {MAX_ASPECT}:1; no radiograph is that shape: "
                "crop the region of interest first."
            )
        if self.backbone.fixed_input_size and (H, W) != (self.config.image_size,) * 2:
            raise ValueError(
                f"Backbone {self.config.backbone!r} needs {self.config.image_size}x{self.config.image_size} "
                f"images, got {W}x{H}; resize them first."
            )
        smallest = 2 * self.grid.stride
        if min(H, W) < smallest:
            raise ValueError(f"Images of {W}x{H} px are smaller than this backbone's minimum of {smallest} px: "
                             f"resize them to the training size, {self.config.image_size}x{self.config.image_size}.")
        peak = float(images.max())
        if peak > 1.5:
            warnings.warn(
                f"Pixel values reach {peak:.4g}: the model expects floats in [0, 1] (these look like 0..255 "
                "or raw detector values). Divide by 255 for 8-bit images, or read files with "
                "csr_widgets.data.read_image, which scales them.", stacklevel=3)
        if (H, W) != (self.config.image_size,) * 2:
            # CNN features are not scale-invariant: the bundled 160-px model fed the same
            # phantoms at 224 px fell from 0.98 to 0.68 macro F1 (ours: warn, do not resize,
            # so that boxes stay in the pixels of the images given; the widgets resize).
            warnings.warn(
                f"These images are {W}x{H} px but the model was trained on {self.config.image_size}x"
                f"{self.config.image_size}: anatomy at another scale than in training makes the predictions "
                "unreliable. Resize them first, e.g. csr_widgets.data.resize_image(image, "
                f"{self.config.image_size}) per (C, H, W) image.", stacklevel=3)
        return images.to(self.device, self.prototypes.dtype)

    def _check_interactions(self, interaction, batch: int) -> list[Interaction] | None:
        if interaction is None:
            return None
        interactions = [interaction] * batch if isinstance(interaction, Interaction) else list(interaction)
        if not all(isinstance(i, Interaction) for i in interactions):
            raise TypeError("interaction must be an Interaction or a list of one Interaction per image.")
        if len(interactions) != batch:
            raise ValueError(f"{len(interactions)} interactions for a batch of {batch} images: give one per image, or a single Interaction for all.")
        for i in interactions:
            self.concept_index(i.named_concepts)
        return interactions

    def _rejected(self, interactions: list[Interaction] | None, batch: int) -> torch.Tensor | None:
        """(B, K) bool: concepts rejected by the model's mask or by the user; None when
        nothing is (built in Python and numpy: the lists are tiny)."""
        rejected = np.repeat(~self.concept_mask.cpu().numpy()[None], batch, axis=0)
        for b, interaction in enumerate(interactions or ()):
            rejected[b, self.concept_index(interaction.rejected)] = True
        return torch.from_numpy(rejected).to(self.device) if rejected.any() else None

    # ----------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Write weights and config to one safetensors file (config as JSON in its header)."""
        save_model(self, path)

    @classmethod
    def load(cls, path, device=None, config: CSRConfig | None = None) -> "CSRModel":
        """Rebuild a saved model; refuses files that do not match ``config`` when given."""
        model = cls(read_config(path, expected=config))
        load_weights(model, path)
        return model.to(device) if device is not None else model
