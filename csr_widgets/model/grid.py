"""FeatureGrid: the one place where feature cells and image pixels meet.

Convention: pixel i has its centre at coordinate i (integer indices, not i + 0.5), and
feature cell j is centred on the input pixel ``offset + stride * j``. A CNN with "same"
padding has offset 0 (a 3x3 stride-2 conv centres output j on input 2j); a patchify stem
or a ViT has offset (stride - 1) / 2. Bilinear upsampling with ``align_corners=False``
silently assumes the latter, which puts a resnet's maxima half a cell off: on small
lesions that alone costs several points of Pointing Game (docs/decisions.md#cell-centres).
Every heatmap the package draws or scores, every peak it marks or scores, and every box
mapped onto the grid, goes through this class.

Peaks are located below the cell size (``peaks``, ours): the maximum cell, refined along
each axis by the vertex of the parabola through it and its two neighbours. Upsampling
cannot do this: a bilinear map peaks exactly on a cell centre, so at stride 8 a ~1-cell
nodule was missed whenever its centre lay nearer a cell border (docs/decisions.md#sub-cell-peaks).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

import torch
from torch import nn

from .._inference import evaluating


@dataclass(frozen=True)
class FeatureGrid:
    channels: int  # C: channels of the feature map f
    stride: int  # input pixels per feature cell
    offset: float  # input pixel on which cell 0 is centred

    def centres(self, cells: int, device=None) -> torch.Tensor:
        """(cells,) pixel coordinates of the cell centres along one axis."""
        return self.offset + self.stride * torch.arange(cells, device=device, dtype=torch.float32)

    def peaks(self, maps: torch.Tensor) -> torch.Tensor:
        """(..., h, w) cell maps -> (..., 2) float (y, x) input-pixel coordinates of each peak.

        The cell of the maximum (ties: the first in row-major order, as ``torch.argmax``),
        then, along each axis on its own, the vertex of the parabola through that cell's
        value and its two neighbours' values: ``(left - right) / (2 (left - 2 centre +
        right))`` cells from the centre, within half a cell. A cell on the grid's edge, or a
        neighbourhood that does not curve down (a plateau), keeps the cell centre.
        """
        h, w = maps.shape[-2:]
        values = maps.reshape(-1, h, w)
        flat = values.flatten(1).argmax(dim=1)
        rows, cols = flat // w, flat % w
        index = torch.arange(len(values), device=maps.device)

        def vertex(before, centre, after, inside):
            curvature = before - 2 * centre + after
            shift = 0.5 * (before - after) / torch.where(curvature < 0, curvature, -torch.ones_like(curvature))
            return torch.where(inside & (curvature < 0), shift.clamp(-0.5, 0.5), torch.zeros_like(shift))

        centre = values[index, rows, cols]
        up, down = values[index, (rows - 1).clamp(min=0), cols], values[index, (rows + 1).clamp(max=h - 1), cols]
        left, right = values[index, rows, (cols - 1).clamp(min=0)], values[index, rows, (cols + 1).clamp(max=w - 1)]
        y = rows + vertex(up, centre, down, (rows > 0) & (rows < h - 1))
        x = cols + vertex(left, centre, right, (cols > 0) & (cols < w - 1))
        points = self.offset + self.stride * torch.stack([y, x], dim=-1).float()
        return points.reshape(*maps.shape[:-2], 2)

    def peak_pixels(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(..., h, w) cell maps -> (..., 2) float (y, x): the pixel of an image of ``size``
        (H, W) that holds each ``peaks`` point (the nearest pixel index, inside the image)."""
        limit = torch.tensor(size, device=maps.device, dtype=torch.float32) - 1
        return torch.minimum(torch.floor(self.peaks(maps) + 0.5).clamp(min=0), limit)

    def interpolation_matrix(self, pixels: int, cells: int, mode: str = "bilinear", device=None) -> torch.Tensor:
        """(pixels, cells) weights that carry a 1-D cell signal to pixels.

        "bilinear": linear between neighbouring cell centres, constant beyond the outer ones.
        "nearest": each pixel takes the cell whose centre is closest (the cells as blocks).
        """
        position = (torch.arange(pixels, device=device, dtype=torch.float32) - self.offset) / self.stride
        position = position.clamp(0, cells - 1)
        if mode == "nearest":
            nearest = torch.floor(position + 0.5).long().clamp(max=cells - 1)
            return torch.nn.functional.one_hot(nearest, cells).float()
        if mode != "bilinear":
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
        low = position.floor().long().clamp(max=max(cells - 2, 0))
        frac = (position - low).clamp(0, 1) if cells > 1 else torch.zeros_like(position)
        weights = torch.zeros(pixels, cells, device=device)
        rows = torch.arange(pixels, device=device)
        weights[rows, low] = 1 - frac
        if cells > 1:
            weights[rows, low + 1] += frac
        return weights

    def upsample(self, maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
        """(..., h, w) cell maps -> (..., H, W) pixel maps, cell centres honoured."""
        h, w = maps.shape[-2:]
        rows = self.interpolation_matrix(size[0], h, mode, maps.device).to(maps.dtype)
        cols = self.interpolation_matrix(size[1], w, mode, maps.device).to(maps.dtype)
        return torch.einsum("Hh,...hw,Ww->...HW", rows, maps, cols)

    @functools.lru_cache(maxsize=64)
    def owners(self, pixels: int, cells: int) -> np.ndarray:
        """(pixels,) index of the cell that owns each pixel: the one whose centre is nearest
        (a pixel exactly halfway goes to the later cell). Cached: sizes repeat every event."""
        position = (np.arange(pixels, dtype=np.float64) - self.offset) / self.stride
        owner = np.clip(np.floor(position + 0.5), 0, cells - 1).astype(np.int64)
        owner.flags.writeable = False
        return owner

    def area_average(self, pixel_maps, cells: tuple[int, int]):
        """(..., H, W) pixel maps -> (..., h, w): each cell averages the pixels it owns.

        Takes and returns a torch tensor or a numpy array.
        """
        H, W = pixel_maps.shape[-2:]
        rows = self.averaging_matrix(np.arange(H), np.ones(H), H, cells[0])
        cols = self.averaging_matrix(np.arange(W), np.ones(W), W, cells[1]).T
        if isinstance(pixel_maps, np.ndarray):
            return rows @ pixel_maps.astype(np.float32) @ cols
        rows, cols = (torch.from_numpy(m).to(pixel_maps.device) for m in (rows, cols))
        return rows @ pixel_maps.to(rows.dtype) @ cols

    def averaging_matrix(self, starts: np.ndarray, lengths: np.ndarray, pixels: int, cells: int) -> np.ndarray:
        """(cells, runs) weights averaging runs of pixels (each run: its first pixel and its
        length, all its pixels owned by one cell) into the cells that own them."""
        owner = self.owners(pixels, cells)
        counts = self._counts(pixels, cells)
        weights = np.zeros((cells, len(starts)), np.float32)
        run_owner = owner[starts]
        weights[run_owner, np.arange(len(starts))] = lengths / counts[run_owner]
        return weights

    @functools.lru_cache(maxsize=64)
    def borders(self, pixels: int, cells: int) -> tuple[int, ...]:
        """Pixel indices where ownership passes from one cell to the next."""
        return tuple(int(i) + 1 for i in np.flatnonzero(np.diff(self.owners(pixels, cells))))

    @functools.lru_cache(maxsize=64)
    def _counts(self, pixels: int, cells: int) -> np.ndarray:
        return np.bincount(self.owners(pixels, cells), minlength=cells).clip(min=1)

    def touched(self, lo: float, hi: float, pixels: int, cells: int) -> slice:
        """Cells along one axis that own a pixel the interval [lo, hi) overlaps.

        Pixel i is the unit interval [i, i + 1); an interval overlapping any part of a
        pixel touches that pixel's owner. Owners increase with the pixel index, so the
        touched cells are one contiguous run (empty when [lo, hi) misses the image).
        """
        first, last = max(math.floor(lo), 0), min(math.ceil(hi) - 1, pixels - 1)
        if last < first:
            return slice(0, 0)
        owner = self.owners(pixels, cells)
        return slice(int(owner[first]), int(owner[last]) + 1)

    def centred_in(self, lo: int, hi: int, cells: int) -> np.ndarray:
        """Cells along one axis whose centre's pixel (the nearest, as ``peak_pixels``) lies in
        the inclusive pixel range [lo, hi]; when none does (a range narrower than a cell),
        the cell nearest its middle. The Pointing Game's hit rule applied to cell centres."""
        centre_pixels = np.floor(self.centres(cells).numpy() + 0.5)
        inside = np.flatnonzero((centre_pixels >= lo) & (centre_pixels <= hi))
        return inside if len(inside) else np.array([self.cell_of((lo + hi) / 2, cells)])

    def span(self, cell: int, pixels: int, cells: int) -> tuple[int, int]:
        """[first, last + 1) of the pixels a cell owns along one axis (the inverse of
        ``touched``: a box over exactly this span touches this cell only)."""
        owned = np.flatnonzero(self.owners(pixels, cells) == cell)
        if len(owned) == 0:
            raise ValueError(f"Cell {cell} owns no pixel of a {pixels}-pixel axis with {cells} cells.")
        return int(owned[0]), int(owned[-1]) + 1

    def cell_of(self, pixel: float, cells: int) -> int:
        """Index of the cell whose centre is nearest to a pixel coordinate."""
        return int(min(max(round((pixel - self.offset) / self.stride), 0), cells - 1))

    @classmethod
    def probe(cls, backbone: nn.Module, in_channels: int, image_size: int, offset: float | None) -> "FeatureGrid":
        """Measure C, the stride and (unless given) the offset of a backbone.

        The offset comes from the receptive fields of the first and the last cell: with
        symmetric receptive fields, the right edge of cell 0's support and the left edge of
        cell (w-1)'s support add up to 2 * offset + stride * (w - 1). Gradients give the
        supports; a relative threshold ignores the faint global paths of squeeze-excitation
        blocks, and shrinks both supports alike, which cancels out. When a cell sees the whole image (ViTs, deep CNNs on a small
        input) the probe retries on a larger input, then falls back to (stride - 1) / 2.
        """
        with evaluating(backbone, autograd=None):  # the grad mode stays the caller's (see below)
            with torch.no_grad():
                features = backbone(torch.zeros(1, in_channels, image_size, image_size))
            channels, cells = features.shape[1], features.shape[-1]
            stride = max(1, round(image_size / cells))
            if offset is None:
                # The probe needs gradients even when the model is built inside
                # torch.inference_mode() or no_grad() (e.g. in a notebook cell that uses them).
                with torch.inference_mode(False), torch.enable_grad():
                    offset = cls._measure_offset(backbone, in_channels, image_size, stride)
        return cls(channels=channels, stride=stride, offset=float(offset))

    @staticmethod
    def _measure_offset(backbone: nn.Module, in_channels: int, image_size: int, stride: int) -> float:
        generator = torch.Generator().manual_seed(0)
        sizes = [image_size] if getattr(backbone, "fixed_input_size", False) else [image_size * k for k in (1, 2, 4)]
        for size in sizes:
            images = torch.randn(1, in_channels, size, size, generator=generator, requires_grad=True)
            features = backbone(images)
            cells = features.shape[-1]
            if cells < 2:
                continue
            (first,) = torch.autograd.grad(features[0, :, 0, 0].sum(), images, retain_graph=True)
            (last,) = torch.autograd.grad(features[0, :, -1, -1].sum(), images)
            first_support = _support(first.abs().sum(dim=(0, 1, 2)))
            last_support = _support(last.abs().sum(dim=(0, 1, 2)))
            if len(first_support) == 0 or len(last_support) == 0:
                continue
            right_of_first, left_of_last = int(first_support.max()), int(last_support.min())
            if right_of_first < size - 1 and left_of_last > 0:
                offset = (right_of_first + left_of_last - stride * (cells - 1)) / 2
                return round(2 * offset) / 2  # ReLU/max-pool zeros can nibble a pixel
        return (stride - 1) / 2


def _support(profile: torch.Tensor) -> torch.Tensor:
    """Indices where a 1-D gradient profile is more than a thousandth of its peak."""
    return (profile > 1e-3 * profile.max()).nonzero().flatten()
