"""Is this image like the training images? A density of pooled backbone features.

A CSR model explains its answer in concepts it learned from its training images; on an
image unlike all of them (a real film for a model trained on phantoms, a photograph, a
blank frame, the right anatomy at the wrong scale) its probabilities mean nothing, and a
high one must not read as "Confident" (docs/decisions.md#out-of-distribution).

The statistic (ours): the Mahalanobis distance of the image's globally pooled feature
map f to the training images' pooled features, under a Gaussian with a Ledoit-Wolf
shrunk covariance (Lee et al., NeurIPS 2018, use the same statistic on a classifier's
features). An image is out of distribution when its distance exceeds a quantile (0.99)
of the validation images' distances. Measured on the bundled model: 0.0% of held-out
SyntheticCXR images flagged; a real PA chest film at 4.3x the threshold, a photograph,
blank, grey and gradient images at 3.2-5.7x (docs/decisions.md#out-of-distribution).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class NoveltyDetector(nn.Module):
    """Mahalanobis distance of pooled features, and the threshold beyond which an image is novel.

    Buffers (saved in every checkpoint): mean (C,), precision (C, C), threshold () (inf
    until ``fit``: an uncalibrated detector flags nothing).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("precision", torch.eye(channels))
        self.register_buffer("threshold", torch.tensor(math.inf))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    @staticmethod
    def pool(features: torch.Tensor) -> torch.Tensor:
        """f (B, C, h, w) -> (B, C), the spatial mean."""
        return features.mean(dim=(-2, -1))

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """f (B, C, h, w) -> (B,) Mahalanobis distance of the pooled features."""
        centred = self.pool(features).to(self.mean) - self.mean
        return ((centred @ self.precision) * centred).sum(-1).clamp(min=0).sqrt()

    @torch.no_grad()
    def fit(self, train_features: torch.Tensor, val_features: torch.Tensor | None = None, quantile: float = 0.99) -> None:
        """Fit the Gaussian on (n, C, h, w) training features (pooled here) and set the
        threshold at ``quantile`` of the validation images' distances (of the training
        images' when there is no validation set)."""
        from sklearn.covariance import LedoitWolf

        if not 0 < quantile < 1:
            raise ValueError(f"quantile must lie in (0, 1), got {quantile}.")
        pooled = self.pool(train_features).double().cpu().numpy()
        if len(pooled) < 2:
            raise ValueError(f"Fitting the novelty statistics needs at least 2 training images, got {len(pooled)}.")
        estimate = LedoitWolf().fit(pooled)
        self.mean.copy_(torch.from_numpy(estimate.location_))
        self.precision.copy_(torch.from_numpy(estimate.precision_))
        reference = train_features if val_features is None or len(val_features) == 0 else val_features
        distances = self.distance(reference.to(self.mean.device)).cpu().numpy()
        self.threshold.fill_(float(np.quantile(distances, quantile)))
