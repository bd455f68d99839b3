"""The chest phantom's scenes: every random choice about one SyntheticCXR image.

A *scene* is anatomy jitter, lesion placement, the shortcut and the noise grids, drawn
in a fixed order from one numpy Generator. Geometry lives in normalised coordinates
(u = column, v = row, both in [0, 1] across a square image), so one scene renders to the
same picture at any size (``film.rasterise``) and nothing drawn before the per-pixel noise
depends on the size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONCEPTS = ("nodule", "consolidation", "cavity", "effusion", "pneumothorax", "cardiomegaly")
SHORTCUTS = ("marker", "pacemaker")

# 3x5 glyphs of the letters a radiographer's lead marker carries; drawn as a corner text.
_GLYPHS = np.array(
    [
        ["#..", "#..", "#..", "#..", "###"],  # L
        ["##.", "#.#", "##.", "#.#", "#.#"],  # R
        [".#.", "#.#", "###", "#.#", "#.#"],  # A
        ["##.", "#.#", "##.", "#..", "#.."],  # P
        ["###", ".#.", ".#.", ".#.", ".#."],  # T
        ["#.#", "#.#", "###", "#.#", "#.#"],  # H
    ]
)
GLYPHS = np.array([[[c == "#" for c in row] for row in glyph] for glyph in _GLYPHS])  # (6, 5, 3)

# Heart width factor of a normal heart and of cardiomegaly, at difficulty 0 and 1: the gap
# between the two ranges is what makes the finding learnable, difficulty narrows it.
_NORMAL_HEART = (0.92, 1.06)
_ENLARGED_HEART = ((1.32, 1.50), (1.16, 1.28))


@dataclass(frozen=True)
class LesionSpec:
    """How one concept is drawn when present.

    prevalence: probability that the concept is present, among the images whose class
        allows it (see ``synthetic.label_of``); classes are sampled first.
    size, contrast: multipliers of the default radius and brightness change.
    count: inclusive range of instances per image when present (effusion: sides).
    """

    prevalence: float = 0.35
    size: float = 1.0
    contrast: float = 1.0
    count: tuple[int, int] = (1, 1)


DEFAULT_SPECS = {
    "nodule": LesionSpec(prevalence=0.4, count=(1, 2)),
    "consolidation": LesionSpec(prevalence=0.4),
    "cavity": LesionSpec(prevalence=0.45),
    "effusion": LesionSpec(prevalence=0.3),
    "pneumothorax": LesionSpec(prevalence=0.3),
    "cardiomegaly": LesionSpec(prevalence=0.3),
}


@dataclass(frozen=True)
class Lung:
    """One lung field. side: -1 for the image's left (patient's right), +1 for the right.

    Rows narrow towards the apex (square-root profile over the top 30 %), the lower edge is
    the diaphragm dome, lowest at the lateral costophrenic angle.
    """

    side: int
    cx: float
    half_width: float
    top: float
    base: float
    dome: float

    def width_at(self, v):
        t = (v - self.top) / (self.base - self.top)
        return self.half_width * np.sqrt(np.clip(t / 0.3, 0.0, 1.0))

    def lateral_fraction(self, u):
        """0 at the lateral edge, 1 at the medial edge (shape of ``u``)."""
        return np.clip((self.half_width - self.side * (u - self.cx)) / (2 * self.half_width), 0.0, 1.0)

    def dome_at(self, u):
        q = self.lateral_fraction(u)
        return self.base - self.dome * (1.0 - (1.0 - 1.4 * q) ** 2)

    def margins(self, u, v):
        """(lateral, overall) margins, > 0 inside; approximately a distance in image widths."""
        w = self.width_at(v)
        offset = self.side * (u - self.cx)
        lateral = w - offset
        overall = np.minimum(np.minimum(lateral, w + offset), self.dome_at(u) - v)
        return lateral, overall

    def point(self, t: float, q: float) -> tuple[float, float]:
        """The point at height fraction t (0 apex, 1 base) and lateral fraction q."""
        v = self.top + t * (self.base - self.top)
        return self.cx + self.side * float(self.width_at(v)) * (1.0 - 2.0 * q), v

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.cx - self.half_width, self.top, self.cx + self.half_width, self.base)


@dataclass(frozen=True)
class Heart:
    cx: float
    cy: float
    rx: float
    ry: float

    def margin(self, u, v):
        return 1.0 - ((u - self.cx) / self.rx) ** 2 - ((v - self.cy) / self.ry) ** 2

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.cx - self.rx, self.cy - self.ry, self.cx + self.rx, self.cy + self.ry)


@dataclass(frozen=True)
class Anatomy:
    lungs: tuple[Lung, Lung]
    heart: Heart
    body: tuple[float, float, float, float]  # centre u, centre v, radius u, radius v
    ribs: tuple[float, float, float]  # period, curvature, phase
    clavicle_v: float
    brightness: tuple[float, float]  # gain, offset of the exposure


@dataclass(frozen=True)
class Lesion:
    """One instance of a concept. ``shape`` holds kind-specific normalised geometry."""

    concept: str
    side: int
    contrast: float
    shape: dict


@dataclass
class Scene:
    anatomy: Anatomy
    lesions: list[Lesion]
    shortcut: dict | None
    smooth_noise: np.ndarray  # (6, 6) low-frequency exposure variation
    texture_noise: np.ndarray  # (24, 24) zero crossings become the vessel markings
    noise_sigma: float
    # magnification of the patient (anatomy, lesions, devices) about the image centre,
    # inside the same image: 0.85 draws everything at 85 % of its size. A corner marker
    # lies on the detector and keeps its size.
    zoom: float = 1.0


def sample_anatomy(rng: np.random.Generator, heart_factor: float) -> Anatomy:
    """Jitter every part of a standard PA chest; heart_factor scales the heart's width."""
    du, dv = rng.uniform(-0.025, 0.025, 2)
    scale = rng.uniform(0.95, 1.05)
    top, base = 0.5 + dv + (np.array([0.15, 0.75]) - 0.5) * scale + rng.uniform(-0.015, 0.015, 2)
    lungs = []
    for side in (-1, 1):
        medial = 0.5 + du + side * rng.uniform(0.045, 0.065) * scale
        lateral = 0.5 + du + side * rng.uniform(0.34, 0.38) * scale
        lungs.append(
            Lung(
                side=side,
                cx=float(medial + lateral) / 2,
                half_width=float(abs(lateral - medial)) / 2,
                top=float(top + rng.uniform(-0.01, 0.01)),
                base=float(base + rng.uniform(-0.015, 0.015) + (0.015 if side > 0 else 0.0)),
                dome=float(rng.uniform(0.06, 0.09) * scale),
            )
        )
    rx = rng.uniform(0.12, 0.135) * scale * heart_factor
    heart = Heart(
        # an enlarged heart grows mostly towards the patient's left (the image's right)
        cx=float(0.5 + du + rng.uniform(0.02, 0.04) + 0.4 * (heart_factor - 1.0) * rx),
        cy=float(base - rng.uniform(0.1, 0.12) * scale),
        rx=float(rx),
        ry=float(rng.uniform(0.1, 0.115) * scale * (1.0 + 0.35 * (heart_factor - 1.0))),
    )
    return Anatomy(
        lungs=tuple(lungs),
        heart=heart,
        body=(0.5 + du, 0.56 + dv, rng.uniform(0.41, 0.45) * scale, rng.uniform(0.5, 0.54)),
        ribs=(rng.uniform(0.07, 0.085) * scale, rng.uniform(0.9, 1.5), rng.uniform(0.0, 1.0)),
        clavicle_v=float(top - rng.uniform(0.0, 0.03)),
        brightness=(rng.uniform(0.9, 1.1), rng.uniform(-0.04, 0.04)),
    )


def heart_factor_for(rng: np.random.Generator, enlarged: bool, size: float, difficulty: float) -> float:
    if not enlarged:
        return float(rng.uniform(*_NORMAL_HEART))
    (easy_lo, easy_hi), (hard_lo, hard_hi) = _ENLARGED_HEART
    lo = easy_lo + difficulty * (hard_lo - easy_lo)
    hi = easy_hi + difficulty * (hard_hi - easy_hi)
    return 1.0 + (float(rng.uniform(lo, hi)) - 1.0) * size


class _Placer:
    """Rejection sampling of lesion centres: inside a lung, clear of the heart, of the
    lesions already placed, of effusion fluid and of a pneumothorax rim."""

    def __init__(self, anatomy: Anatomy):
        self.anatomy = anatomy
        self.boxes: list[tuple[float, float, float, float]] = []
        self.fluid_top = {-1: 2.0, 1: 2.0}
        self.rim = {-1: -1.0, 1: -1.0}

    def fits(self, lung: Lung, u: float, v: float, r: float, strict: bool) -> bool:
        probes_u = np.array([u, u - r, u + r, u, u])
        probes_v = np.array([v, v, v, v - r, v + r])
        lateral, overall = lung.margins(probes_u, probes_v)
        if overall.min() <= 0.2 * r:
            return False
        if not strict:
            return True
        if self.anatomy.heart.margin(probes_u, probes_v).max() > -0.1:
            return False
        if lateral.min() < self.rim[lung.side] + 0.01 or v + r > self.fluid_top[lung.side] - 0.015:
            return False
        pad = 0.01
        return all(
            u + r + pad <= b[0] or u - r - pad >= b[2] or v + r + pad <= b[1] or v - r - pad >= b[3]
            for b in self.boxes
        )

    def place(self, rng: np.random.Generator, r: float, t_range: tuple[float, float]) -> tuple[Lung, float, float]:
        # the last tries drop the clearance rules so that a present concept is always drawn
        for attempt in range(40):
            lung = self.anatomy.lungs[int(rng.integers(2))]
            u, v = lung.point(rng.uniform(*t_range), rng.uniform(0.1, 0.75))
            if self.fits(lung, u, v, r, strict=attempt < 30):
                self.boxes.append((u - r, v - r, u + r, v + r))
                return lung, u, v
        lung = self.anatomy.lungs[0]
        u, v = lung.point(0.55, 0.4)
        return lung, u, v


def sample_lesions(
    rng: np.random.Generator, anatomy: Anatomy, counts: dict[str, int], specs: dict[str, LesionSpec], difficulty: float
) -> list[Lesion]:
    """Place ``counts[concept]`` instances of each concept (cardiomegaly is the heart itself)."""
    ease = 1.0 - 0.55 * difficulty
    shrink = 1.0 - 0.3 * difficulty
    placer = _Placer(anatomy)
    lesions: list[Lesion] = []

    def contrast(concept: str) -> float:
        return specs[concept].contrast * ease * float(rng.uniform(0.85, 1.15))

    def scale(concept: str) -> float:
        return specs[concept].size * shrink

    if counts.get("cardiomegaly", 0):
        lesions.append(Lesion("cardiomegaly", 0, 0.0, {}))
    sides = [-1, 1] if counts.get("effusion", 0) >= 2 else [int(rng.choice([-1, 1]))]
    for side in sides[: counts.get("effusion", 0)]:
        lung = anatomy.lungs[(side + 1) // 2]
        height = rng.uniform(0.16, 0.28) * scale("effusion")
        level = lung.base - height * (lung.base - lung.top)
        placer.fluid_top[side] = level - 0.04
        shape = {"level": level, "meniscus": rng.uniform(0.03, 0.06)}
        lesions.append(Lesion("effusion", side, 0.34 * contrast("effusion"), shape))
    if counts.get("pneumothorax", 0):
        side = int(rng.choice([-1, 1]))
        depth = rng.uniform(0.03, 0.05) * scale("pneumothorax")
        placer.rim[side] = depth
        shape = {"depth": depth, "extent": rng.uniform(0.6, 0.75)}
        lesions.append(Lesion("pneumothorax", side, 0.16 * contrast("pneumothorax"), shape))
    for _ in range(counts.get("consolidation", 0)):
        radius = rng.uniform(0.075, 0.1) * scale("consolidation")
        lung, u, v = placer.place(rng, radius, (0.3, 0.8))
        blobs = [(u, v, radius * 0.75, radius * 0.7)]
        for _ in range(4):
            angle = rng.uniform(0, 2 * math.pi)
            dist = rng.uniform(0.25, 0.45) * radius
            radii = radius * rng.uniform(0.4, 0.6, 2)
            blobs.append((u + dist * math.cos(angle), v + dist * math.sin(angle), *radii.tolist()))
        lesions.append(Lesion("consolidation", lung.side, 0.24 * contrast("consolidation"), {"blobs": blobs}))
    for _ in range(counts.get("cavity", 0)):
        radius = rng.uniform(0.038, 0.05) * scale("cavity")
        lung, u, v = placer.place(rng, radius, (0.12, 0.5))
        shape = {"centre": (u, v), "radius": radius, "inner": rng.uniform(0.5, 0.62)}
        lesions.append(Lesion("cavity", lung.side, 0.34 * contrast("cavity"), shape))
    for _ in range(counts.get("nodule", 0)):
        radius = rng.uniform(0.024, 0.036) * scale("nodule")
        lung, u, v = placer.place(rng, radius, (0.15, 0.85))
        lesions.append(Lesion("nodule", lung.side, 0.3 * contrast("nodule"), {"centre": (u, v), "radius": radius}))
    return lesions


def sample_shortcut(rng: np.random.Generator, kind: str, anatomy: Anatomy) -> dict:
    if kind == "marker":
        letters = rng.integers(len(GLYPHS), size=int(rng.integers(1, 4)))
        cell = rng.uniform(0.009, 0.012)
        corner = int(rng.integers(2))  # top-left or top-right
        u = rng.uniform(0.025, 0.06)
        if corner == 1:
            u = 1.0 - u - 4 * cell * len(letters)
        return {"kind": kind, "letters": letters, "cell": cell, "u": u, "v": rng.uniform(0.02, 0.05)}
    heart = anatomy.heart
    return {
        "kind": kind,
        "box": (rng.uniform(0.7, 0.77), rng.uniform(0.17, 0.22), rng.uniform(0.042, 0.052), rng.uniform(0.03, 0.036)),
        "lead_end": (heart.cx + rng.uniform(0.2, 0.45) * heart.rx, heart.cy + rng.uniform(0.0, 0.4) * heart.ry),
        "bend": rng.uniform(-0.05, 0.02),
    }
