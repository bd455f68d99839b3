"""The chest phantom behind SyntheticCXR: scene geometry and its rasterisation.

A *scene* is every random choice about one image (anatomy jitter, lesion placement,
shortcut, noise grids), drawn in a fixed order from one numpy Generator. Geometry lives
in normalised coordinates (u = column, v = row, both in [0, 1] across a square image), so
one scene renders to the same picture at any size and nothing drawn before the per-pixel
noise depends on the size. Rasterising works on 1-D pixel-centre vectors and
broadcasting, and each part (lung, heart, lesion, device) is drawn inside its own
window: that is what keeps a 224-px image at a few milliseconds.

Brightness is attenuation: air is dark, soft tissue grey, bone and metal bright.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

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
# How much the lungs' air darkens the soft tissue, how much of it the heart hides, and
# the widths of their soft edges (image widths; heart: in its normalised radius).
_AIR, _HEART_HIDES_AIR = 0.3, 0.9
_LUNG_EDGE, _HEART_EDGE = 0.012, 0.15


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


# ---------------------------------------------------------------------------------------
# sampling


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


# ---------------------------------------------------------------------------------------
# rasterisation


@lru_cache(maxsize=32)
def _interpolation(grid: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation from ``grid`` cells to ``size`` pixels: lower index, weight."""
    pos = np.clip((np.arange(size) + 0.5) / size * grid - 0.5, 0, grid - 1)
    lo = np.minimum(np.floor(pos).astype(np.intp), grid - 2)
    return lo, (pos - lo).astype(np.float32)


@lru_cache(maxsize=32)
def _centres(size: int, zoom: float = 1.0) -> np.ndarray:
    return (0.5 + ((np.arange(size) + 0.5) / size - 0.5) / zoom).astype(np.float32)


class Canvas:
    """A square float32 attenuation image and the pixel-window helpers to draw into it.

    Scene coordinates (u, v) are normalised to the image at zoom 1; at another ``zoom`` the
    scene is magnified about the image centre (pixel centres sit at 0.5 + (i + 0.5 - s/2) /
    (s * zoom)).
    """

    def __init__(self, size: int, zoom: float = 1.0):
        self.size = size
        self.pixels = np.zeros((size, size), np.float32)
        self.texture = None  # the markings' smooth noise, (size, size), once drawn
        self.heart = None  # (rows, cols, soft mask) of the heart's window, once drawn
        self.set_zoom(zoom)

    def set_zoom(self, zoom: float) -> None:
        self.zoom = float(zoom)
        self.centres = _centres(self.size, self.zoom)
        # one pixel in scene units: the smallest lesion still covers a pixel centre
        self.pixel = 1.0 / (self.size * self.zoom)

    def window(self, u0: float, v0: float, u1: float, v1: float):
        """Pixel slices covering the normalised box, and its centre vectors u (1,w), v (h,1)."""
        s, z = self.size, self.zoom
        u0, u1, v0, v1 = (0.5 + (t - 0.5) * z for t in (u0, u1, v0, v1))  # image fractions
        c0, c1 = max(int(math.floor(u0 * s)), 0), min(int(math.ceil(u1 * s)) + 1, s)
        r0, r1 = max(int(math.floor(v0 * s)), 0), min(int(math.ceil(v1 * s)) + 1, s)
        rows, cols = slice(r0, max(r1, r0)), slice(c0, max(c1, c0))
        return rows, cols, self.centres[cols][None, :], self.centres[rows][:, None]

    def smooth(self, grid_noise: np.ndarray) -> np.ndarray:
        """(g, g) -> (size, size) bilinear. Gathers, not a matrix product: BLAS threads
        are slower than this for such thin products, and fight the DataLoader workers."""
        lo, w = _interpolation(grid_noise.shape[0], self.size)
        grid = grid_noise.astype(np.float32)
        rows = grid[lo] * (1 - w)[:, None] + grid[lo + 1] * w[:, None]  # (size, g)
        return rows[:, lo] * (1 - w) + rows[:, lo + 1] * w


@dataclass
class Instance:
    """A drawn concept instance: its exact pixel box (x0, y0, x1, y1; x1, y1 exclusive)
    and its mask inside that box."""

    concept: str
    box: tuple[int, int, int, int]
    mask: np.ndarray  # (y1 - y0, x1 - x0) bool


def _instance(concept: str, rows: slice, cols: slice, mask: np.ndarray) -> Instance | None:
    ys, xs = np.any(mask, axis=1), np.any(mask, axis=0)
    if not ys.any():
        return None
    y0, y1 = np.argmax(ys), len(ys) - np.argmax(ys[::-1])
    x0, x1 = np.argmax(xs), len(xs) - np.argmax(xs[::-1])
    box = (cols.start + int(x0), rows.start + int(y0), cols.start + int(x1), rows.start + int(y1))
    return Instance(concept, box, mask[y0:y1, x0:x1])


def _soft(margin: np.ndarray, width: float) -> np.ndarray:
    """A ramp from 0 (margin <= 0) to 1 (margin >= width): anti-aliased, soft edges."""
    out = margin * (1.0 / width)
    np.maximum(out, 0.0, out=out)  # ufuncs in place: np.clip's wrapper costs more than
    return np.minimum(out, 1.0, out=out)  # the arithmetic on these small windows


def render(scene: Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Instance], tuple | None]:
    """Rasterise a scene.

    Returns the image (size, size) float32 in [0, 1], the drawn concept instances with
    exact boxes and masks, and the shortcut's pixel box (or None). ``rng`` is only used for
    the per-pixel noise, the last draw of an image.
    """
    canvas = Canvas(size, scene.zoom)
    anatomy = scene.anatomy
    lung_masks = _draw_anatomy(canvas, anatomy)
    markings = _markings(canvas, scene, lung_masks)
    instances: list[Instance] = []
    for lesion in scene.lesions:
        instance = _DRAW[lesion.concept](canvas, anatomy, lesion, markings, scene)
        if instance is not None:
            instances.append(instance)
    canvas.pixels += markings
    shortcut_box = _draw_shortcut(canvas, scene.shortcut) if scene.shortcut else None
    gain, offset = anatomy.brightness
    image = canvas.pixels
    image *= gain
    image += offset + 0.03 * canvas.smooth(scene.smooth_noise)
    image += rng.standard_normal((size, size), dtype=np.float32) * np.float32(scene.noise_sigma)
    np.clip(image, 0.0, 1.0, out=image)
    return image, instances, shortcut_box


def _draw_anatomy(canvas: Canvas, anatomy: Anatomy) -> dict[int, tuple]:
    """Body, lungs, heart, ribs, spine, trachea and clavicles; returns each lung's window
    (rows, cols, inside mask, lateral margin) for the parts drawn inside the lungs."""
    px, c, size = canvas.pixels, canvas.centres, canvas.size
    bu, bv, ru, rv = anatomy.body
    body = 1.0 - (((c[None, :] - bu) / ru) ** 4 + ((c[:, None] - bv) / rv) ** 4)
    np.clip(body * (1.0 / 0.08), 0.0, 1.0, out=body)
    air = np.zeros((size, size), np.float32)
    lung_masks = {}
    for lung in anatomy.lungs:
        rows, cols, u, v = canvas.window(*lung.bounds)
        lateral, overall = lung.margins(u, v)
        air[rows, cols] += _soft(overall, _LUNG_EDGE)
        lung_masks[lung.side] = (rows, cols, overall > 0, lateral)
    # the heart is soft tissue in front of the lungs: it hides the air and adds nothing
    # where it overlaps the mediastinum, so its silhouette is what shows (and grows)
    rows, cols, u, v = canvas.window(*anatomy.heart.bounds)
    canvas.heart = (rows, cols, _soft(anatomy.heart.margin(u, v), _HEART_EDGE))
    air[rows, cols] *= 1.0 - _HEART_HIDES_AIR * canvas.heart[2]
    np.multiply(body, 0.5, out=px)
    px += 0.04
    px -= _AIR * air
    # ribs: arched bands, plain over the air of the lungs, faint over soft tissue
    period, curve, phase = anatomy.ribs
    rows, cols, u, v = canvas.window(0.05, 0.05, 0.95, 0.84)
    arch = curve * (np.abs(u - 0.5) - 0.28) ** 2
    ribs = _soft(np.cos((v + arch) * (2 * math.pi / period) + 2 * math.pi * phase) - 0.55, 0.45)
    px[rows, cols] += ribs * (0.02 + 0.07 * air[rows, cols]) * body[rows, cols]
    # spine, trachea, clavicles
    rows, cols, u, v = canvas.window(0.44, 0.0, 0.56, 0.95)
    spine = _soft(0.035 - np.abs(u - 0.5), 0.01) * (0.75 + 0.25 * np.cos(v * (2 * math.pi / 0.05)))
    px[rows, cols] += 0.07 * spine
    rows, cols, u, v = canvas.window(0.47, 0.0, 0.53, anatomy.lungs[0].top + 0.12)
    px[rows, cols] -= 0.1 * _soft(0.016 - np.abs(u - 0.5), 0.006)
    for side in (-1, 1):
        v0 = anatomy.clavicle_v
        inner, outer = 0.5 + side * 0.05, 0.5 + side * 0.34
        rows, cols, u, v = canvas.window(min(inner, outer), v0 - 0.09, max(inner, outer), v0 + 0.05)
        along = np.abs(u - 0.5)
        centre_line = v0 + 0.02 - 0.22 * (along - 0.05)
        px[rows, cols] += 0.1 * _soft(0.012 - np.abs(v - centre_line), 0.006) * _soft(0.33 - along, 0.02)
    return lung_masks


def _markings(canvas: Canvas, scene: Scene, lung_masks: dict) -> np.ndarray:
    """Vessel markings: ridges along the zero crossings of smooth noise, inside the lungs,
    denser towards the hila. Kept apart so that pneumothorax and fluid can erase them."""
    markings = np.zeros_like(canvas.pixels)
    noise = canvas.texture = canvas.smooth(scene.texture_noise)
    for lung in scene.anatomy.lungs:
        rows, cols, inside, lateral = lung_masks[lung.side]
        u = canvas.centres[cols][None, :]
        ridge = _soft(1.0 - np.abs(noise[rows, cols]) * 2.5, 1.0)
        markings[rows, cols] += 0.06 * ridge * inside * (0.35 + 0.65 * lung.lateral_fraction(u))
    rows, cols, heart = canvas.heart
    markings[rows, cols] *= 1.0 - heart
    return markings


def _draw_nodule(canvas, anatomy, lesion, markings, scene) -> Instance | None:
    (cu, cv) = lesion.shape["centre"]
    r = max(lesion.shape["radius"], 0.75 * canvas.pixel)
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    rows, cols, u, v = canvas.window(cu - r, cv - r, cu + r, cv + r)
    d2 = ((u - cu) ** 2 + (v - cv) ** 2) / r**2
    mask = (d2 < 1.0) & (lung.margins(u, v)[1] > 0)
    # projection of a solid sphere: bright centre, soft rim
    canvas.pixels[rows, cols] += lesion.contrast * np.sqrt(np.clip(1.0 - d2, 0.0, None)) * mask
    return _instance("nodule", rows, cols, mask)


def _draw_cavity(canvas, anatomy, lesion, markings, scene) -> Instance | None:
    (cu, cv), inner = lesion.shape["centre"], lesion.shape["inner"]
    r = max(lesion.shape["radius"], 0.75 * canvas.pixel)
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    rows, cols, u, v = canvas.window(cu - r, cv - r, cu + r, cv + r)
    d2 = ((u - cu) ** 2 + (v - cv) ** 2) / r**2
    mask = (d2 < 1.0) & (lung.margins(u, v)[1] > 0)
    # projection of a hollow sphere: a bright ring wall around a lucent (air) centre
    wall = np.sqrt(np.clip(1.0 - d2, 0.0, None)) - np.sqrt(np.clip(inner**2 - d2, 0.0, None))
    lucent = (d2 < inner**2) * 0.07
    canvas.pixels[rows, cols] += (lesion.contrast * 1.4 * wall - lucent) * mask
    markings[rows, cols] *= ~mask
    return _instance("cavity", rows, cols, mask)


def _draw_consolidation(canvas, anatomy, lesion, markings, scene) -> Instance | None:
    blobs = lesion.shape["blobs"]
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    u0 = min(b[0] - b[2] for b in blobs)
    v0 = min(b[1] - b[3] for b in blobs)
    u1 = max(b[0] + b[2] for b in blobs)
    v1 = max(b[1] + b[3] for b in blobs)
    rows, cols, u, v = canvas.window(u0, v0, u1, v1)
    profile = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.float32)
    for bu, bv, ru, rv in blobs:
        np.maximum(profile, 1.0 - ((u - bu) / ru) ** 2 - ((v - bv) / rv) ** 2, out=profile)
    mask = (profile > 0) & (lung.margins(u, v)[1] > 0)
    # a lobulated plateau with a soft edge, mottled by the markings' noise (air bronchograms)
    mottle = 0.8 + 0.2 * np.tanh(4.0 * canvas.texture[rows, cols])
    canvas.pixels[rows, cols] += lesion.contrast * _soft(profile, 0.35) * mottle * mask
    return _instance("consolidation", rows, cols, mask)


def _draw_effusion(canvas, anatomy, lesion, markings, scene) -> Instance | None:
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    level, meniscus = lesion.shape["level"], lesion.shape["meniscus"]
    rows, cols, u, v = canvas.window(lung.bounds[0], level - meniscus, lung.bounds[2], lung.base)
    # the fluid climbs the lateral chest wall: a meniscus, concave upwards
    surface = level - meniscus * (1.0 - lung.lateral_fraction(u)) ** 2
    depth = v - surface
    overall = lung.margins(u, v)[1]
    mask = (depth > 0) & (overall > 0)
    # fluid takes the place of the air, so it fills exactly what the lung darkened
    # (soft lung edge, heart overlap) and no more: no bright rim at the dome
    air = _soft(overall, _LUNG_EDGE) * (1.0 - _HEART_HIDES_AIR * _soft(anatomy.heart.margin(u, v), _HEART_EDGE))
    canvas.pixels[rows, cols] += lesion.contrast * air * _soft(depth, 0.02) * mask
    markings[rows, cols] *= ~mask
    return _instance("effusion", rows, cols, mask)


def _draw_pneumothorax(canvas, anatomy, lesion, markings, scene) -> Instance | None:
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    depth, extent = max(lesion.shape["depth"], 1.5 * canvas.pixel), lesion.shape["extent"]
    bottom = lung.top + extent * (lung.base - lung.top)
    rows, cols, u, v = canvas.window(lung.bounds[0], lung.top, lung.bounds[2], bottom)
    lateral, overall = lung.margins(u, v)
    below = _soft(bottom - v, 0.03)
    mask = (overall > 0) & (lateral < depth) & (v < bottom)
    # air without lung markings along the chest wall, bounded by a thin visceral pleural line
    line = np.exp(-(((lateral - depth) / 0.004) ** 2)) * (overall > 0) * below
    canvas.pixels[rows, cols] += 0.15 * line - lesion.contrast * mask * below
    markings[rows, cols] *= ~mask
    return _instance("pneumothorax", rows, cols, mask)


def _draw_cardiomegaly(canvas, anatomy, lesion, markings, scene) -> Instance | None:
    heart = anatomy.heart
    rows, cols, u, v = canvas.window(*heart.bounds)
    return _instance("cardiomegaly", rows, cols, heart.margin(u, v) > 0)


_DRAW = {
    "nodule": _draw_nodule,
    "cavity": _draw_cavity,
    "consolidation": _draw_consolidation,
    "effusion": _draw_effusion,
    "pneumothorax": _draw_pneumothorax,
    "cardiomegaly": _draw_cardiomegaly,
}


def _draw_shortcut(canvas: Canvas, shortcut: dict) -> tuple[int, int, int, int] | None:
    """Metal is drawn last and opaque; returns the exact pixel box of what was drawn."""
    if shortcut["kind"] == "marker":
        canvas.set_zoom(1.0)  # on the detector, not in the patient: never magnified
        cell, letters = shortcut["cell"], shortcut["letters"]
        u0, v0 = shortcut["u"], shortcut["v"]
        rows, cols, u, v = canvas.window(u0, v0, u0 + 4 * cell * len(letters), v0 + 5 * cell)
        gx = np.floor((u - u0) / cell).astype(int)  # glyph column, a blank every 4th
        gy = np.floor((v - v0) / cell).astype(int)
        letter = np.minimum(gx // 4, len(letters) - 1)
        inside = (gx >= 0) & (gx % 4 < 3) & (gx < 4 * len(letters)) & (gy >= 0) & (gy < 5)
        lit = inside & GLYPHS[letters[letter], np.clip(gy, 0, 4), np.clip(gx % 4, 0, 2)]
        canvas.pixels[rows, cols] = np.where(lit, 0.97, canvas.pixels[rows, cols])
        found = _instance("shortcut", rows, cols, lit)
        return found.box if found else None
    cu, cv, hu, hv = shortcut["box"]
    eu, ev = shortcut["lead_end"]
    rows, cols, u, v = canvas.window(min(cu - hu, eu) - 0.01, cv - hv, cu + hu, max(ev, cv + hv) + 0.01)
    # generator: a rounded metal can with a darker battery half
    can = (np.abs(u - cu) / hu) ** 4 + (np.abs(v - cv) / hv) ** 4 < 1.0
    # lead: x as a quadratic function of y from the can's lower medial corner to the heart
    su, sv = cu - 0.6 * hu, cv + 0.6 * hv
    t = np.clip((v - sv) / max(ev - sv, 1e-3), 0.0, 1.0)
    path_u = su + (eu - su) * t + shortcut["bend"] * 4 * t * (1 - t)
    lead = (np.abs(u - path_u) < max(0.0045, 0.6 * canvas.pixel)) & (v >= sv) & (v <= ev)
    metal = can | lead
    value = np.where(can & (u > cu), 0.9, 0.98)
    canvas.pixels[rows, cols] = np.where(metal, value, canvas.pixels[rows, cols])
    found = _instance("shortcut", rows, cols, metal)
    return found.box if found else None
