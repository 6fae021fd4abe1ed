"""A deterministic pixel judge for the shapes world: how well does an image follow its prompt, and how clean is it?

    from ncp.shapes.judge import score
    s = score(image, "a large red circle on the left, gray background")
    s.overall, s.color, s.attributes_correct["shape"]

numpy only. The image (HxWx3 uint8 array or PIL image, H and W >= 32) is area-resampled to the 64-px canvas that the
renderer's geometry constants (RADIUS, CENTERS, SQUARE_HALF) are written in, then read in five steps:

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ncp.shapes.grammar import BACKGROUNDS, COLORS, SIZES, Scene, ShapeObject, parse
from ncp.shapes.render import CANVAS, CENTERS, RADIUS, SQUARE_HALF

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background", "count")
ATTRIBUTE_WEIGHT = 0.8  # overall = 0.8 * mean attribute score + 0.2 * cleanliness
MIN_OBJECT_AREA = 20.0  # alpha-mass (canvas px^2) of a component that counts as an object; small triangle ~ 64
MIN_SIDE = 32
# area = K * r^2 for circumradius r (renderer geometry): circle pi, square (2 * 0.85)^2, equilateral triangle 3*sqrt(3)/4.
AREA_K = {"circle": math.pi, "square": (2 * SQUARE_HALF) ** 2, "triangle": 3 * math.sqrt(3) / 4}
PERIMETER_K = {"circle": 2 * math.pi, "square": 8 * SQUARE_HALF, "triangle": 3 * math.sqrt(3)}
# Prototype shape features (rho = axis/diagonal 4th cumulant, skew = y 3rd cumulant / area^1.5), see _component.
SHAPE_FEATURES = {"circle": (1.0, 0.0), "square": (2.0, 0.0), "triangle": (1.0, -0.0169)}
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
_PALETTE_NAMES = list(COLORS)
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)
_CENTER_NAMES = list(CENTERS)
_CENTER_XY = np.array(list(CENTERS.values()), dtype=np.float32)
_REGION_DILATE = 2  # px of rim around the detection mask that count towards alpha
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


@dataclass(frozen=True)
class _Component:
    """One connected foreground component read off the canvas (private to the judge)."""

    fill: np.ndarray  # (3,) fill colour: median of the most saturated quarter of its pixels
    color_dist: np.ndarray  # (palette,) distance of the fill from each palette colour's mixing line with the bg
    area: float  # sum of alpha, canvas px^2 (blur-invariant)
    pixels: int  # detection-mask pixels
    shape: str  # nearest shape in cumulant-feature space
    feature_dist: dict[str, float]  # normalised distance of the features to each shape's prototype
    center: tuple[float, float]  # bbox centre of the detected shape (what CENTERS holds), canvas units
    softness: float  # partially covered pixels per unit outline of the detected shape
    alpha: np.ndarray  # (h, w) coverage in the crop
    grid: tuple[np.ndarray, np.ndarray]  # (gx, gy) pixel centres of the crop
    centroid: tuple[float, float]
    _iou: dict[str, float] = field(default_factory=dict)

    def iou(self, shape: str) -> float:
        """Soft IoU of alpha with the anti-aliased template of `shape` of the same area and centroid (cached)."""
        if shape not in self._iou:
            r = math.sqrt(self.area / AREA_K[shape])
            mx, my = self.centroid
            cy = my - 0.25 * r if shape == "triangle" else my  # triangle centroid: 0.25 r below its bbox centre
            t = _template(shape, mx, cy, r, *self.grid)
            self._iou[shape] = float(np.minimum(self.alpha, t).sum() / max(np.maximum(self.alpha, t).sum(), 1e-6))
        return self._iou[shape]


def _closeness(d: float, tol: float, scale: float) -> float:
    """1 within `tol`, then a Gaussian fall-off of width `scale`."""
    return float(math.exp(-((max(0.0, d - tol) / scale) ** 2)))


def _area_resample(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Area-average `x` along `axis` to n_out samples (exact box filter, any ratio, up or down): differences of the
    running integral of the piecewise-constant signal at the output pixel edges. No BLAS, so no thread contention."""
    x = np.moveaxis(x, axis, 0)
    n_in = x.shape[0]
    cum = np.concatenate([np.zeros((1, *x.shape[1:]), x.dtype), np.cumsum(x, axis=0)])  # integral at integer edges
    edges = np.arange(n_out + 1) * (n_in / n_out)
    i = np.minimum(edges.astype(int), n_in - 1)
    frac = (edges - i).reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
    integral = cum[i] + frac * x[i]  # (n_out + 1, ...)
    return np.moveaxis(np.diff(integral, axis=0) * (n_out / n_in), 0, axis)


def _to_canvas(image: Any) -> np.ndarray:
    if hasattr(image, "convert") and not isinstance(image, np.ndarray):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be an HxWx3 uint8 numpy array or a PIL image, got {type(image).__name__}.")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}; "
            "convert with np.asarray(pil_image.convert('RGB'))."
        )
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image is {h}x{w}; the judge needs at least {MIN_SIDE}x{MIN_SIDE} pixels.")
    img = image.astype(np.float32)
    if (h, w) == (CANVAS, CANVAS):
        return img
    if h % CANVAS == 0 and w % CANVAS == 0:  # exact box filter, no BLAS threads
        return img.reshape(CANVAS, h // CANVAS, CANVAS, w // CANVAS, 3).mean(axis=(1, 3))
    return _area_resample(_area_resample(img, 0, CANVAS), 1, CANVAS)


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: run-length encode the rows, union overlapping runs of adjacent
    rows. Returns (labels with 0 = background and 1..n, n)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; row-major order pairs the k-th start with the k-th end
    n = len(rows)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_first = np.searchsorted(rows, np.arange(h + 1))
    rs, ss, es = rows.tolist(), starts.tolist(), ends.tolist()
    for y in range(1, h):
        i, i_end = row_first[y], row_first[y + 1]
        j, j_end = row_first[y - 1], row_first[y]
        while i < i_end and j < j_end:
            # 8-connectivity: runs touch if they overlap after widening by one pixel.
            if ss[i] <= es[j] and ss[j] <= es[i]:
                ra, rb = find(i), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if es[i] < es[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for k in range(n):
        lab = ids.setdefault(find(k), len(ids) + 1)
        labels[rs[k], ss[k] : es[k]] = lab
    return labels, len(ids)


def _color_dist(fill: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Distance of a fill colour from each palette colour c, read as a mixture a * c + (1 - a) * bg: the distance off
    that mixing line plus a quarter of the dilution (1 - a) * |c - bg|. A small object that blur (or a soft decoder)
    mixed with the background keeps its hue direction, so it is not mistaken for a neighbouring palette colour (a
    diluted yellow on black would be nearer to orange in plain RGB distance)."""
    v = _PALETTE - bg  # (P, 3)
    norm = np.sqrt((v * v).sum(axis=1))
    a = np.clip((v @ (fill - bg)) / np.maximum(norm * norm, 1e-6), 0.0, 1.0)  # (P,)
    off_line = np.sqrt((((fill - bg)[None, :] - a[:, None] * v) ** 2).sum(axis=1))
    return off_line + 0.25 * (1.0 - a) * norm


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by a 3x3 square, `steps` times."""
    out = mask.copy()
    for _ in range(steps):
        out[1:] |= out[:-1].copy()
        out[:-1] |= out[1:].copy()
        out[:, 1:] |= out[:, :-1].copy()
        out[:, :-1] |= out[:, 1:].copy()
    return out


def _kappa4(w: np.ndarray, d: np.ndarray) -> float:
    """Fourth cumulant of coordinate d under weights w (summing to 1, d centred)."""
    d2 = d * d
    m2 = float((w * d2).sum())
    return float((w * d2 * d2).sum()) - 3.0 * m2 * m2


def _template(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a renderer shape from a signed distance: alpha = clip(0.5 - sdf, 0, 1)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - r * SQUARE_HALF
    else:  # upward equilateral triangle, apex at cy - 0.75 r, base at cy + 0.75 r (see render._shape_mask)
        top = cy - 0.75 * r
        side = (np.abs(dx) - (ys - top) * math.tan(math.pi / 6)) * math.cos(math.pi / 6)
        sdf = np.maximum(side, ys - (cy + 0.75 * r))
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _component(img: np.ndarray, bg: np.ndarray, dist: np.ndarray, comp: np.ndarray) -> _Component | None:
    ys, xs = np.nonzero(comp)
    d = dist[ys, xs]
    inner = d >= np.partition(d, (3 * len(d)) // 4)[(3 * len(d)) // 4]  # the most saturated quarter: blur-proof
    fill = np.median(img[ys[inner], xs[inner]], axis=0)
    axis = fill - bg
    norm2 = float(axis @ axis)
    if norm2 < 1.0:
        return None
    # Crop around the component with a margin so blurred edges and the templates fit.
    m = 3
    y0, y1 = max(0, ys.min() - m), min(CANVAS, ys.max() + m + 1)
    x0, x1 = max(0, xs.min() - m), min(CANVAS, xs.max() + m + 1)
    sub = comp[y0:y1, x0:x1]
    region = _dilate(sub, _REGION_DILATE)  # include the soft (blurred) rim, where alpha is small but not zero
    alpha = np.clip((img[y0:y1, x0:x1] - bg) @ axis / norm2, 0.0, 1.0) * region
    area = float(alpha.sum())
    if area <= 0:
        return None
    gy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5  # pixel centres in canvas units, broadcast (h, 1)
    gx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5  # (1, w)
    mx, my = float((alpha * gx).sum() / area), float((alpha * gy).sum() / area)
    # Blur-invariant shape features (Gaussian blur adds to the 2nd cumulant only): the 4th cumulant along the axes over
    # the one along the diagonals (circle and triangle 1: their symmetry makes it isotropic; axis-aligned square 2)
    # and the 3rd cumulant of y over area^1.5 (up-pointing triangle -0.0169, circle and square 0).
    dx, dy = gx - mx, gy - my
    w = alpha / area
    u, v = (dx + dy) * math.sqrt(0.5), (dx - dy) * math.sqrt(0.5)
    k4_axis = _kappa4(w, dx) + _kappa4(w, dy)
    k4_diag = _kappa4(w, u) + _kappa4(w, v)
    rho = k4_axis / k4_diag if k4_diag < -1e-6 else 1.0
    skew = float((w * dy**3).sum()) / area**1.5
    feats = {s: math.hypot((rho - p[0]) / 0.35, (skew - p[1]) / 0.006) for s, p in SHAPE_FEATURES.items()}
    best = min(feats, key=feats.__getitem__)
    r_best = math.sqrt(area / AREA_K[best])
    center = (mx, my - 0.25 * r_best) if best == "triangle" else (mx, my)
    partial = int(((alpha > 0.1) & (alpha < 0.9)).sum())
    softness = partial / (PERIMETER_K[best] * r_best)
    return _Component(
        fill, _color_dist(fill, bg), area, int(comp.sum()), best, feats, center, softness, alpha, (gx, gy), (mx, my)
    )


def _object_scores(c: _Component, o: ShapeObject) -> dict[str, tuple[float, bool]]:
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


def _cleanliness(
    img: np.ndarray, bg: np.ndarray, mask: np.ndarray, matched: list[_Component], upscale: float
) -> float:
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
    img = _to_canvas(image)  # (64, 64, 3) float32
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
    labels, n = _label(mask)

    # 3. Components; only significant ones (alpha-mass >= MIN_OBJECT_AREA) can be objects.
    dist = np.sqrt(((img - bg) ** 2).sum(axis=-1))
    comps: list[_Component] = []
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        for lab in np.nonzero(sizes[1:] >= MIN_OBJECT_AREA / 2)[0] + 1:
            c = _component(img, bg, dist, labels == lab)
            if c is not None and c.area >= MIN_OBJECT_AREA:
                comps.append(c)
    comps.sort(key=lambda c: -c.area)

    # 4. Match prompt objects to components: the assignment with the highest total attribute score.
    objs = scene.objects
    candidates = comps[:4]
    table = [[_object_scores(c, o) for o in objs] for c in candidates]  # [component][object] -> attr -> (s, ok)
    per_obj: list[dict[str, tuple[float, bool]] | None] = [None] * len(objs)
    matched: list[_Component] = []
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
