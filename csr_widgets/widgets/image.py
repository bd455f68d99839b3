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


def check_size(image: torch.Tensor, minimum: int, max_aspect: float, trained: int) -> None:
    """Refuse, with the fix, an image the model cannot read sensibly. The explorer resizes
    every image to the model's input size, so the image as given is what is checked: a
    1 x 1 image would become a flat grey square and a 20000 x 20 strip a smear, and the
    model would answer both with confidence.

    minimum: the backbone's smallest side (pixels); max_aspect: longer over shorter side;
    trained: the side the model was trained on (named in the messages).
    """
    H, W = image.shape[-2:]
    if max(H, W) > max_aspect * min(H, W):
        raise ValueError(
            f"The image is {W}x{H} px: an aspect ratio beyond {max_aspect:g}:1, unlike any radiograph. "
            f"Crop the region of interest (the model was trained on {trained}x{trained} images)."
        )
    if min(H, W) < minimum:
        raise ValueError(
            f"The image is {W}x{H} px, smaller than this model's minimum of {minimum} px a side: there is "
            f"nothing to see in it. Give the original image (the model was trained on {trained}x{trained})."
        )


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
