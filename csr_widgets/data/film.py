"""The chest phantom's film: a scene (scene.py) rasterised to pixels, exactly.

Rasterising works on 1-D pixel-centre vectors and broadcasting, and each part (lung,
heart, lesion, device) is drawn inside its own window: that is what keeps a 224-px image
at a few milliseconds. Every drawn finding comes back with its exact pixel box and mask.

Brightness is attenuation: air is dark, soft tissue grey, bone and metal bright.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .scene import GLYPHS, Anatomy, Scene

# How much the lungs' air darkens the soft tissue, how much of it the heart hides, and
# the widths of their soft edges (image widths; heart: in its normalised radius).
_AIR, _HEART_HIDES_AIR = 0.3, 0.9
_LUNG_EDGE, _HEART_EDGE = 0.012, 0.15


@lru_cache(maxsize=32)
def _interpolation(grid: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation from ``grid`` cells to ``size`` pixels: lower index, weight."""
    pos = np.clip((np.arange(size) + 0.5) / size * grid - 0.5, 0, grid - 1)
    lo = np.minimum(np.floor(pos).astype(np.intp), grid - 2)
    return lo, (pos - lo).astype(np.float32)


@lru_cache(maxsize=32)
def _centres(size: int, zoom: float = 1.0) -> np.ndarray:
    return (0.5 + ((np.arange(size) + 0.5) / size - 0.5) / zoom).astype(np.float32)


class Film:
    """A square float32 attenuation image (the phantom's film) and the pixel-window helpers to draw into it.

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


def rasterise(scene: Scene, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[Instance], tuple | None]:
    """Rasterise a scene.

    Returns the image (size, size) float32 in [0, 1], the drawn concept instances with
    exact boxes and masks, and the shortcut's pixel box (or None). ``rng`` is only used for
    the per-pixel noise, the last draw of an image.
    """
    film = Film(size, scene.zoom)
    anatomy = scene.anatomy
    lung_masks = _draw_anatomy(film, anatomy)
    markings = _markings(film, scene, lung_masks)
    instances: list[Instance] = []
    for lesion in scene.lesions:
        instance = _DRAW[lesion.concept](film, anatomy, lesion, markings, scene)
        if instance is not None:
            instances.append(instance)
    film.pixels += markings
    shortcut_box = _draw_shortcut(film, scene.shortcut) if scene.shortcut else None
    gain, offset = anatomy.brightness
    image = film.pixels
    image *= gain
    image += offset + 0.03 * film.smooth(scene.smooth_noise)
    image += rng.standard_normal((size, size), dtype=np.float32) * np.float32(scene.noise_sigma)
    np.clip(image, 0.0, 1.0, out=image)
    return image, instances, shortcut_box


def _draw_anatomy(film: Film, anatomy: Anatomy) -> dict[int, tuple]:
    """Body, lungs, heart, ribs, spine, trachea and clavicles; returns each lung's window
    (rows, cols, inside mask, lateral margin) for the parts drawn inside the lungs."""
    px, c, size = film.pixels, film.centres, film.size
    bu, bv, ru, rv = anatomy.body
    body = 1.0 - (((c[None, :] - bu) / ru) ** 4 + ((c[:, None] - bv) / rv) ** 4)
    np.clip(body * (1.0 / 0.08), 0.0, 1.0, out=body)
    air = np.zeros((size, size), np.float32)
    lung_masks = {}
    for lung in anatomy.lungs:
        rows, cols, u, v = film.window(*lung.bounds)
        lateral, overall = lung.margins(u, v)
        air[rows, cols] += _soft(overall, _LUNG_EDGE)
        lung_masks[lung.side] = (rows, cols, overall > 0, lateral)
    # the heart is soft tissue in front of the lungs: it hides the air and adds nothing
    # where it overlaps the mediastinum, so its silhouette is what shows (and grows)
    rows, cols, u, v = film.window(*anatomy.heart.bounds)
    film.heart = (rows, cols, _soft(anatomy.heart.margin(u, v), _HEART_EDGE))
    air[rows, cols] *= 1.0 - _HEART_HIDES_AIR * film.heart[2]
    np.multiply(body, 0.5, out=px)
    px += 0.04
    px -= _AIR * air
    # ribs: arched bands, plain over the air of the lungs, faint over soft tissue
    period, curve, phase = anatomy.ribs
    rows, cols, u, v = film.window(0.05, 0.05, 0.95, 0.84)
    arch = curve * (np.abs(u - 0.5) - 0.28) ** 2
    ribs = _soft(np.cos((v + arch) * (2 * math.pi / period) + 2 * math.pi * phase) - 0.55, 0.45)
    px[rows, cols] += ribs * (0.02 + 0.07 * air[rows, cols]) * body[rows, cols]
    # spine, trachea, clavicles
    rows, cols, u, v = film.window(0.44, 0.0, 0.56, 0.95)
    spine = _soft(0.035 - np.abs(u - 0.5), 0.01) * (0.75 + 0.25 * np.cos(v * (2 * math.pi / 0.05)))
    px[rows, cols] += 0.07 * spine
    rows, cols, u, v = film.window(0.47, 0.0, 0.53, anatomy.lungs[0].top + 0.12)
    px[rows, cols] -= 0.1 * _soft(0.016 - np.abs(u - 0.5), 0.006)
    for side in (-1, 1):
        v0 = anatomy.clavicle_v
        inner, outer = 0.5 + side * 0.05, 0.5 + side * 0.34
        rows, cols, u, v = film.window(min(inner, outer), v0 - 0.09, max(inner, outer), v0 + 0.05)
        along = np.abs(u - 0.5)
        centre_line = v0 + 0.02 - 0.22 * (along - 0.05)
        px[rows, cols] += 0.1 * _soft(0.012 - np.abs(v - centre_line), 0.006) * _soft(0.33 - along, 0.02)
    return lung_masks


def _markings(film: Film, scene: Scene, lung_masks: dict) -> np.ndarray:
    """Vessel markings: ridges along the zero crossings of smooth noise, inside the lungs,
    denser towards the hila. Kept apart so that pneumothorax and fluid can erase them."""
    markings = np.zeros_like(film.pixels)
    noise = film.texture = film.smooth(scene.texture_noise)
    for lung in scene.anatomy.lungs:
        rows, cols, inside, lateral = lung_masks[lung.side]
        u = film.centres[cols][None, :]
        ridge = _soft(1.0 - np.abs(noise[rows, cols]) * 2.5, 1.0)
        markings[rows, cols] += 0.06 * ridge * inside * (0.35 + 0.65 * lung.lateral_fraction(u))
    rows, cols, heart = film.heart
    markings[rows, cols] *= 1.0 - heart
    return markings


def _draw_nodule(film, anatomy, lesion, markings, scene) -> Instance | None:
    (cu, cv) = lesion.shape["centre"]
    r = max(lesion.shape["radius"], 0.75 * film.pixel)
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    rows, cols, u, v = film.window(cu - r, cv - r, cu + r, cv + r)
    d2 = ((u - cu) ** 2 + (v - cv) ** 2) / r**2
    mask = (d2 < 1.0) & (lung.margins(u, v)[1] > 0)
    # projection of a solid sphere: bright centre, soft rim
    film.pixels[rows, cols] += lesion.contrast * np.sqrt(np.clip(1.0 - d2, 0.0, None)) * mask
    return _instance("nodule", rows, cols, mask)


def _draw_cavity(film, anatomy, lesion, markings, scene) -> Instance | None:
    (cu, cv), inner = lesion.shape["centre"], lesion.shape["inner"]
    r = max(lesion.shape["radius"], 0.75 * film.pixel)
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    rows, cols, u, v = film.window(cu - r, cv - r, cu + r, cv + r)
    d2 = ((u - cu) ** 2 + (v - cv) ** 2) / r**2
    mask = (d2 < 1.0) & (lung.margins(u, v)[1] > 0)
    # projection of a hollow sphere: a bright ring wall around a lucent (air) centre
    wall = np.sqrt(np.clip(1.0 - d2, 0.0, None)) - np.sqrt(np.clip(inner**2 - d2, 0.0, None))
    lucent = (d2 < inner**2) * 0.07
    film.pixels[rows, cols] += (lesion.contrast * 1.4 * wall - lucent) * mask
    markings[rows, cols] *= ~mask
    return _instance("cavity", rows, cols, mask)


def _draw_consolidation(film, anatomy, lesion, markings, scene) -> Instance | None:
    blobs = lesion.shape["blobs"]
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    u0 = min(b[0] - b[2] for b in blobs)
    v0 = min(b[1] - b[3] for b in blobs)
    u1 = max(b[0] + b[2] for b in blobs)
    v1 = max(b[1] + b[3] for b in blobs)
    rows, cols, u, v = film.window(u0, v0, u1, v1)
    profile = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.float32)
    for bu, bv, ru, rv in blobs:
        np.maximum(profile, 1.0 - ((u - bu) / ru) ** 2 - ((v - bv) / rv) ** 2, out=profile)
    mask = (profile > 0) & (lung.margins(u, v)[1] > 0)
    # a lobulated plateau with a soft edge, mottled by the markings' noise (air bronchograms)
    mottle = 0.8 + 0.2 * np.tanh(4.0 * film.texture[rows, cols])
    film.pixels[rows, cols] += lesion.contrast * _soft(profile, 0.35) * mottle * mask
    return _instance("consolidation", rows, cols, mask)


def _draw_effusion(film, anatomy, lesion, markings, scene) -> Instance | None:
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    level, meniscus = lesion.shape["level"], lesion.shape["meniscus"]
    rows, cols, u, v = film.window(lung.bounds[0], level - meniscus, lung.bounds[2], lung.base)
    # the fluid climbs the lateral chest wall: a meniscus, concave upwards
    surface = level - meniscus * (1.0 - lung.lateral_fraction(u)) ** 2
    depth = v - surface
    overall = lung.margins(u, v)[1]
    mask = (depth > 0) & (overall > 0)
    # fluid takes the place of the air, so it fills exactly what the lung darkened
    # (soft lung edge, heart overlap) and no more: no bright rim at the dome
    air = _soft(overall, _LUNG_EDGE) * (1.0 - _HEART_HIDES_AIR * _soft(anatomy.heart.margin(u, v), _HEART_EDGE))
    film.pixels[rows, cols] += lesion.contrast * air * _soft(depth, 0.02) * mask
    markings[rows, cols] *= ~mask
    return _instance("effusion", rows, cols, mask)


def _draw_pneumothorax(film, anatomy, lesion, markings, scene) -> Instance | None:
    lung = anatomy.lungs[(lesion.side + 1) // 2]
    depth, extent = max(lesion.shape["depth"], 1.5 * film.pixel), lesion.shape["extent"]
    bottom = lung.top + extent * (lung.base - lung.top)
    rows, cols, u, v = film.window(lung.bounds[0], lung.top, lung.bounds[2], bottom)
    lateral, overall = lung.margins(u, v)
    below = _soft(bottom - v, 0.03)
    mask = (overall > 0) & (lateral < depth) & (v < bottom)
    # air without lung markings along the chest wall, bounded by a thin visceral pleural line
    line = np.exp(-(((lateral - depth) / 0.004) ** 2)) * (overall > 0) * below
    film.pixels[rows, cols] += 0.15 * line - lesion.contrast * mask * below
    markings[rows, cols] *= ~mask
    return _instance("pneumothorax", rows, cols, mask)


def _draw_cardiomegaly(film, anatomy, lesion, markings, scene) -> Instance | None:
    heart = anatomy.heart
    rows, cols, u, v = film.window(*heart.bounds)
    return _instance("cardiomegaly", rows, cols, heart.margin(u, v) > 0)


_DRAW = {
    "nodule": _draw_nodule,
    "cavity": _draw_cavity,
    "consolidation": _draw_consolidation,
    "effusion": _draw_effusion,
    "pneumothorax": _draw_pneumothorax,
    "cardiomegaly": _draw_cardiomegaly,
}


def _draw_shortcut(film: Film, shortcut: dict) -> tuple[int, int, int, int] | None:
    """Metal is drawn last and opaque; returns the exact pixel box of what was drawn."""
    if shortcut["kind"] == "marker":
        film.set_zoom(1.0)  # on the detector, not in the patient: never magnified
        cell, letters = shortcut["cell"], shortcut["letters"]
        u0, v0 = shortcut["u"], shortcut["v"]
        rows, cols, u, v = film.window(u0, v0, u0 + 4 * cell * len(letters), v0 + 5 * cell)
        gx = np.floor((u - u0) / cell).astype(int)  # glyph column, a blank every 4th
        gy = np.floor((v - v0) / cell).astype(int)
        letter = np.minimum(gx // 4, len(letters) - 1)
        inside = (gx >= 0) & (gx % 4 < 3) & (gx < 4 * len(letters)) & (gy >= 0) & (gy < 5)
        lit = inside & GLYPHS[letters[letter], np.clip(gy, 0, 4), np.clip(gx % 4, 0, 2)]
        film.pixels[rows, cols] = np.where(lit, 0.97, film.pixels[rows, cols])
        found = _instance("shortcut", rows, cols, lit)
        return found.box if found else None
    cu, cv, hu, hv = shortcut["box"]
    eu, ev = shortcut["lead_end"]
    rows, cols, u, v = film.window(min(cu - hu, eu) - 0.01, cv - hv, cu + hu, max(ev, cv + hv) + 0.01)
    # generator: a rounded metal can with a darker battery half
    can = (np.abs(u - cu) / hu) ** 4 + (np.abs(v - cv) / hv) ** 4 < 1.0
    # lead: x as a quadratic function of y from the can's lower medial corner to the heart
    su, sv = cu - 0.6 * hu, cv + 0.6 * hv
    t = np.clip((v - sv) / max(ev - sv, 1e-3), 0.0, 1.0)
    path_u = su + (eu - su) * t + shortcut["bend"] * 4 * t * (1 - t)
    lead = (np.abs(u - path_u) < max(0.0045, 0.6 * film.pixel)) & (v >= sv) & (v <= ev)
    metal = can | lead
    value = np.where(can & (u > cu), 0.9, 0.98)
    film.pixels[rows, cols] = np.where(metal, value, film.pixels[rows, cols])
    found = _instance("shortcut", rows, cols, metal)
    return found.box if found else None
