"""Images into the widgets: read anything the user has, then prepare it for model and screen.

Reading is ``csr_widgets.data.read_image``'s job; after it, the widgets only ever see a
float tensor (C, H, W) in [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..data.pixels import read_image as _read_image
from ..data.pixels import resize_image, to_channels


def read_image(source) -> torch.Tensor:
    """Any supported image -> FloatTensor (C, H, W) in [0, 1], C = 1 or 3 (the package's
    one reader, ``csr_widgets.data.read_image``: tensor, numpy, PIL, PNG/JPEG/DICOM paths,
    8/16 bit), checked for what the widgets rely on."""
    image = _read_image(source)
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"An image must become a (C, H, W) tensor with C = 1 or 3, got {shape}.")
    if not torch.isfinite(image).all():
        raise ValueError("The image contains NaN or infinite pixels.")
    return image.float().clamp(0, 1)


def model_input(image: torch.Tensor, in_channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (1, in_channels, *size), exactly as the data pipeline
    prepares training images (``to_channels``, ``resize_image``: bilinear, antialiased,
    ``align_corners=False``, so image edges map to input edges: the scaling ViewGeometry
    applies to boxes)."""
    return resize_image(to_channels(image, in_channels), tuple(size))[None].contiguous()


def display_rgba(image: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (h, w, 4) uint8 RGBA at the canvas size, fully opaque.

    RGBA, because ipycanvas sends RGB arrays as JPEG (lossy) and RGBA as PNG (lossless).
    """
    batch = image[None].float()
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    pixels = (batch[0].clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    alpha = np.full(pixels.shape[:2] + (1,), 255, np.uint8)
    return np.ascontiguousarray(np.concatenate([pixels, alpha], axis=-1))
