"""SyntheticCXR: chest-X-ray-like images with exact concept boxes, made on the fly (ours:
docs/decisions.md#synthetic-cxr).

The label rule (mirrors TBX11K's healthy / sick-but-not-TB / TB):

    tb       if a cavity is present, or a nodule together with a consolidation;
    sick     otherwise, if any finding is present;
    healthy  if no finding is present.

Sampling order for image ``i`` (all from ``numpy.random.default_rng([seed, split, i, 0])``,
never the global RNG, so an item depends on nothing but those three numbers):
class (``class_weights``) -> concepts given the class (independent Bernoulli draws with
each concept's prevalence, redrawn until the rule gives that class) -> label noise ->
shortcut presence given the noisy label -> anatomy and lesions -> noise. The image size
is used only by the last draw (per-pixel noise), so one index renders the same scene at
every size (which is how the exporters write 512-px files of a 224-px dataset).
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import exporters
from .film import rasterise
from .scene import (
    CONCEPTS,
    DEFAULT_SPECS,
    SHORTCUTS,
    LesionSpec,
    Scene,
    heart_factor_for,
    sample_anatomy,
    sample_lesions,
    sample_shortcut,
)

CLASSES = ("healthy", "sick", "tb")
SPLITS = {"train": 0, "val": 1, "test": 2}
_NODULE, _CONSOLIDATION, _CAVITY = (CONCEPTS.index(c) for c in ("nodule", "consolidation", "cavity"))


def label_of(concepts) -> np.ndarray | int:
    """The label rule over concept presence: (..., K) 0/1 in ``CONCEPTS`` order -> (...) class index."""
    present = np.asarray(concepts) > 0
    tb = present[..., _CAVITY] | (present[..., _NODULE] & present[..., _CONSOLIDATION])
    label = np.where(tb, 2, np.where(present.any(axis=-1), 1, 0))
    return int(label) if label.ndim == 0 else label


def shortcut_rates(correlation: float, base_rate: float) -> tuple[float, float]:
    """P(shortcut | label == shortcut_class), P(shortcut | label != shortcut_class).

    The shortcut is made as frequent as the class itself (base_rate), so that the phi
    coefficient between the two indicators equals ``correlation`` exactly in expectation
    (phi = a - b when both marginals are equal). Negative values anti-correlate.
    """
    a = base_rate + correlation * (1.0 - base_rate)
    b = base_rate * (1.0 - correlation)
    if not (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0):
        lowest = -min(base_rate / (1 - base_rate), (1 - base_rate) / base_rate)
        raise ValueError(
            f"shortcut_correlation={correlation} is not reachable for a class of frequency "
            f"{base_rate:.3f}; use a value in [{lowest:.3f}, 1]"
        )
    return a, b


class SyntheticCXR(Dataset):
    """A torch Dataset of synthetic chest radiographs, deterministic per (seed, split, index).

    Args:
        n: number of images (indices 0..n-1).
        seed: the dataset seed.
        image_size: side of the square images in pixels (>= 32).
        shortcut: None, "marker" (a corner lead-letter marker) or "pacemaker" (a device
            in the upper left chest with its lead), present with a probability tied to
            the label (see ``shortcut_correlation``).
        shortcut_correlation: phi coefficient between "shortcut present" and
            "label == shortcut_class", exact in expectation (1: perfect shortcut, 0:
            independent, negative: anti-correlated).
        shortcut_class: the class the shortcut correlates with.
        split: "train", "val" or "test": disjoint random streams, so splits with the same
            seed never share an image. ``decorrelate()`` gives the shortcut-free test split.
        difficulty: 0 (clear lesions) to 1 (faint, smaller lesions, more noise).
        lesions: per-concept overrides, ``{"nodule": {"size": 0.8, "count": (1, 3)}}``
            or LesionSpec values (fields: prevalence, size, contrast, count).
        class_weights: class frequencies before label noise (default uniform).
        label_noise: probability that an item's label is replaced by another class,
            uniformly; boxes and concepts stay the truth.
        channels: 1 or 3 (the grey image repeated).
        masks: also return "masks", a (K, H, W) bool tensor of the concept masks.
        anatomy_scale: magnification of the patient inside the same image (anatomy,
            lesions and devices about the image centre; a corner marker keeps its size):
            a number, or a range ``(low, high)`` drawn per item (training augmentation).
        gamma: exposure curve, ``pixels ** gamma`` (a number or a range per item).
        contrast: window width, ``mean + contrast * (pixels - mean)`` about the image's
            mean, after ``gamma``, clipped to [0, 1] (a number or a range per item).

    The three film settings (ours) vary what differs between real films; a range is drawn
    log-uniformly from its own random stream, so an item is still a function of (seed,
    split, index) and the defaults (1.0) leave every image exactly as before.

    Item: ``{"image": (C, H, W) float32 in [0, 1], "concepts": (K,) float32 0/1,
    "label": int, "boxes": [(concept, x0, y0, x1, y1)], "shortcut_box": None or
    (x0, y0, x1, y1), "id": str}``, plus "masks" on request. Boxes are floats holding
    whole pixel numbers, x1/y1 exclusive: the tight box of the instance's mask. Every
    instance has its own box (a concept may appear more than once).
    """

    concepts = list(CONCEPTS)
    classes = list(CLASSES)

    def __init__(
        self,
        n: int = 1000,
        seed: int = 0,
        image_size: int = 224,
        shortcut: str | None = None,
        *,
        shortcut_correlation: float = 0.9,
        shortcut_class: str = "tb",
        split: str = "train",
        difficulty: float = 0.0,
        lesions: Mapping[str, LesionSpec | Mapping] | None = None,
        class_weights=None,
        label_noise: float = 0.0,
        channels: int = 1,
        masks: bool = False,
        anatomy_scale: float | tuple[float, float] = 1.0,
        gamma: float | tuple[float, float] = 1.0,
        contrast: float | tuple[float, float] = 1.0,
    ):
        self.settings = dict(
            n=n, seed=seed, image_size=image_size, shortcut=shortcut, shortcut_correlation=shortcut_correlation,
            shortcut_class=shortcut_class, split=split, difficulty=difficulty, lesions=lesions,
            class_weights=class_weights, label_noise=label_noise, channels=channels, masks=masks,
            anatomy_scale=anatomy_scale, gamma=gamma, contrast=contrast,
        )
        self.film = {name: _film_range(name, value) for name, value in
                     (("anatomy_scale", anatomy_scale), ("gamma", gamma), ("contrast", contrast))}
        if n < 0 or int(n) != n:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if int(image_size) != image_size or image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
        if shortcut is not None and shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be None or one of {SHORTCUTS}, got {shortcut!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if shortcut_class not in CLASSES:
            raise ValueError(f"shortcut_class must be one of {CLASSES}, got {shortcut_class!r}")
        if not 0.0 <= difficulty <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {label_noise!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        self.concepts, self.classes = list(CONCEPTS), list(CLASSES)
        self.n, self.seed, self.image_size = int(n), int(seed), int(image_size)
        self.shortcut, self.split, self.difficulty = shortcut, split, float(difficulty)
        self.label_noise, self.channels, self.masks = float(label_noise), channels, bool(masks)
        self.specs = _merge_specs(lesions)
        weights = np.full(len(CLASSES), 1.0) if class_weights is None else np.asarray(class_weights, float)
        if weights.shape != (len(CLASSES),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"class_weights must be {len(CLASSES)} non-negative numbers, got {class_weights!r}")
        self.class_weights = weights / weights.sum()
        _check_classes_reachable(self.specs, self.class_weights)
        self.shortcut_class, self._shortcut_label = shortcut_class, CLASSES.index(shortcut_class)
        self.shortcut_correlation = float(shortcut_correlation)
        # the shortcut follows the *noisy* label, the one a model is trained on
        pi = self.class_weights[self._shortcut_label]
        noisy_pi = pi * (1 - self.label_noise) + (1 - pi) * self.label_noise / (len(CLASSES) - 1)
        self.shortcut_rates = shortcut_rates(self.shortcut_correlation, noisy_pi)
        self._prevalence = np.array([self.specs[c].prevalence for c in CONCEPTS])
        self._class_cdf = np.cumsum(self.class_weights)

    def __len__(self) -> int:
        return self.n

    def replace(self, **changes) -> "SyntheticCXR":
        """A copy with some settings changed (same keywords as the constructor)."""
        return SyntheticCXR(**{**self.settings, **changes})

    def decorrelate(self, n: int | None = None, split: str = "test") -> "SyntheticCXR":
        """The decorrelated test split: fresh images (another random stream) on which the
        shortcut, when one is set, appears independently of the label (correlation 0)."""
        return self.replace(n=self.n if n is None else n, split=split, shortcut_correlation=0.0)

    def random_stream(self, index: int, stream: int = 0) -> np.random.Generator:
        """The generator of image ``index``: stream 0 draws the image, 1 the shortcut's
        geometry, 2 the simulated readers of the VinDr exporter, 3 the film settings."""
        return np.random.default_rng([self.seed, SPLITS[self.split], index, stream])

    def _index(self, index) -> int:
        index = operator.index(index)
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for SyntheticCXR of length {self.n}")
        return index

    def annotate(self, index: int) -> dict:
        """The item's annotation without drawing it (microseconds, for statistics):
        {"concepts": (K,) int 0/1, "counts": (K,) instances, "label", "clean_label", "shortcut": bool}."""
        return self._sample_header(self.random_stream(self._index(index)))

    def _sample_header(self, rng: np.random.Generator) -> dict:
        clean = min(int(np.searchsorted(self._class_cdf, rng.random(), side="right")), len(CLASSES) - 1)
        present = self._sample_concepts(rng, clean)
        counts = np.zeros(len(CONCEPTS), int)
        for k in np.flatnonzero(present):
            lo, hi = self.specs[CONCEPTS[k]].count
            counts[k] = rng.integers(lo, hi + 1)
        label = clean
        if rng.random() < self.label_noise:
            label = (clean + 1 + int(rng.integers(len(CLASSES) - 1))) % len(CLASSES)
        rate = self.shortcut_rates[0] if label == self._shortcut_label else self.shortcut_rates[1]
        has_shortcut = bool(rng.random() < rate) and self.shortcut is not None
        return {"concepts": present, "counts": counts, "label": label, "clean_label": clean, "shortcut": has_shortcut}

    def _sample_concepts(self, rng: np.random.Generator, label: int) -> np.ndarray:
        if label == 0:
            rng.random((32, len(CONCEPTS)))  # same number of draws for every class
            return np.zeros(len(CONCEPTS), int)
        # rejection sampling, one block of candidate rows at a time
        draws = (rng.random((32, len(CONCEPTS))) < self._prevalence).astype(int)
        matching = np.flatnonzero(label_of(draws) == label)
        if len(matching):
            return draws[matching[0]]
        # a rare miss: the most prevalent concept that yields the class on its own
        fallback = np.zeros(len(CONCEPTS), int)
        allowed = [k for k in range(len(CONCEPTS)) if (k == _CAVITY) == (label == 2)]
        fallback[max(allowed, key=lambda k: self._prevalence[k])] = 1
        return fallback

    def _sample_scene(self, index: int, rng: np.random.Generator, header: dict) -> Scene:
        specs, difficulty = self.specs, self.difficulty
        counts = dict(zip(CONCEPTS, header["counts"].tolist()))
        factor = heart_factor_for(rng, counts["cardiomegaly"] > 0, specs["cardiomegaly"].size, difficulty)
        anatomy = sample_anatomy(rng, factor)
        lesions = sample_lesions(rng, anatomy, counts, specs, difficulty)
        smooth = rng.standard_normal((6, 6))
        texture = rng.standard_normal((24, 24))
        # the shortcut's geometry has its own stream: adding or removing a shortcut
        # leaves every other pixel of the image unchanged
        shortcut = sample_shortcut(self.random_stream(index, 1), self.shortcut, anatomy) if header["shortcut"] else None
        return Scene(anatomy, lesions, shortcut, smooth, texture, noise_sigma=0.015 * (1.0 + difficulty))

    def film_settings(self, index: int) -> dict[str, float]:
        """The item's anatomy_scale, gamma and contrast (a range's draw, or the number)."""
        rng = self.random_stream(self._index(index), 3)
        return {name: float(np.exp(rng.uniform(*np.log(bounds)))) for name, bounds in self.film.items()}

    def __getitem__(self, index) -> dict:
        index = self._index(index)
        rng = self.random_stream(index)
        header = self._sample_header(rng)
        scene = self._sample_scene(index, rng, header)
        film = self.film_settings(index)
        scene.zoom = film["anatomy_scale"]
        pixels, instances, shortcut_box = rasterise(scene, self.image_size, rng)
        pixels = expose(pixels, film["gamma"], film["contrast"])
        image = torch.from_numpy(pixels)[None]
        item = {
            "image": image.expand(3, -1, -1) if self.channels == 3 else image,
            "concepts": torch.from_numpy(header["concepts"].astype(np.float32)),
            "label": header["label"],
            "boxes": [(i.concept, *map(float, i.box)) for i in instances],
            "shortcut_box": None if shortcut_box is None else tuple(map(float, shortcut_box)),
            "id": f"synthetic-{self.split}-{self.seed}-{index}",
        }
        if self.masks:
            masks = np.zeros((len(CONCEPTS), self.image_size, self.image_size), bool)
            for i in instances:
                x0, y0, x1, y1 = i.box
                masks[CONCEPTS.index(i.concept), y0:y1, x0:x1] |= i.mask
            item["masks"] = torch.from_numpy(masks)
        return item

    # -- writing the dataset out in the real datasets' formats ---------------------------

    def export_tbx11k(self, root, split: str = "train", image_size: int = 512) -> Path:
        """Write TBX11K's layout (imgs/<health|sick|tb>/*.png, annotations/json/TBX11K_<split>.json,
        lists/TBX11K_<split>.txt); returns the JSON path. See ``exporters.write_tbx11k``."""
        return exporters.write_tbx11k(self, root, split=split, image_size=image_size)

    def export_vindr(self, root, split: str = "train", format: str = "dicom", readers: int = 3, **options) -> Path:
        """Write VinDr-CXR's layout with simulated readers; returns the CSV path.
        See ``exporters.write_vindr`` for the options (layout, miss_rate, jitter, ...)."""
        return exporters.write_vindr(self, root, split=split, format=format, readers=readers, **options)

    def export_isic(self, root, split: str = "train", image_size: int = 256) -> Path:
        """Write ISIC 2018 Task 2's layout (the first five concepts as the five attribute
        masks, a format test only); returns the labels CSV path."""
        return exporters.write_isic(self, root, split=split, image_size=image_size)

    def export_csv(self, root, image_size: int | None = None) -> Path:
        """Write the ConceptCSV layout (images/, labels.csv, boxes.csv); returns labels.csv."""
        return exporters.write_concept_csv(self, root, image_size=image_size)


def expose(pixels: np.ndarray, gamma: float, contrast: float) -> np.ndarray:
    """(H, W) image in [0, 1] -> the same film at another exposure: ``pixels ** gamma``,
    then ``mean + contrast * (pixels - mean)`` about its mean, clipped to [0, 1]."""
    if gamma != 1.0:
        pixels = pixels ** np.float32(gamma)
    if contrast != 1.0:
        mean = pixels.mean(dtype=np.float64)
        pixels = np.clip(mean + np.float32(contrast) * (pixels - mean), 0.0, 1.0).astype(np.float32)
    return pixels


def _film_range(name: str, value) -> tuple[float, float]:
    """A film setting as a (low, high) range; a number is the range of one value."""
    low, high = (value, value) if np.ndim(value) == 0 else tuple(value)
    if not 0 < low <= high:
        raise ValueError(f"{name} must be a positive number or a range (low, high) with 0 < low <= high, got {value!r}")
    return float(low), float(high)


def _merge_specs(overrides) -> dict[str, LesionSpec]:
    specs = dict(DEFAULT_SPECS)
    for name, value in (overrides or {}).items():
        if name not in specs:
            raise ValueError(f"lesions: unknown concept {name!r}; concepts are {CONCEPTS}")
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(LesionSpec)}
            if unknown:
                raise ValueError(f"lesions[{name!r}]: unknown fields {sorted(unknown)}")
            value = dataclasses.replace(specs[name], **value)
        if not isinstance(value, LesionSpec):
            raise ValueError(f"lesions[{name!r}] must be a LesionSpec or a dict, got {value!r}")
        lo, hi = value.count
        if not (0 <= value.prevalence <= 1 and value.size > 0 and value.contrast > 0 and 1 <= lo <= hi):
            raise ValueError(f"lesions[{name!r}] is out of range: {value}")
        if name in ("cardiomegaly", "pneumothorax") and hi > 1 or name == "effusion" and hi > 2:
            raise ValueError(f"lesions[{name!r}].count={value.count}: at most {2 if name == 'effusion' else 1}")
        specs[name] = dataclasses.replace(value, count=(int(lo), int(hi)))
    return specs


def _check_classes_reachable(specs: dict[str, LesionSpec], weights: np.ndarray) -> None:
    p = {name: spec.prevalence for name, spec in specs.items()}
    can_tb = p["cavity"] > 0 or (p["nodule"] > 0 and p["consolidation"] > 0)
    can_sick = any(p[c] > 0 for c in CONCEPTS if c != "cavity")
    for cls, possible in (("tb", can_tb), ("sick", can_sick)):
        if weights[CLASSES.index(cls)] > 0 and not possible:
            raise ValueError(f"class {cls!r} has weight > 0 but the lesion prevalences make it impossible")
