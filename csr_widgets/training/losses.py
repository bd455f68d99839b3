"""The losses of the three stages, vectorised over concepts and prototypes."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def concept_loss(concept_logits: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Stage 1: multi-label BCE. concept_logits (B, K), concepts (B, K) in {0, 1}."""
    return F.binary_cross_entropy_with_logits(concept_logits, concepts.float())


def box_loss(concept_maps: torch.Tensor, box_cells: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Optional stage-1 term (ours, docs/decisions.md#concept-box-term): -log of the share of
    each boxed concept's pooling weight softmax_hw(r CAM) that lies on its boxes' cells.

    concept_maps (B, K, h, w), box_cells (B, K, h, w) bool (a concept without a box: all
    False, left out), sharpness r -> mean over the boxed (image, concept) pairs; 0 when
    there is none. softmax(r CAM) is the gradient of the log-mean-exp pooling, so the term
    asks that the evidence the concept logit reads lie on the finding.
    """
    boxed = box_cells.flatten(2).any(-1)  # (B, K)
    if not boxed.any():
        return concept_maps.sum() * 0.0
    log_weights = (sharpness * concept_maps.flatten(2)).log_softmax(-1)  # (B, K, hw)
    inside = log_weights.masked_fill(~box_cells.flatten(2), -torch.inf).logsumexp(-1)
    return -inside[boxed].mean()


def local_concept_vectors(features: torch.Tensor, concept_maps: torch.Tensor) -> torch.Tensor:
    """Eq. 2: v_k = sum_hw softmax_hw(CAM_k)(h, w) * f(h, w).

    features (B, C, h, w), concept_maps (B, K, h, w) -> v (B, K, C).
    """
    weights = concept_maps.flatten(2).softmax(-1)  # (B, K, hw)
    return weights @ features.flatten(2).transpose(1, 2)


def soft_assignment(similarities: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 7: q_km = softmax_m(gamma * <p_km, v'>). similarities (..., K, M) -> (..., K, M)."""
    return (gamma * similarities).softmax(-1)


def concept_similarities(vectors: torch.Tensor, prototypes: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: sim_k = sum_m q_km <p_km, v'>, for each vector against every concept.

    vectors (V, D) and prototypes (K, M, D), both L2-normalised -> sim (V, K) and the raw
    cosines (V, K, M).
    """
    cosines = torch.einsum("vd,kmd->vkm", vectors, prototypes)
    return (soft_assignment(cosines, gamma) * cosines).sum(-1), cosines


def prototype_loss(vectors: torch.Tensor, concepts: torch.Tensor, prototypes: torch.Tensor, lambda_: float, gamma: float, delta: float) -> torch.Tensor:
    """Eq. 9 (SoftTriple form): cross-entropy over lambda * (sim_k - delta * [k = c]).

    vectors (V, D) projected local concept vectors, concepts (V,) their concept index,
    prototypes (K, M, D) L2-normalised. Subtracting delta from the true concept's logit
    makes it a margin (ours: the paper's printed sign is ambiguous;
    docs/decisions.md#margin-sign).
    """
    sim, _ = concept_similarities(vectors, prototypes, gamma)
    margin = delta * F.one_hot(concepts, sim.shape[-1]).to(sim.dtype)
    return F.cross_entropy(lambda_ * (sim - margin), concepts)


def pixel_loss(similarity_maps: torch.Tensor, concepts: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Optional stage-2 term (ours, docs/decisions.md#pixel-loss): max similarity high for
    present concepts, low for absent.

    similarity_maps (B, K, M, h, w), concepts (B, K) -> BCE on lambda * (max_mhw S - 1/2).
    """
    peak = similarity_maps.amax(dim=(2, 3, 4))
    return F.binary_cross_entropy_with_logits(lambda_ * (peak - 0.5), concepts.float())
