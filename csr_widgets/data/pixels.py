"""Medical pixels: every image the package reads becomes a float tensor (C, H, W) in [0, 1].

One place decides how stored values become brightness:
- DICOM (pydicom): modality LUT (rescale slope/intercept), then the VOI transform (a VOI
  LUT, else the window centre/width with the DICOM linear, linear-exact or sigmoid
  function, else the image's own min..max), then MONOCHROME1 is inverted so that bright
  always means dense. 12- to 16-bit data is never squeezed to 8 bits on the way.
- PNG/JPEG/TIFF (Pillow): 8-bit divided by 255, 16-bit (mode I;16) by 65535, both only
  at the final float conversion, so 16-bit PNGs keep their full depth.
- numpy arrays, torch tensors and PIL images in memory follow the same rules, so a
  widget can accept any of them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_DICOM_SUFFIXES = {".dcm", ".dicom"}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def read_image(source, channels: int | None = None, window="auto") -> torch.Tensor:
    """Any image -> FloatTensor (C, H, W) in [0, 1].

    source: a path (PNG, JPEG, TIFF, DICOM, by suffix or by the DICM magic), a PIL image,
        a pydicom Dataset, a numpy array (H, W) or (H, W, C), or a tensor (H, W) or
        (C, H, W) (either layout is recognised when unambiguous; C in 1, 3, 4, alpha is
        dropped). uint8 is divided by 255, uint16 by 65535; other integers and floats
        outside [0, 1] are rescaled by their own min..max; floats in [0, 1] are kept.
    channels: None keeps 1 (grey) or 3 (colour); 1 converts colour to luma; 3 repeats grey.
    window: DICOM only, see ``read_dicom``.
    Raises FileNotFoundError for a missing file, ValueError for an unreadable one.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        array = read_dicom(path, window) if _is_dicom(path) else _read_with_pillow(path)
    elif _is_pydicom_dataset(source):
        array = read_dicom(source, window)
    elif _is_pil(source):
        array = _pil_to_array(source)
    elif isinstance(source, torch.Tensor):
        array = _channels_last(source.detach().cpu().numpy(), prefer_first=True)
    elif isinstance(source, np.ndarray):
        array = _channels_last(source, prefer_first=False)
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}")
    image = torch.from_numpy(np.ascontiguousarray(_to_unit_float(array)))
    image = image.permute(2, 0, 1) if image.ndim == 3 else image[None]
    return to_channels(image, channels)


def read_dicom(source, window="auto") -> np.ndarray:
    """A DICOM file or pydicom Dataset -> float32 (H, W) in [0, 1], or (H, W, 3) for colour.

    window: "auto" (the file's VOI LUT, else its first window centre/width, else the
    image's min..max), None (min..max of the modality values), or (centre, width) in
    modality units (e.g. Hounsfield units), applied with the DICOM linear function.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = getattr(source, "filename", None) or "<dataset>"
    if isinstance(source, (str, Path)):
        name = str(source)
        try:
            source = pydicom.dcmread(source)
        except (InvalidDicomError, OSError, EOFError, ValueError) as error:
            raise ValueError(f"cannot read DICOM {name}: {error}") from None
    ds = source
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"cannot read DICOM {name}: it has {frames} frames; only single images are supported")
    if "PixelData" not in ds:
        raise ValueError(f"cannot read DICOM {name}: it has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises many kinds for missing codecs/bad data
        raise ValueError(f"cannot decode DICOM {name}: {error}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        return _dicom_colour(ds, pixels, photometric)
    out = _apply_voi(_apply_modality_lut(pixels, ds), ds, window)
    if photometric == "MONOCHROME1":  # stored inverted: low values are dense
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def resize_image(image: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) -> (C, h, w), size an int (square) or (h, w). Bilinear with antialiasing
    (so downsizing a radiograph does not alias its fine texture), or "nearest" for masks."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[-2:]) == (h, w):
        return image
    if mode == "nearest":
        return F.interpolate(image[None].float(), size=(h, w), mode="nearest")[0].to(image.dtype)
    out = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def to_channels(image: torch.Tensor, channels: int | None) -> torch.Tensor:
    """(C, H, W) with C in 1, 3 -> C == channels (None: unchanged)."""
    if channels is None or image.shape[0] == channels:
        return image
    if channels == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    if channels == 1 and image.shape[0] == 3:
        return torch.einsum("chw,c->hw", image, torch.from_numpy(_LUMA))[None]
    raise ValueError(f"cannot turn a {image.shape[0]}-channel image into {channels} channels")


# -- helpers ----------------------------------------------------------------------------


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        head = handle.read(132)
    return head[128:132] == b"DICM"


def _is_pydicom_dataset(source) -> bool:
    return type(source).__module__.startswith("pydicom")


def _is_pil(source) -> bool:
    return type(source).__module__.startswith("PIL")


def _read_with_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return _pil_to_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def _pil_to_array(image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)  # big-endian variants become native
    if mode == "I":
        array = np.asarray(image)
        # Pillow opens some 16-bit files as 32-bit "I": keep them on the 16-bit scale
        fits16 = array.size and array.min() >= 0 and array.max() <= 65535
        return array.astype(np.uint16) if fits16 else array
    if mode in ("L", "RGB", "F"):
        return np.asarray(image)
    if mode in ("1", "LA", "La"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ...: alpha dropped


def _channels_last(array: np.ndarray, prefer_first: bool) -> np.ndarray:
    """Normalise the layout to (H, W) or (H, W, C) with C in 1, 3 (alpha dropped)."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        return array
    if array.ndim != 3:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {tuple(array.shape)}")
    first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
    if first and (prefer_first or not last):
        array = np.moveaxis(array, 0, -1)
    elif not last:
        raise ValueError(f"cannot tell the channel axis of an image of shape {tuple(array.shape)}")
    if array.shape[-1] == 4:
        array = array[..., :3]
    return array[..., 0] if array.shape[-1] == 1 else array


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    values = array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating) and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        return values
    return _min_max(values)


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return (values - lo) / (hi - lo)


def _apply_modality_lut(pixels: np.ndarray, ds) -> np.ndarray:
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut(pixels, ds)


def _apply_voi(modality: np.ndarray, ds, window) -> np.ndarray:
    values = modality.astype(np.float32)
    if window is None:
        return _min_max(values)
    if window != "auto":
        centre, width = window
        return _window(values, float(centre), float(width), "LINEAR")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        try:
            from pydicom.pixels import apply_voi
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_voi
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # a LUT is indexed by stored integers: round what a rescale made fractional
        indices = modality if np.issubdtype(modality.dtype, np.integer) else np.round(modality).astype(np.int64)
        return np.asarray(apply_voi(indices, ds), np.float32) / float(2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = (_first(ds.WindowCenter), _first(ds.WindowWidth))
        return _window(values, centre, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
    return _min_max(values)


def _first(value) -> float:
    """Window tags may be multi-valued (several suggested windows): use the first."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The DICOM VOI functions (PS3.3 C.11.2.1.2), output scaled to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    if width <= 1.0:
        return (values > centre - 0.5).astype(np.float32)
    return np.clip((values - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _dicom_colour(ds, pixels: np.ndarray, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_color_lut
        pixels = apply_color_lut(pixels, ds)
        depth = 16 if pixels.dtype == np.uint16 else 8
    else:
        depth = int(ds.get("BitsStored", 8))
    return pixels.astype(np.float32) / float(2**depth - 1)
