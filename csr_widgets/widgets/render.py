"""Pure rendering: numpy/torch in, RGBA uint8 out. No widgets here.

Heatmaps are carried from feature cells to pixels by the model's FeatureGrid only (cell j
sits on input pixel ``offset + stride * j``); a plain resize would put a resnet's maxima
half a cell off (docs/decisions.md#cell-centres). The explorer renders them on the
model-input pixels (or every q-th of them, at most MAX_LATTICE_SIDE a side: about a
millisecond to PNG-encode) and lets the browser scale that small RGBA map to the canvas, a
scaling per axis (see geometry.py).

Every array sent to ipycanvas is RGBA uint8: ipycanvas encodes RGB arrays as JPEG (lossy),
RGBA as PNG (lossless).
"""
from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch

from ..model import FeatureGrid
from .overlay import label_position

DEFAULT_COLORMAP = "viridis"  # perceptually uniform and colour-blind safe
COLORMAPS = ("viridis", "cividis", "magma", "inferno", "plasma")
# Box colours from the Okabe-Ito palette (colour-blind safe); negatives are also dashed, so
# colour is never the only cue.
POSITIVE_COLOR = "#0072B2"
NEGATIVE_COLOR = "#D55E00"
SELECTED_COLOR = "#F0E442"
POSITIVE_RGB = (0x00, 0x72, 0xB2)
NEGATIVE_RGB = (0xD5, 0x5E, 0x00)
# The cells a box acts on are shaded faintly under it: enough to see which cells, not so
# much that the heatmap under them is hidden.
CELL_FILL_ALPHA = 0.12
CELL_EDGE_ALPHA = 0.45
# Heatmap pixels a side. Maps are linear between 16-28 cells a side, so 2-4 lattice pixels
# per cell, scaled (bilinearly) by the browser, look the same as more; PNG encoding time
# grows with the pixel count and is most of the kernel's cost of an update.
MAX_LATTICE_SIDE = 96


@functools.lru_cache(maxsize=16)
def colormap_lut(name: str) -> np.ndarray:
    """(256, 4) uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"Unknown colormap {name!r}; colour-blind-safe choices: {', '.join(COLORMAPS)}.") from None
    lut = (cmap(np.linspace(0.0, 1.0, 256)) * 255 + 0.5).astype(np.uint8)
    lut.flags.writeable = False
    return lut


def colorize(values: np.ndarray, colormap: str = DEFAULT_COLORMAP, opacity: float = 1.0, fade: bool = True) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 4) RGBA uint8.

    fade: alpha grows with the value, so low similarity stays transparent and the anatomy
    shows through; otherwise alpha is uniform. ``opacity`` scales alpha in both cases.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"colorize takes a 2-D map, got shape {values.shape}.")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}.")
    values = np.nan_to_num(np.clip(values, 0.0, 1.0))
    index = (values * 255 + 0.5).astype(np.uint8)
    rgba = colormap_lut(colormap)[index]  # a fresh array (fancy indexing copies)
    alpha = values if fade else np.ones_like(values)
    rgba[..., 3] = (alpha * (255 * opacity) + 0.5).astype(np.uint8)
    return rgba


def normalise(values: np.ndarray, vmax: float | None = None, vmin: float = 0.0) -> np.ndarray:
    """Values to [0, 1] over [vmin, vmax] (vmax: the map's own maximum by default)."""
    values = np.asarray(values, dtype=np.float32)
    top = float(values.max()) if vmax is None else float(vmax)
    if not math.isfinite(top) or top <= vmin:
        return np.zeros_like(values)
    return np.clip((values - vmin) / (top - vmin), 0.0, 1.0)


def select_map(similarity_maps, concept: int, prototype: int | None = None) -> np.ndarray:
    """(K, M, h, w) S of one image -> (h, w): one prototype's map, or the concept's (max over M)."""
    maps = similarity_maps.detach().float().cpu() if isinstance(similarity_maps, torch.Tensor) else torch.as_tensor(similarity_maps)
    if maps.ndim != 4:
        raise ValueError(f"select_map takes (K, M, h, w) similarity maps of one image, got shape {tuple(maps.shape)}.")
    K, M = maps.shape[:2]
    if not 0 <= concept < K:
        raise ValueError(f"concept index {concept} out of range for K={K}.")
    if prototype is None:
        return maps[concept].amax(0).numpy()
    if not 0 <= prototype < M:
        raise ValueError(f"prototype index {prototype} out of range for M={M}.")
    return maps[concept, prototype].numpy()


def lattice(grid: FeatureGrid, size: tuple[int, int], max_side: int = MAX_LATTICE_SIDE) -> tuple[FeatureGrid, tuple[int, int]]:
    """The pixel lattice a heatmap is rendered on, and the grid that describes cells on it.

    Model inputs up to ``max_side`` are rendered at their own pixels (the grid as it is).
    Larger ones use every q-th pixel, q dividing both sides: a lattice pixel then spans q
    input pixels and has its centre at input coordinate q*i + (q-1)/2, so cell j (centred on
    input pixel offset + stride*j) sits on lattice coordinate (offset + stride*j - (q-1)/2)/q:
    the same grid with stride/q and that offset. The heatmap stays exactly aligned.
    """
    H, W = size
    q = 1
    if max(H, W) > max_side:
        for candidate in range(math.ceil(max(H, W) / max_side), max(H, W) + 1):
            if H % candidate == 0 and W % candidate == 0:
                q = candidate
                break
    if q == 1:
        return grid, (H, W)
    coarse = FeatureGrid(channels=grid.channels, stride=grid.stride / q, offset=(grid.offset - (q - 1) / 2) / q)
    return coarse, (H // q, W // q)


def upsample(cell_map: np.ndarray, grid: FeatureGrid, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """(h, w) cell values -> (H, W) pixel values through the grid: bilinear between cell
    centres (smooth) or each pixel taking its nearest cell (the cells as blocks).

    This is ``grid.upsample`` with the grid's interpolation matrices cached: the sizes
    repeat on every event of a session.
    """
    cell_map = np.asarray(cell_map, dtype=np.float32)
    rows, cols = _interpolation(grid, tuple(size), cell_map.shape[-2:], "bilinear" if smooth else "nearest")
    return rows @ cell_map @ cols


@functools.lru_cache(maxsize=32)
def _interpolation(grid: FeatureGrid, size: tuple[int, int], cells: tuple[int, int], mode: str) -> tuple[np.ndarray, np.ndarray]:
    rows = grid.interpolation_matrix(size[0], cells[0], mode).numpy()
    cols = grid.interpolation_matrix(size[1], cells[1], mode).numpy().T
    return rows, np.ascontiguousarray(cols)


def heatmap_rgba(
    cell_map: np.ndarray,
    grid: FeatureGrid,
    size: tuple[int, int],
    *,
    smooth: bool = True,
    colormap: str = DEFAULT_COLORMAP,
    vmax: float | None = None,
    opacity: float = 1.0,
    fade: bool = True,
) -> np.ndarray:
    """(h, w) similarity map -> (H, W, 4) RGBA uint8 on the pixel lattice of ``grid``.

    Values are clamped at 0 (the model scores max(S, 0)) and scaled by ``vmax`` so that
    maps before and after an interaction share one colour scale.
    """
    pixels = upsample(np.maximum(cell_map, 0.0), grid, size, smooth)
    return colorize(normalise(pixels, vmax), colormap, opacity, fade)


def composite(base: np.ndarray, overlay: np.ndarray, opacity: float = 1.0) -> np.ndarray:
    """Alpha-blend an RGBA overlay (same size) over an opaque RGBA base -> RGBA uint8."""
    if base.shape != overlay.shape:
        raise ValueError(f"composite needs equal shapes, got {base.shape} and {overlay.shape}.")
    alpha = overlay[..., 3:4].astype(np.float32) / 255.0 * opacity
    rgb = base[..., :3].astype(np.float32) * (1 - alpha) + overlay[..., :3].astype(np.float32) * alpha
    out = np.empty_like(base)
    out[..., :3] = (rgb + 0.5).astype(np.uint8)
    out[..., 3] = 255
    return out


def resize_rgba(rgba: np.ndarray, size: tuple[int, int], smooth: bool = True) -> np.ndarray:
    """Scale an RGBA image to (H, W) the way a browser canvas's drawImage does."""
    from PIL import Image

    if rgba.shape[:2] == tuple(size):
        return rgba
    resample = Image.BILINEAR if smooth else Image.NEAREST
    return np.asarray(Image.fromarray(rgba, "RGBA").resize((size[1], size[0]), resample))


def draw_marks(rgba: np.ndarray, marks, width: int = 2) -> np.ndarray:
    """Draw box marks (overlay.BoxMark: outline, label, cells) onto a copy of an RGBA image,
    as the explorer's canvas shows them, for static snapshots."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(rgba), "RGBA")
    shade = Image.new("RGBA", image.size, (0, 0, 0, 0))
    cells = ImageDraw.Draw(shade)
    for mark in marks:
        if mark.footprint is not None:
            rgb = POSITIVE_RGB if mark.positive else NEGATIVE_RGB
            x0, y0, x1, y1 = mark.footprint.rect
            cells.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(*rgb, round(255 * CELL_FILL_ALPHA)),
                            outline=(*rgb, round(255 * CELL_EDGE_ALPHA)))
    image = Image.alpha_composite(image, shade)
    draw = ImageDraw.Draw(image)
    for mark in marks:
        x0, y0, x1, y1 = mark.rect
        color = SELECTED_COLOR if mark.selected else (POSITIVE_COLOR if mark.positive else NEGATIVE_COLOR)
        if mark.positive:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=width)
        else:  # dashed, like on the canvas
            for a, b in _dashes(x0, x1 - 1):
                draw.line([(a, y0), (b, y0)], fill=color, width=width)
                draw.line([(a, y1 - 1), (b, y1 - 1)], fill=color, width=width)
            for a, b in _dashes(y0, y1 - 1):
                draw.line([(x0, a), (x0, b)], fill=color, width=width)
                draw.line([(x1 - 1, a), (x1 - 1, b)], fill=color, width=width)
        draw.text((x0 + 3, max(0, y0 - 12) if y0 >= 12 else y0 + 2), mark.label.replace("−", "-"), fill=color)
    return np.asarray(image)


def _dashes(start: float, end: float, dash: float = 6.0, gap: float = 4.0):
    position = start
    while position < end:
        yield position, min(position + dash, end)
        position += dash + gap


def caption(rgba: np.ndarray, lines: list[str], height: int = 16) -> np.ndarray:
    """Append a white band with text lines under an RGBA image (for static snapshots)."""
    from PIL import Image, ImageDraw

    band = Image.new("RGBA", (rgba.shape[1], height * len(lines) + 4), (255, 255, 255, 255))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * height), line, fill=(0, 0, 0, 255))
    return np.concatenate([rgba, np.asarray(band)], axis=0)


def encode_png(rgba: np.ndarray, compress_level: int = 6) -> bytes:
    """RGBA uint8 -> PNG bytes (lossless). Level 1 halves the encoding time of a heatmap
    against the default 6 for a few more kilobytes on a local socket."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba, dtype=np.uint8), "RGBA").save(buffer, "PNG", compress_level=compress_level)
    return buffer.getvalue()


def crop_rgba(crop: np.ndarray) -> np.ndarray:
    """An atlas crop (H, W), (H, W, 1|3|4) uint8 -> (H, W, 4) RGBA uint8."""
    crop = np.asarray(crop)
    if crop.dtype != np.uint8:
        if np.issubdtype(crop.dtype, np.floating) and crop.size and float(crop.max()) <= 1.0:
            crop = (np.clip(crop, 0, 1) * 255 + 0.5).astype(np.uint8)
        else:
            crop = np.clip(crop, 0, 255).astype(np.uint8)
    if crop.ndim == 3 and crop.shape[0] in (1, 3) and crop.shape[-1] not in (1, 3, 4):
        crop = np.moveaxis(crop, 0, -1)  # (C, H, W) -> (H, W, C)
    if crop.ndim == 3 and crop.shape[-1] == 1:
        crop = crop[..., 0]
    if crop.ndim == 2:
        crop = np.repeat(crop[..., None], 3, axis=-1)
    if crop.ndim != 3 or crop.shape[-1] not in (3, 4):
        raise ValueError(f"An atlas crop must be (H, W), (H, W, 3) or (H, W, 4), got shape {crop.shape}.")
    if crop.shape[-1] == 3:
        crop = np.concatenate([crop, np.full(crop.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return np.ascontiguousarray(crop)
