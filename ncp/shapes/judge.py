"""A deterministic pixel judge for the shapes world: how well does an image follow its prompt, and how clean is it?

    from ncp.shapes.judge import score
    s = score(image, "a large red circle on the left, gray background")
    s.overall, s.color, s.attributes_correct["shape"]

numpy only. The image (HxWx3 uint8 array or PIL image, H and W >= 32) is area-resampled to the 64-px canvas that the
renderer's geometry constants (RADIUS, CENTERS, SQUARE_HALF) are written in, then read in five steps (the
reading of the canvas and its components, steps 1-3's pieces, is ncp/shapes/components.py):

1. background: median of the 2-px border ring -> nearest of BACKGROUNDS;
2. foreground: distance of a 3x3-smoothed image from that colour above a noise-adaptive threshold, split into
   connected components (8-connectivity, run-length union-find: scipy is not a dependency);
3. per component: fill colour (median of its most saturated quarter), fractional coverage alpha per pixel
   (projection onto the background->fill colour line, so anti-aliased and blurred edges count partly), area =
   sum(alpha) (blur-invariant), and shape features that Gaussian blur leaves unchanged because blur only adds to the
   second cumulant: rho = 4th cumulant along the axes / along the diagonals (circle and triangle 1, square 2) and the
   3rd cumulant of y / area^1.5 (up-pointing triangle -0.017, circle and square 0). The shape is the nearest
   prototype; size = the circumradius that shape needs for that area; position = the fitted shape's bbox centre;
4. objects of the prompt are matched to the significant components by the assignment with the highest total score
   (so two swapped objects read as "position wrong", not "colour and shape wrong");
5. scores. Each attribute has a graded score in [0, 1] (1 within tolerance, Gaussian fall-off beyond it, capped at 0.5
   when the hard decision is wrong) and a hard decision in `attributes_correct` (nearest palette colour, best-fitting
   shape, nearest size, nearest position, nearest background, exact object count).

overall = 0.8 * mean(color, shape, size, position, background, count) + 0.2 * cleanliness, where cleanliness is the
mean of three terms: stray foreground pixels outside the matched objects, background noise (std of the background
pixels around its median colour) and edge softness (partially covered pixels per unit of the fitted outline).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ncp.shapes.components import AREA_K, Component, label_components, measure_component, to_canvas
from ncp.shapes.grammar import BACKGROUNDS, COLORS, SIZES, Scene, ShapeObject, parse
from ncp.shapes.render import CANVAS, CENTERS, RADIUS

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background", "count")
ATTRIBUTE_WEIGHT = 0.8  # overall = 0.8 * mean attribute score + 0.2 * cleanliness
MIN_OBJECT_AREA = 20.0  # alpha-mass (canvas px^2) of a component that counts as an object; small triangle ~ 64
_PALETTE_NAMES = list(COLORS)
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)
_CENTER_NAMES = list(CENTERS)
_CENTER_XY = np.array(list(CENTERS.values()), dtype=np.float32)
_PAD = np.clip(np.arange(-1, CANVAS + 1), 0, CANVAS - 1)
_LOG_RADII = np.log(np.array([RADIUS[s] for s in SIZES]))


@dataclass(frozen=True)
class JudgeScore:
    """Per-attribute scores in [0, 1] (graded), cleanliness, overall, and the hard per-attribute decisions."""

    color: float
    shape: float
    size: float
    position: float
    background: float
    count: float
    cleanliness: float
    overall: float
    attributes_correct: dict[str, bool]
    objects_found: int

    def __post_init__(self) -> None:
        for name in (*ATTRIBUTES, "cleanliness", "overall"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"JudgeScore.{name} must lie in [0, 1], got {value}.")

    @property
    def all_correct(self) -> bool:
        return all(self.attributes_correct.values())


def _closeness(d: float, tol: float, scale: float) -> float:
    """1 within `tol`, then a Gaussian fall-off of width `scale`."""
    return float(math.exp(-((max(0.0, d - tol) / scale) ** 2)))


def _object_scores(c: Component, o: ShapeObject) -> dict[str, tuple[float, bool]]:
    """Graded score and hard decision per attribute of one prompt object read from one component."""
    out: dict[str, tuple[float, bool]] = {}
    ok = _PALETTE_NAMES[int(c.color_dist.argmin())] == o.color
    s = _closeness(float(c.color_dist[_PALETTE_NAMES.index(o.color)]), tol=15.0, scale=40.0)
    out["color"] = (s if ok else min(s, 0.5), ok)
    # Shape: nearness of the blur-invariant features to the expected prototype (~0.5 on the decision boundary),
    # times the outline quality: soft IoU with the expected anti-aliased template (1 at IoU >= 0.85, 0.5 at <= 0.5).
    ok = c.shape == o.shape
    quality = 0.5 + 0.5 * float(np.clip((c.iou(o.shape) - 0.5) / 0.35, 0.0, 1.0))
    s = _closeness(c.feature_dist[o.shape], tol=0.3, scale=1.3) * quality
    out["shape"] = (s if ok else min(s, 0.5), ok)
    # Size: circumradius implied by the area of the drawn shape, compared in log space (small 7, large 12.5).
    log_r = 0.5 * math.log(c.area / AREA_K[c.shape])
    ok = SIZES[int(np.abs(_LOG_RADII - log_r).argmin())] == o.size
    s = _closeness(abs(log_r - math.log(RADIUS[o.size])), tol=0.1, scale=0.2)
    out["size"] = (s if ok else min(s, 0.5), ok)
    cx, cy = c.center
    d_pos = np.hypot(_CENTER_XY[:, 0] - cx, _CENTER_XY[:, 1] - cy)
    ok = _CENTER_NAMES[int(d_pos.argmin())] == o.position
    s = _closeness(float(d_pos[_CENTER_NAMES.index(o.position)]), tol=2.5, scale=5.0)
    out["position"] = (s if ok else min(s, 0.5), ok)
    return out


def _cleanliness(img: np.ndarray, bg: np.ndarray, mask: np.ndarray, matched: list[Component], upscale: float) -> float:
    """Mean of three terms in [0, 1]: stray foreground, background noise, edge softness."""
    stray_px = max(0, int(mask.sum()) - sum(c.pixels for c in matched))
    stray = math.exp(-stray_px / 40.0)  # a 20-px blob ~ 0.6
    # Background: pixels at least 2 px away from any detected foreground.
    near = mask.copy()
    for _ in range(2):
        near[1:] |= near[:-1].copy()
        near[:-1] |= near[1:].copy()
        near[:, 1:] |= near[:, :-1].copy()
        near[:, :-1] |= near[:, 1:].copy()
    far = img[~near]
    std = float(np.sqrt(((far - bg) ** 2).mean())) if len(far) else 0.0  # RMS over pixels and channels
    noise = 1.0 / (1.0 + (std / 6.0) ** 2)  # std 2 ~ 0.9, 6 ~ 0.5, 12 ~ 0.2
    # Edges: a crisp anti-aliased outline has about one partially covered pixel per unit length; blur widens it.
    # An image smaller than the canvas was upsampled: its crisp edges are `upscale` canvas pixels wide, not blur.
    soft = [c.softness / upscale for c in matched]
    sharp = float(np.mean([_closeness(w, tol=1.3, scale=1.5) for w in soft])) if matched else 1.0
    return float((stray + noise + sharp) / 3.0)


def score(image: Any, prompt: str | Scene) -> JudgeScore:
    """Judge how well `image` follows `prompt` (a grammar prompt or a Scene). Deterministic; about 2-3 ms per image.

    Raises PromptError for a prompt outside the grammar and ValueError/TypeError for an unusable image."""
    scene = prompt if isinstance(prompt, Scene) else parse(prompt)
    img = to_canvas(image)  # (64, 64, 3) float32
    native = (
        min(image.size) if hasattr(image, "convert") and not isinstance(image, np.ndarray) else min(image.shape[:2])
    )
    upscale = max(1.0, CANVAS / native)

    # 1. Background: median of the border ring (objects cover only a small part of it).
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[2:-2, :2].reshape(-1, 3),
                           img[2:-2, -2:].reshape(-1, 3)])  # fmt: skip
    bg = np.median(ring, axis=0)
    d_bg = np.sqrt(((_BG - bg) ** 2).sum(axis=1))
    bg_ok = _BG_NAMES[int(d_bg.argmin())] == scene.background
    bg_s = _closeness(float(d_bg[_BG_NAMES.index(scene.background)]), tol=12.0, scale=60.0)
    background = (bg_s if bg_ok else min(bg_s, 0.5), bg_ok)

    # 2. Foreground mask on a 3x3 box-smoothed image (suppresses pixel noise), threshold adapted to the ring's noise.
    p = img[_PAD][:, _PAD]  # edge-replicated 66x66
    smooth = sum(p[i : i + CANVAS, j : j + CANVAS] for i in range(3) for j in range(3)) / 9.0
    dist_s = np.sqrt(((smooth - bg) ** 2).sum(axis=-1))
    ring_s = np.concatenate([dist_s[:2].ravel(), dist_s[-2:].ravel(), dist_s[:, :2].ravel(), dist_s[:, -2:].ravel()])
    thr = float(np.clip(28.0 + 3.0 * np.percentile(ring_s, 90), 28.0, 60.0))
    mask = dist_s > thr
    labels, n = label_components(mask)

    # 3. Components; only significant ones (alpha-mass >= MIN_OBJECT_AREA) can be objects.
    dist = np.sqrt(((img - bg) ** 2).sum(axis=-1))
    comps: list[Component] = []
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        for lab in np.nonzero(sizes[1:] >= MIN_OBJECT_AREA / 2)[0] + 1:
            c = measure_component(img, bg, dist, labels == lab)
            if c is not None and c.area >= MIN_OBJECT_AREA:
                comps.append(c)
    comps.sort(key=lambda c: -c.area)

    # 4. Match prompt objects to components: the assignment with the highest total attribute score.
    objs = scene.objects
    candidates = comps[:4]
    table = [[_object_scores(c, o) for o in objs] for c in candidates]  # [component][object] -> attr -> (s, ok)
    per_obj: list[dict[str, tuple[float, bool]] | None] = [None] * len(objs)
    matched: list[Component] = []
    best_total = -1.0
    k = min(len(objs), len(candidates))
    for perm in itertools.permutations(range(len(candidates)), k):
        for slots in itertools.combinations(range(len(objs)), k):
            total = sum(v[0] for slot, ci in zip(slots, perm, strict=True) for v in table[ci][slot].values())
            if total > best_total:
                best_total, matched = total, [candidates[ci] for ci in perm]
                per_obj = [None] * len(objs)
                for slot, ci in zip(slots, perm, strict=True):
                    per_obj[slot] = table[ci][slot]

    # 5. Scores.
    scores: dict[str, float] = {}
    correct: dict[str, bool] = {}
    for attr in ("color", "shape", "size", "position"):
        vals = [d[attr] if d else (0.0, False) for d in per_obj]
        scores[attr] = sum(v[0] for v in vals) / len(vals)
        correct[attr] = all(v[1] for v in vals)
    scores["background"], correct["background"] = background
    diff = abs(len(comps) - len(objs))
    scores["count"], correct["count"] = 1.0 / (1.0 + diff), diff == 0

    cleanliness = min(1.0, max(0.0, _cleanliness(img, bg, mask, matched, upscale)))
    attr_mean = sum(scores[a] for a in ATTRIBUTES) / len(ATTRIBUTES)
    overall = min(1.0, max(0.0, ATTRIBUTE_WEIGHT * attr_mean + (1.0 - ATTRIBUTE_WEIGHT) * cleanliness))
    return JudgeScore(**{a: scores[a] for a in ATTRIBUTES}, cleanliness=cleanliness, overall=overall,
                      attributes_correct=correct, objects_found=len(comps))  # fmt: skip
