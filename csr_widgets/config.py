"""CSRConfig: every choice that shapes a CSR model, in one validated dataclass."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

REJECTION_STRATEGIES = ("baseline", "zero")
BOX_FOOTPRINTS = ("touch", "area")
CONCEPT_POOLINGS = ("mean", "lse")


@dataclass
class CSRConfig:
    """The configuration of a :class:`~csr_widgets.CSRModel`.

    Symbols follow docs/method.md#symbols: K concepts, M prototypes per concept, D embedding
    dimensions, N classes. Every field is plain data, so a config round-trips through JSON
    (it is stored inside every checkpoint).
    """

    # Concept names, in the order of the concept vector and of the K axis of every tensor.
    concepts: list[str] = field(default_factory=list)
    # Class names, in the order of the N axis of logits and probs.
    classes: list[str] = field(default_factory=list)
    # timm model name of the backbone F (any CNN with features_only, or a ViT).
    backbone: str = "resnet18"
    # Load timm's pretrained weights (downloads them: only for users who are online).
    pretrained: bool = False
    # Which backbone stage gives f: a timm `out_indices` entry (e.g. 2 = stride 8 for a
    # resnet), or None for the last stage via `forward_features` (ViTs always use this).
    feature_stage: int | None = None
    # M: prototypes per concept (paper: 100).
    prototypes_per_concept: int = 10
    # D: dimension of the projected space shared by patches and prototypes (paper: 256).
    embedding_dim: int = 128
    # Residual blocks of the projector P after its first linear map
    # (docs/method.md#the-model).
    projector_blocks: int = 3
    # Side of the (square) training input in pixels; also the probe size for the grid.
    image_size: int = 224
    # Image channels the backbone takes: 1 for radiographs, 3 for RGB (e.g. dermoscopy).
    in_channels: int = 1
    # Per-channel mean and std that the model subtracts/divides from images in [0, 1];
    # one value is broadcast to every channel.
    pixel_mean: list[float] = field(default_factory=lambda: [0.5])
    pixel_std: list[float] = field(default_factory=lambda: [0.25])
    # Pixel of the input on which feature cell j is centred is `cell_offset + stride * j`.
    # None measures it once from the backbone (0 for "same"-padded CNNs, (stride-1)/2 for
    # patchify stems and ViTs). See model/grid.py.
    cell_offset: float | None = None
    # alpha (Eq. 13): importance outside the positive boxes when at least one exists.
    alpha: float = 0.2
    # How a box reaches the feature cells: "touch" (ours: it acts fully on every cell that
    # owns a pixel it overlaps) or "area" (the paper's A averaged over each cell's pixels,
    # which left a 1-cell nodule box at A ~ 0.6 on its own peak and let negative boxes
    # leak; docs/decisions.md#boxes-act-on-cells).
    box_footprint: str = "touch"
    # A box lowers a prototype's score only down to its absent baseline b, never below:
    # s' = max(s_A, min(s, b)) (ours). False is the paper's Eqs. 12-13 alone, where alpha
    # pushed unboxed concepts far below "absent" and true boxes cost 30 F1 points
    # (docs/decisions.md#floor-at-absent).
    box_floor: bool = True
    # lambda (Eq. 9): scale of the similarities inside the prototype loss.
    lambda_: float = 20.0
    # gamma (Eq. 7): sharpness of the soft assignment of a vector to its M prototypes.
    gamma: float = 1000.0
    # delta (Eq. 9): margin subtracted from the true concept's logit.
    delta: float = 0.1
    # What a rejected concept's scores become: "baseline" (its mean score on training
    # images without the concept; ours, docs/decisions.md#rejection-baseline) or "zero" (the
    # paper's choice).
    rejection: str = "baseline"
    # A case is flagged for review when p(top-1) - p(top-2) is below this.
    review_margin: float = 0.3
    # Stage 3: probability of replacing an absent concept's scores by its absent baseline
    # (in a second copy of the rows), so that rejecting a concept at test time stays in
    # distribution; present concepts are never dropped (ours, docs/decisions.md#concept-dropout).
    concept_dropout: float = 0.1
    # How the concept head's maps become concept logits: "mean" (global average pooling,
    # the paper's) or "lse" (log-mean-exp, a smooth maximum; ours). GAP lets a concept be
    # read from weak evidence spread over the whole image (or from its absence, e.g. "no
    # dark air at the lung base" for effusion), so its CAM need not peak on the finding;
    # a smooth maximum has to put the evidence somewhere, and Eq. 2's concept vectors and
    # the Pointing Game both follow the peak (docs/decisions.md#concept-pooling).
    concept_pooling: str = "mean"
    # r of the "lse" pooling, (1/r) log mean_hw exp(r CAM): large r approaches the max,
    # r -> 0 the mean.
    pooling_sharpness: float = 4.0
    # Stage 2: weight of the optional pixel-level term (max similarity high for present
    # concepts, low for absent ones; ours, off by default: docs/decisions.md#pixel-loss).
    pixel_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        self.concepts = list(self.concepts)
        self.classes = list(self.classes)
        self.pixel_mean = [float(v) for v in _as_list(self.pixel_mean)]
        self.pixel_std = [float(v) for v in _as_list(self.pixel_std)]
        self.validate()

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot work."""
        for name in ("concepts", "classes"):
            names = getattr(self, name)
            if not names:
                raise ValueError(f"CSRConfig.{name} is empty: give at least one name.")
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"CSRConfig.{name} must be non-empty strings, got {names!r}.")
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"CSRConfig.{name} has duplicate names: {duplicates}.")
        if len(self.classes) < 2:
            raise ValueError("CSRConfig.classes needs at least two classes.")
        for name in ("prototypes_per_concept", "embedding_dim", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CSRConfig.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.projector_blocks, int) or self.projector_blocks < 0:
            raise ValueError(f"CSRConfig.projector_blocks must be >= 0, got {self.projector_blocks!r}.")
        if self.in_channels not in (1, 3):
            raise ValueError(f"CSRConfig.in_channels must be 1 or 3, got {self.in_channels!r}.")
        for name in ("pixel_mean", "pixel_std"):
            values = getattr(self, name)
            if len(values) not in (1, self.in_channels):
                raise ValueError(
                    f"CSRConfig.{name} needs 1 or in_channels={self.in_channels} values, got {values}."
                )
        if any(v <= 0 for v in self.pixel_std):
            raise ValueError(f"CSRConfig.pixel_std must be positive, got {self.pixel_std}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"CSRConfig.alpha must lie in [0, 1], got {self.alpha}.")
        for name in ("lambda_", "gamma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CSRConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.box_footprint not in BOX_FOOTPRINTS:
            raise ValueError(f"CSRConfig.box_footprint must be one of {BOX_FOOTPRINTS}, got {self.box_footprint!r}.")
        if not isinstance(self.box_floor, bool):
            raise ValueError(f"CSRConfig.box_floor must be True or False, got {self.box_floor!r}.")
        if self.rejection not in REJECTION_STRATEGIES:
            raise ValueError(
                f"CSRConfig.rejection must be one of {REJECTION_STRATEGIES}, got {self.rejection!r}."
            )
        for name in ("review_margin", "concept_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"CSRConfig.{name} must lie in [0, 1], got {getattr(self, name)}.")
        if self.concept_pooling not in CONCEPT_POOLINGS:
            raise ValueError(
                f"CSRConfig.concept_pooling must be one of {CONCEPT_POOLINGS}, got {self.concept_pooling!r}."
            )
        if self.pooling_sharpness <= 0:
            raise ValueError(f"CSRConfig.pooling_sharpness must be positive, got {self.pooling_sharpness}.")
        if self.pixel_loss_weight < 0:
            raise ValueError(f"CSRConfig.pixel_loss_weight must be >= 0, got {self.pixel_loss_weight}.")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError("CSRConfig.backbone must be a timm model name, e.g. 'resnet18'.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CSRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown CSRConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "CSRConfig":
        return cls.from_dict(json.loads(text))

    def differences(self, other: "CSRConfig") -> list[str]:
        """Human-readable lines `field: mine != theirs` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
