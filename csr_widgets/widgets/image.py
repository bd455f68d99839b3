"""Images into the widgets: read anything the user has, then prepare it for model and screen.

``read_image`` defers to ``csr_widgets.data.read_image`` (the package's one image reader:
tensor, numpy, PIL, PNG/JPEG/DICOM paths, 8/16 bit) when it exists, and otherwise uses the
small reader below, which covers the same inputs except DICOM windowing subtleties. The
rest of this module only ever sees a float tensor (C, H, W) in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

_INTEGER_RANGES = {np.uint8: 255.0, np.uint16: 65535.0, np.int16: 32767.0, np.int32: 65535.0}


def read_image(source) -> torch.Tensor:
    """Any supported image -> FloatTensor (C, H, W) in [0, 1], C = 1 or 3."""
    try:
        from ..data import read_image as shared_reader  # the package's reader, once it exists
    except ImportError:
        shared_reader = None
    image = shared_reader(source) if shared_reader is not None else _read(source)
    return _checked(image)


def _read(source) -> torch.Tensor:
    if isinstance(source, (str, Path)):
        return _read_path(Path(source))
    if isinstance(source, torch.Tensor):
        return _from_array(source.detach().cpu().numpy(), channels_first=True)
    if isinstance(source, np.ndarray):
        return _from_array(source, channels_first=None)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(source, Image.Image):
        return _from_pil(source)
    raise TypeError(
        f"Cannot read an image from {type(source).__name__}: give a torch tensor (C, H, W), a numpy "
        "array (H, W) or (H, W, C), a PIL image, or a path to a PNG, JPEG or DICOM file."
    )


def _read_path(path: Path) -> torch.Tensor:
    if not path.exists():
        raise FileNotFoundError(f"No image file at {path}.")
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
            pixels = 1.0 - pixels  # MONOCHROME1 stores bright as low values
        return torch.from_numpy(pixels)[None]
    from PIL import Image

    with Image.open(path) as image:
        return _from_pil(image)


def _from_pil(image) -> torch.Tensor:
    if image.mode.startswith("I"):  # 16-bit greyscale PNGs open as "I;16" or "I"
        return torch.from_numpy(np.asarray(image).astype(np.float32) / 65535.0)[None]
    if image.mode == "F":
        return torch.from_numpy(np.asarray(image, dtype=np.float32))[None]
    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "LA") else "RGB")
    return _from_array(np.asarray(image), channels_first=False)


def _from_array(array: np.ndarray, channels_first: bool | None) -> torch.Tensor:
    """(H, W), (C, H, W) or (H, W, C) array -> (C, H, W) float in [0, 1]."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        if channels_first is None:  # numpy: channels last unless the first axis looks like channels
            channels_first = array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
        if not channels_first:
            array = np.moveaxis(array, -1, 0)
    else:
        raise ValueError(f"An image must be 2-D (H, W) or 3-D (C, H, W)/(H, W, C), got shape {array.shape}.")
    if array.shape[0] == 4:
        array = array[:3]  # drop alpha
    if array.shape[0] not in (1, 3):
        raise ValueError(f"An image needs 1 or 3 channels, got {array.shape[0]} (shape {array.shape}).")
    if array.dtype == np.bool_:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        scale = _INTEGER_RANGES.get(array.dtype.type, float(np.iinfo(array.dtype).max))
        if array.dtype == np.int32 and array.max() <= 255:
            scale = 255.0
        array = array.astype(np.float32) / scale
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _checked(image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"An image must become a (C, H, W) tensor with C = 1 or 3, got {shape}.")
    image = image.float()
    if not torch.isfinite(image).all():
        raise ValueError("The image contains NaN or infinite pixels.")
    low, high = float(image.min()), float(image.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"Float images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; divide 8-bit "
            "images by 255 and 16-bit images by 65535 (or pass the integer array as it is)."
        )
    return image.clamp(0, 1)


def model_input(image: torch.Tensor, in_channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) in [0, 1] -> (1, in_channels, *size): channels matched, resized.

    Resizing is bilinear with antialiasing and ``align_corners=False``, so image edges map
    to input edges: exactly the scaling ViewGeometry applies to boxes.
    """
    if image.shape[0] != in_channels:
        image = image.mean(0, keepdim=True) if in_channels == 1 else image.expand(3, -1, -1)
    batch = image[None]
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return batch.clamp(0, 1).contiguous()


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
