"""Simulated raters: agree with the judge at noise 0, honour the tie and both-bad thresholds, follow the logistic
choice model at noise > 0, are reproducible per seed, and invert when adversarial.

    python -m pytest -q tests/test_shapes_rater.py
"""

import math
import random

import numpy as np
import pytest

from ncp.shapes.grammar import parse, random_scene
from ncp.shapes.judge import score
from ncp.shapes.rater import VOTES, SimulatedRater, judge_preference
from ncp.shapes.render import render


def _pairs(n: int = 40) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(prompt, left, right) pairs of graded quality: the right render, renders of other scenes, noisy renders."""
    rng = random.Random(4)
    nrng = np.random.default_rng(4)
    out = []
    for _ in range(n):
        scene = random_scene(rng, 0.4, None)
        candidates = [
            render(scene),
            render(random_scene(rng, 0.4, None)),
            np.clip(render(scene) + nrng.normal(0, rng.choice([6, 15, 30]), (64, 64, 3)), 0, 255).astype(np.uint8),
        ]
        a, b = rng.sample(candidates, 2)
        out.append((scene.prompt, a, b))
    return out


PAIRS = _pairs()


def test_noise_zero_agrees_with_the_judge() -> None:
    rater = SimulatedRater(noise=0.0, tie_margin=0.02, both_bad_below=0.3)
    decided = 0
    for prompt, left, right in PAIRS:
        winner, s_l, s_r = judge_preference(prompt, left, right)
        vote = rater.vote(prompt, left, right)
        if s_l < 0.3 and s_r < 0.3:
            assert vote == "both_bad"
        elif abs(s_l - s_r) < 0.02:
            assert vote == "tie"
        else:
            assert vote == winner, (prompt, s_l, s_r)
            decided += 1
    assert decided >= 30  # the pairs really test the direction, not only ties


def test_prefers_the_correct_render_over_a_wrong_one() -> None:
    prompt = "a large purple triangle at the bottom, black background"
    right_img = render(random_scene(random.Random(0), 0.0))  # some other scene
    good = render(parse(prompt))
    rater = SimulatedRater(noise=0.0)
    assert rater.vote(prompt, good, right_img) == "left"
    assert rater.vote(prompt, right_img, good) == "right"
    assert judge_preference(prompt, good, good) == ("tie", score(good, prompt).overall, score(good, prompt).overall)
    assert rater.vote(prompt, good, good.copy()) == "tie"


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (0.80, 0.79, "tie"),  # |diff| < margin
        (0.80, 0.781, "tie"),
        (0.80, 0.77, "left"),
        (0.50, 0.70, "right"),
        (0.20, 0.25, "both_bad"),  # both below 0.3
        (0.29, 0.10, "both_bad"),  # both bad wins over a clear difference
        (0.20, 0.35, "right"),  # one acceptable image -> a real preference
        (0.60, 0.60, "tie"),
    ],
)
def test_thresholds(left: float, right: float, expected: str) -> None:
    assert SimulatedRater(noise=0.0, tie_margin=0.02, both_bad_below=0.3).decide(left, right) == expected


def test_zero_thresholds_disable_ties_and_both_bad() -> None:
    rater = SimulatedRater(noise=0.0, tie_margin=0.0, both_bad_below=0.0)
    assert rater.decide(0.10, 0.1001) == "right"
    assert rater.decide(0.0, 0.0) == "tie"  # exactly equal is always a tie


def test_logistic_choice_frequency_matches_the_model() -> None:
    rater = SimulatedRater(noise=0.05, tie_margin=0.0, both_bad_below=0.0, seed=1)
    n = 4000
    left = sum(rater.decide(0.70, 0.65) == "left" for _ in range(n)) / n
    expected = 1 / (1 + math.exp(-0.05 / 0.05))  # sigmoid(1) = 0.731
    assert abs(left - expected) < 0.03, left
    # Larger differences are chosen more reliably; noise 1 is nearly a coin flip.
    big = sum(rater.decide(0.90, 0.60) == "left" for _ in range(n)) / n
    assert big > 0.99
    coin = SimulatedRater(noise=1.0, tie_margin=0.0, both_bad_below=0.0, seed=2)
    flip = sum(coin.decide(0.70, 0.65) == "left" for _ in range(n)) / n
    assert 0.46 < flip < 0.56


def test_seeded_raters_are_reproducible() -> None:
    a = SimulatedRater(noise=0.2, seed=9)
    b = SimulatedRater(noise=0.2, seed=9)
    c = SimulatedRater(noise=0.2, seed=10)
    rng = random.Random(0)
    scores = [(rng.uniform(0.3, 1), rng.uniform(0.3, 1)) for _ in range(200)]
    va = [a.decide(x, y) for x, y in scores]
    assert va == [b.decide(x, y) for x, y in scores]
    assert va != [c.decide(x, y) for x, y in scores]
    assert set(va) <= set(VOTES)


def test_adversarial_inverts_the_judge() -> None:
    honest = SimulatedRater(noise=0.0, tie_margin=0.02, both_bad_below=0.0)
    liar = SimulatedRater(noise=0.0, tie_margin=0.02, both_bad_below=0.0, adversarial=True)
    flipped = 0
    for prompt, left, right in PAIRS:
        h, a = honest.vote(prompt, left, right), liar.vote(prompt, left, right)
        if h == "tie":
            assert a == "tie"
        else:
            assert {h, a} == {"left", "right"}
            flipped += 1
    assert flipped >= 30
    # With the default both-bad threshold it also calls two good images "both bad" (scores inverted: 1 - overall).
    assert SimulatedRater(noise=0.0, adversarial=True).decide(0.95, 0.90) == "both_bad"
    assert SimulatedRater(noise=0.0, adversarial=True).decide(0.10, 0.20) == "left"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"noise": -0.1}, "noise"),
        ({"noise": float("nan")}, "noise"),
        ({"tie_margin": 1.5}, "tie_margin"),
        ({"both_bad_below": -1}, "both_bad_below"),
    ],
)
def test_config_is_validated(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SimulatedRater(**kwargs)


def test_decide_rejects_scores_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="left_score"):
        SimulatedRater().decide(1.2, 0.5)
    with pytest.raises(ValueError, match="tie_margin"):
        judge_preference("a small red circle on the left, white background", PAIRS[0][1], PAIRS[0][2], tie_margin=2)
