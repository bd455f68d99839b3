"""The learned parts after the backbone: concept head C, projector P, task head H."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConceptHead(nn.Conv2d):
    """C: a 1x1 convolution without bias, f (B, C, h, w) -> CAM (B, K, h, w)."""

    def __init__(self, channels: int, num_concepts: int):
        super().__init__(channels, num_concepts, kernel_size=1, bias=False)


class ResidualBlock(nn.Module):
    """x + ReLU(LayerNorm(Linear(x))): one block of the projector, acting on the last axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.norm(self.linear(x)))


class Projector(nn.Module):
    """P: (..., C) -> (..., D), L2-normalised along D.

    A 1x1 convolution is a linear map on each patch vector, so P is written on the last
    axis and maps single vectors (stage 2) and every patch (inference) identically. The
    norm is LayerNorm over D for the same reason (ours: the paper's IBN normalises
    differently on vectors and on patches; docs/decisions.md#projector-layernorm).
    """

    def __init__(self, channels: int, dim: int, blocks: int = 3):
        super().__init__()
        self.inp = nn.Linear(channels, dim)
        self.blocks = nn.Sequential(*(ResidualBlock(dim) for _ in range(blocks)))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.blocks(self.inp(vectors)), dim=-1)


class TaskHead(nn.Module):
    """H: fixed per-prototype standardisation of the scores, then Linear(K*M -> N) with bias.

    The standardisation (ours, docs/decisions.md#task-head-standardisation) is measured
    on the training set when stage 3 starts: raw scores live in a narrow band near their
    maximum, and a plain linear head on them collapses. Pruned prototypes enter H as
    exactly 0 after standardisation.
    """

    def __init__(self, num_concepts: int, prototypes_per_concept: int, num_classes: int):
        super().__init__()
        shape = (num_concepts, prototypes_per_concept)
        self.register_buffer("score_mean", torch.zeros(shape))
        self.register_buffer("score_std", torch.ones(shape))
        self.linear = nn.Linear(num_concepts * prototypes_per_concept, num_classes)

    def standardise(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K, M) raw scores -> (B, K, M) standardised scores."""
        return (scores - self.score_mean) / self.score_std

    def contributions(self, standardised: torch.Tensor) -> torch.Tensor:
        """(B, K, M) standardised scores -> (B, N, K): each concept's share of each logit."""
        weight = self.linear.weight.view(-1, *standardised.shape[1:])  # (N, K, M)
        # (K, B, M) @ (K, M, N) -> (K, B, N): one batched matmul, no einsum dispatch per event
        return torch.bmm(standardised.transpose(0, 1), weight.permute(1, 2, 0)).permute(1, 2, 0)

    @property
    def bias(self) -> torch.Tensor:
        return self.linear.bias
