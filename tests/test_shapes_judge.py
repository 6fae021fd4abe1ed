"""The pixel judge: >= 98% attribute accuracy on renders and on perturbed renders, wrong prompts detected attribute by
attribute, graded scores that move the right way, and input handling.

    python -m pytest -q tests/test_shapes_judge.py
"""

import dataclasses
import functools
import io
import random
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from ncp.shapes.grammar import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    PromptError,
    Scene,
    all_single_scenes,
    parse,
    random_scene,
)
from ncp.shapes.judge import ATTRIBUTES, JudgeScore, score
from ncp.shapes.render import render

SINGLES = all_single_scenes()
_RNG = random.Random(11)
TWO = [random_scene(_RNG, 1.0, None) for _ in range(300)]


@functools.cache
def clean_render(scene: Scene, size: int = 64) -> np.ndarray:
    img = render(scene, size=size)
    img.flags.writeable = False  # shared between tests
    return img


# Perturbations (each deterministic).
def noise(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, times: int = 2) -> np.ndarray:
    """[1 2 1]/4 binomial blur, applied `times` times (twice ~ a Gaussian of sigma 1 px)."""
    out = img.astype(np.float32)
    for _ in range(times):
        p = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")
        k = (0.25, 0.5, 0.25)
        out = sum(k[i] * k[j] * p[i : i + img.shape[0], j : j + img.shape[1]] for i in range(3) for j in range(3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    n = img.shape[0]
    ys, xs = np.clip(np.arange(n) - dy, 0, n - 1), np.clip(np.arange(n) - dx, 0, n - 1)
    return img[ys][:, xs]


def jpeg(img: np.ndarray, quality: int, subsampling: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(buf).convert("RGB"))


PERTURBATIONS = {
    "clean": lambda img, k: img,
    "noise_sigma8": lambda img, k: noise(img, 8.0, seed=k),
    "blur_sigma1": lambda img, k: blur(img, 2),
    "shift_1_2px": lambda img, k: shift(img, *[(1, 2), (-2, 1), (2, -1), (-1, -2)][k % 4]),
    "jpeg_q60_444": lambda img, k: jpeg(img, 60, 0),
    "jpeg_q85_420": lambda img, k: jpeg(img, 85, 2),
}


def accuracy(scenes: list[Scene], perturb, jitter: float = 0.0) -> dict[str, float]:
    rng = random.Random(5)
    wrong: Counter[str] = Counter()
    for k, scene in enumerate(scenes):
        img = render(scene, rng=rng, jitter=jitter) if jitter else clean_render(scene)
        result = score(perturb(img, k), scene)
        wrong.update(a for a, ok in result.attributes_correct.items() if not ok)
    return {a: 1 - wrong[a] / len(scenes) for a in ATTRIBUTES}


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_attribute_accuracy_on_single_object_renders(name: str) -> None:
    acc = accuracy(SINGLES, PERTURBATIONS[name])
    assert min(acc.values()) >= 0.98, acc


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_attribute_accuracy_on_two_object_renders(name: str) -> None:
    acc = accuracy(TWO, PERTURBATIONS[name])
    assert min(acc.values()) >= 0.98, acc


@pytest.mark.parametrize("name", ["clean", "noise_sigma8", "blur_half", "shift_1px"])
def test_attribute_accuracy_at_32px(name: str) -> None:
    # 32x32 is the shapes model's output size: small objects are only ~7 px wide there.
    perturb = {
        "clean": lambda img: img,
        "noise_sigma8": lambda img: noise(img, 8.0),
        "blur_half": lambda img: blur(img, 1),  # sigma ~0.7 px at 32 px = 1.4 canvas px
        "shift_1px": lambda img: shift(img, 1, -1),
    }[name]
    wrong: Counter[str] = Counter()
    scenes = SINGLES[::2] + TWO[:100]
    for scene in scenes:
        wrong.update(
            a for a, ok in score(perturb(clean_render(scene, 32)), scene).attributes_correct.items() if not ok
        )
    assert all(wrong[a] / len(scenes) <= 0.02 for a in ATTRIBUTES), wrong


def test_attribute_accuracy_on_jittered_renders() -> None:
    # The pretraining distribution: positions +-1.5 px, radii +-8%.
    acc = accuracy(SINGLES[::3] + TWO[:60], PERTURBATIONS["clean"], jitter=1.5)
    assert min(acc.values()) >= 0.98, acc


def test_clean_renders_score_near_one() -> None:
    for scene in SINGLES[::5] + TWO[:40]:
        s = score(clean_render(scene), scene)
        assert s.all_correct and s.overall > 0.99 and s.cleanliness > 0.99, (scene.prompt, s)
        assert s.objects_found == len(scene.objects)


def _variants(scene: Scene) -> dict[str, list[Scene]]:
    """Prompts that differ from `scene` in exactly one attribute (single-object scenes)."""
    o = scene.objects[0]

    def obj(**kw: str) -> Scene:
        return dataclasses.replace(scene, objects=(dataclasses.replace(o, **kw),))

    return {
        "color": [obj(color=c) for c in COLORS if c != o.color],
        "shape": [obj(shape=s) for s in SHAPES if s != o.shape],
        "size": [obj(size=z) for z in SIZES if z != o.size],
        "position": [obj(position=p) for p in POSITIONS if p != o.position],
        "background": [dataclasses.replace(scene, background=b) for b in BACKGROUNDS if b != scene.background],
    }


def test_each_wrong_attribute_is_detected_and_only_that_one() -> None:
    for scene in SINGLES[::9]:  # stride 9 visits every background, colour, shape, size and position
        img = clean_render(scene)
        right = score(img, scene).overall
        for attr, prompts in _variants(scene).items():
            for wrong_prompt in prompts:
                s = score(img, wrong_prompt)
                assert not s.attributes_correct[attr], (scene.prompt, wrong_prompt.prompt)
                others = {a: ok for a, ok in s.attributes_correct.items() if a != attr}
                assert all(others.values()), (scene.prompt, wrong_prompt.prompt, others)
                assert getattr(s, attr) <= 0.5
                assert s.overall < right - 0.05


def test_two_object_errors_are_detected() -> None:
    scene = parse("a small red circle left of a large blue square, white background")
    img = clean_render(scene)
    assert score(img, scene).all_correct
    swapped = score(img, "a large blue square left of a small red circle, white background")
    # Matching by best total score reads swapped objects as wrong positions, not as wrong colours and shapes.
    assert swapped.attributes_correct == {**swapped.attributes_correct, "position": False, "color": True}
    assert swapped.attributes_correct["shape"] and swapped.attributes_correct["size"]
    second_colour = score(img, "a small red circle left of a large green square, white background")
    assert not second_colour.attributes_correct["color"] and second_colour.attributes_correct["shape"]
    assert 0.4 < second_colour.color < 0.8  # one of two objects wrong: graded, not all-or-nothing
    # Object count: one object drawn for a two-object prompt and the other way round.
    single = render(parse("a small red circle on the left, white background"))
    missing = score(single, scene)
    assert not missing.attributes_correct["count"] and missing.count == 0.5
    extra = score(img, "a small red circle on the left, white background")
    assert not extra.attributes_correct["count"] and extra.attributes_correct["color"]
    empty = score(np.full((64, 64, 3), 245, np.uint8), scene)
    assert empty.objects_found == 0 and empty.shape == 0.0 and empty.overall < 0.5


def test_position_score_is_graded_with_displacement() -> None:
    scene = parse("a large red circle on the left, gray background")
    img = clean_render(scene)
    scores = [score(shift(img, 0, d), scene).position for d in (0, 3, 5, 7, 10)]
    assert scores[0] == 1.0 and all(a > b for a, b in zip(scores[1:], scores[2:], strict=False))
    assert scores[2] > 0.5 > scores[-1]


def test_cleanliness_drops_with_noise_blur_and_stray_pixels() -> None:
    scenes = SINGLES[::27]

    def mean_clean(f) -> float:
        return float(np.mean([score(f(clean_render(s)), s).cleanliness for s in scenes]))

    by_sigma = [mean_clean(lambda im, s=s: noise(im, s)) for s in (0, 3, 6, 12, 24)]
    assert by_sigma[0] > 0.99 and all(a > b for a, b in zip(by_sigma, by_sigma[1:], strict=False)), by_sigma
    by_blur = [mean_clean(lambda im, t=t: blur(im, t)) for t in (0, 1, 3)]
    assert all(a > b for a, b in zip(by_blur, by_blur[1:], strict=False)), by_blur
    scene = parse("a small blue triangle in the center, white background")
    img = clean_render(scene)
    dirty = img.copy()
    for x in (6, 20, 40, 54):
        dirty[52:54, x : x + 2] = COLORS["orange"]  # four 2x2 specks: stray pixels, too small to be objects
    s_clean, s_dirty = score(img, scene), score(dirty, scene)
    assert s_dirty.all_correct and s_dirty.objects_found == 1
    assert s_dirty.cleanliness < s_clean.cleanliness - 0.05 and s_dirty.overall < s_clean.overall


def test_cleaner_image_of_the_same_prompt_is_preferred() -> None:
    for scene in SINGLES[::45] + TWO[:10]:
        img = clean_render(scene)
        assert score(img, scene).overall > score(noise(img, 10), scene).overall > score(noise(img, 25), scene).overall


def test_accepts_pil_images_and_other_sizes() -> None:
    for scene in SINGLES[::90] + TWO[:3]:
        ref = score(clean_render(scene), scene)
        for size in (48, 100, 128):
            s = score(render(scene, size=size), scene)
            assert s.attributes_correct == ref.attributes_correct and abs(s.overall - ref.overall) < 0.05, size
        s = score(Image.fromarray(render(scene, size=128)), scene.prompt)
        assert s.all_correct


def test_deterministic() -> None:
    img = noise(clean_render(TWO[0]), 10)
    assert score(img, TWO[0]) == score(img.copy(), TWO[0].prompt)


def test_rejects_bad_inputs_with_clear_errors() -> None:
    img = clean_render(SINGLES[0])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        score(img.astype(np.float32), SINGLES[0])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        score(img[..., 0], SINGLES[0])
    with pytest.raises(ValueError, match="at least 32x32"):
        score(img[:20, :20], SINGLES[0])
    with pytest.raises(TypeError, match="numpy array or a PIL image"):
        score([[0]], SINGLES[0])
    with pytest.raises(PromptError, match="'dog'"):
        score(img, "a large red dog on the left, gray background")
    with pytest.raises(ValueError, match="overall"):
        JudgeScore(1, 1, 1, 1, 1, 1, cleanliness=1, overall=1.5, attributes_correct={}, objects_found=1)


def test_fast_enough() -> None:
    data = [(clean_render(s), s) for s in SINGLES[::20] + TWO[:30]]
    times = []
    for img, scene in data:
        best = float("inf")
        for _ in range(3):  # best of three: the machine is shared with other processes
            t0 = time.perf_counter()
            score(img, scene)
            best = min(best, time.perf_counter() - t0)
        times.append(best)
    assert float(np.median(times)) < 0.005, f"median {np.median(times) * 1000:.2f} ms per 64x64 image"
