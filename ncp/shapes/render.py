"""Anti-aliased numpy renderer for shapes-world scenes (4x supersampling, box-filtered down).

Geometry is expressed in units of a 64-pixel canvas and scaled to the requested size, so the judge can use the same
constants at any resolution.
"""

from __future__ import annotations

import random

import numpy as np

from ncp.shapes.grammar import BACKGROUNDS, COLORS, Scene

CANVAS = 64
RADIUS = {"small": 7.0, "large": 12.5}  # circumradius in 64-px units
CENTERS = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
SQUARE_HALF = 0.85  # half side of a square as a fraction of the radius (area close to the circle's)
SUPERSAMPLE = 4


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        h = r * SQUARE_HALF
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        # Upward equilateral triangle with circumradius r, centred on its bounding box.
        half_w = r * np.sqrt(3) / 2
        top, base = cy - 0.75 * r, cy + 0.75 * r
        t = (ys - top) / (base - top)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * half_w)
    raise ValueError(f"Unknown shape {shape!r}; expected circle, square or triangle.")


def render(scene: Scene, size: int = CANVAS, rng: random.Random | None = None, jitter: float = 0.0) -> np.ndarray:
    """Render a scene to an HxWx3 uint8 array. With `rng` and `jitter` > 0, positions shift by up to `jitter`
    canvas pixels and radii scale by up to +-8%, so a model trained on renders does not learn a single template."""
    ss = size * SUPERSAMPLE
    scale = size / CANVAS
    coords = (np.arange(ss) + 0.5) / SUPERSAMPLE / scale  # pixel centres in canvas units
    xs, ys = np.meshgrid(coords, coords)
    img = np.empty((ss, ss, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        cx, cy = CENTERS[obj.position]
        r = RADIUS[obj.size]
        if rng is not None and jitter > 0:
            cx += rng.uniform(-jitter, jitter)
            cy += rng.uniform(-jitter, jitter)
            r *= rng.uniform(0.92, 1.08)
        img[_shape_mask(obj.shape, cx, cy, r, xs, ys)] = COLORS[obj.color]
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
