"""The three training stages: what each one trains (the table, docs/method.md#training) and
how long and how fast (``TrainingPlan``).

| stage | name       | trains                          | frozen                          | loss                               |
|-------|------------|---------------------------------|---------------------------------|------------------------------------|
| 1     | concepts   | backbone F, concept head C      | projector P, prototypes p, H    | BCE on concept logits (+ box term) |
| 2     | prototypes | projector P, prototypes p       | F, C, H                         | SoftTriple (Eqs. 6-9)              |
| 3     | task       | task head H                     | F, C, P, p                      | cross-entropy on labels            |

``set_stage`` is the only place in the package that touches ``requires_grad``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

STAGES: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("concepts", ("backbone", "concept_head")),
    2: ("prototypes", ("projector", "prototypes")),
    3: ("task", ("task_head",)),
}


@dataclass
class TrainingPlan:
    """How long and how fast each stage trains."""

    concept_epochs: int = 15  # stage 1 epochs over the training images
    prototype_epochs: int = 30  # stage 2 epochs over the local concept vectors
    task_epochs: int = 300  # stage 3 L-BFGS iterations at most, each a full pass over the cached scores (it stops at the optimum)
    batch_size: int = 32  # images per stage-1 step
    vector_batch_size: int = 256  # local concept vectors per stage-2 step
    concept_lr: float = 1e-3  # AdamW, cosine decay, stage 1
    prototype_lr: float = 1e-3  # AdamW, stage 2
    task_l2: float = 1e-5  # stage 3: L2 penalty on H's weights, beside the mean cross-entropy (chosen on validation)
    # Stage 1: weight of the box term beside the BCE, -log of the share of each present
    # concept's pooling weight softmax_hw(r CAM) that falls on its boxes' cells. 0: image-level
    # labels only (the paper's); > 0 needs training images with concept boxes (ours,
    # docs/decisions.md#concept-box-term).
    concept_box_weight: float = 0.0
    weight_decay: float = 1e-4  # on weights; never on prototypes, norms or biases
    seed: int = 0  # everything random in training follows from it
    # How the work runs; none of these changes what is learnt beyond rounding
    # (docs/training.md). Batches are per process: with N processes a step sees N x batch_size.
    accumulation_steps: int = 1  # stage-1 batches whose gradients add up to one optimiser step
    num_workers: int = 0  # DataLoader worker processes reading and decoding images
    bf16: bool | None = None  # bfloat16 autocast for the images' pass; None: on CUDA only
    channels_last: bool | None = None  # NHWC layout for the convolutions; None: on CUDA only

    def __post_init__(self) -> None:
        if not self.concept_box_weight >= 0:
            raise ValueError(f"TrainingPlan.concept_box_weight must be >= 0, got {self.concept_box_weight!r}.")
        for name in ("concept_epochs", "prototype_epochs", "task_epochs", "num_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainingPlan.{name} must be an integer >= 0, got {getattr(self, name)!r}.")
        for name in ("batch_size", "vector_batch_size", "accumulation_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainingPlan.{name} must be an integer >= 1, got {getattr(self, name)!r}.")

    def uses_bf16(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.bf16 is None else self.bf16

    def uses_channels_last(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.channels_last is None else self.channels_last


def trainable_parts(stage: int) -> tuple[str, ...]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}.")
    return STAGES[stage][1]


def set_stage(model: nn.Module, stage: int) -> list[nn.Parameter]:
    """Make exactly the parts of ``stage`` trainable; return their parameters.

    Frozen parts are also put in eval mode, so a frozen backbone's BatchNorm statistics
    stay fixed while later stages train.
    """
    parts = trainable_parts(stage)
    for name, child in model.named_children():
        child.requires_grad_(name in parts)
        child.train(name in parts)
    model.prototypes.requires_grad_("prototypes" in parts)
    return [p for p in model.parameters() if p.requires_grad]
