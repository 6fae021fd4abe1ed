"""The shapes-world grammar and renderer: exact prompt round trips, errors that name the offending word, the held-out
split, and renders that put the right colours where the geometry says.

    python -m pytest -q tests/test_shapes_grammar.py
"""

import itertools
import random

import numpy as np
import pytest

from ncp.shapes.grammar import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_COMBOS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
    PromptError,
    Scene,
    ShapeObject,
    all_single_scenes,
    parse,
    probe_prompts,
    random_scene,
)
from ncp.shapes.render import CENTERS, RADIUS, render


def test_world_is_at_least_as_large_as_the_issue_asks() -> None:
    assert len(COLORS) >= 6 and len(SHAPES) >= 3 and len(SIZES) >= 2 and len(POSITIONS) >= 5
    assert len(BACKGROUNDS) >= 3 and len(RELATIONS) >= 2


def test_round_trip_every_single_object_scene() -> None:
    scenes = all_single_scenes()
    assert len(scenes) == len(COLORS) * len(SHAPES) * len(SIZES) * len(POSITIONS) * len(BACKGROUNDS)
    assert len({s.prompt for s in scenes}) == len(scenes)
    for scene in scenes:
        assert parse(scene.prompt) == scene


def test_round_trip_every_two_object_scene() -> None:
    nouns = list(itertools.product(SIZES, COLORS, SHAPES))
    n = 0
    for rel, (p1, p2) in RELATIONS.items():
        for bg in BACKGROUNDS:
            for (z1, c1, s1), (z2, c2, s2) in itertools.product(nouns, nouns):
                scene = Scene((ShapeObject(c1, s1, z1, p1), ShapeObject(c2, s2, z2, p2)), bg, rel)
                assert parse(scene.prompt) == scene
                n += 1
    assert n == len(RELATIONS) * len(BACKGROUNDS) * len(nouns) ** 2


def test_random_scenes_round_trip_and_are_reproducible() -> None:
    ra, rb = random.Random(3), random.Random(3)
    a = [random_scene(ra, 0.5, None) for _ in range(20)]
    assert a == [random_scene(rb, 0.5, None) for _ in range(20)] and len(set(a)) > 15
    rng = random.Random(0)
    scenes = [random_scene(rng, 0.5, None) for _ in range(2000)]
    assert {len(s.objects) for s in scenes} == {1, 2}
    for s in scenes:
        assert parse(s.prompt) == s
        if len(s.objects) == 2:
            assert (s.objects[0].position, s.objects[1].position) == RELATIONS[s.relation]
            assert (s.objects[0].color, s.objects[0].shape) != (s.objects[1].color, s.objects[1].shape)


def test_parse_ignores_case_and_spacing() -> None:
    scene = parse("a small red circle left of a large blue square, white background")
    assert parse("  A Small RED circle LEFT of a large blue square ,white   background ") == scene


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        ("a large red hexagon on the left, gray background", "'hexagon'"),
        ("a large red circle on the left, pink background", "'pink'"),
        ("a huge red circle on the left, gray background", "'huge'"),
        ("a large red circle on the left, gray backdrop", "'backdrop'"),
    ],
)
def test_unknown_words_raise_prompt_error_naming_the_word(prompt: str, needle: str) -> None:
    with pytest.raises(PromptError, match=needle) as info:
        parse(prompt)
    assert "knows only" in str(info.value)  # the message lists the vocabulary, so the user can fix the prompt


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        ("a large red circle on the top, gray background", "at the top"),  # wrong preposition for the position
        ("a large red circle on the left gray background", "','"),  # missing comma
        ("a large red circle on the left, gray", "end of prompt"),  # truncated
        ("a large red circle on the left, gray background circle", "Unexpected 'circle'"),
        ("a red large circle on the left, gray background", "a size"),  # words out of order
        ("a large red circle left a blue square, gray background", "'of'"),
        ("", "'a'"),
    ],
)
def test_malformed_prompts_say_what_was_expected(prompt: str, needle: str) -> None:
    with pytest.raises(PromptError, match=needle):
        parse(prompt)


def test_non_string_prompt_is_rejected() -> None:
    with pytest.raises(PromptError, match="string"):
        parse(42)  # type: ignore[arg-type]


def test_prompt_error_is_a_value_error() -> None:
    assert issubclass(PromptError, ValueError)


def test_vocabulary_covers_every_generated_word() -> None:
    words = {w for s in all_single_scenes() for w in s.prompt.replace(",", " , ").split()}
    assert words <= set(VOCABULARY)


def test_held_out_split() -> None:
    assert HELD_OUT_COMBOS and all(c in COLORS and s in SHAPES for c, s in HELD_OUT_COMBOS)
    rng = random.Random(1)
    assert not any(random_scene(rng, 0.3, held_out=False).held_out for _ in range(500))
    assert all(random_scene(rng, 0.3, held_out=True).held_out for _ in range(200))
    held_in = probe_prompts(200, seed=0, held_out=False)
    held_out = probe_prompts(200, seed=0, held_out=True)
    assert held_in == probe_prompts(200, seed=0, held_out=False)  # fixed seeds -> fixed benchmark prompts
    assert len(set(held_in)) == 200 and not any(parse(p).held_out for p in held_in)
    assert all(parse(p).held_out for p in held_out)
    assert all(len(parse(p).objects) == 1 for p in held_in)
    two = probe_prompts(200, seed=0, two_object_prob=1.0)
    assert all(len(parse(p).objects) == 2 for p in two)


def test_render_puts_colours_where_the_geometry_says() -> None:
    for scene in all_single_scenes()[::7]:
        img = render(scene)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        o = scene.objects[0]
        assert tuple(img[0, 0]) == BACKGROUNDS[scene.background]
        cx, cy = CENTERS[o.position]
        # The triangle's centroid sits 0.25 r below its bounding-box centre; its bbox centre is still inside it.
        assert tuple(img[int(cy), int(cx)]) == COLORS[o.color]
        # The object stays within its circumradius of the centre: a pixel well outside is background.
        far = int(round(cx + RADIUS[o.size] + 3))
        assert tuple(img[int(cy), min(far, 63)]) == BACKGROUNDS[scene.background]


def test_render_scales_and_jitters() -> None:
    scene = parse("a large green square in the center, black background")
    big = render(scene, size=128)
    assert big.shape == (128, 128, 3)
    assert tuple(big[64, 64]) == COLORS["green"]
    a = render(scene, rng=random.Random(0), jitter=1.5)
    b = render(scene, rng=random.Random(1), jitter=1.5)
    assert not np.array_equal(a, b)
    assert np.array_equal(render(scene), render(scene))
