"""Simulated raters for the shapes world: votes left / right / tie / both_bad from the pixel judge's overall scores.

    from ncp.shapes.rater import SimulatedRater
    rater = SimulatedRater(noise=0.05, seed=7)
    rater.vote("a small red circle on the left, white background", left_image, right_image)  # -> "left"

Decision rule for judge scores (s_left, s_right), in this order:
1. both scores < `both_bad_below`                     -> "both_bad"
2. |s_left - s_right| < `tie_margin` (or exactly 0)   -> "tie"
3. otherwise "left" with probability sigmoid((s_left - s_right) / noise) (Bradley-Terry / logistic choice with
   temperature `noise`); noise = 0 is the deterministic argmax.
An adversarial rater scores with 1 - overall, so it prefers the image the judge likes less (and calls two good images
"both bad"): the abuse case that anomaly detection in the store must catch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from ncp.shapes.grammar import Scene
from ncp.shapes.judge import score

Vote = Literal["left", "right", "tie", "both_bad"]
VOTES: tuple[str, ...] = ("left", "right", "tie", "both_bad")


@dataclass
class SimulatedRater:
    """A seeded rater driven by the judge. Not thread-safe (it owns a random stream); use one per thread.

    noise: logistic temperature on the score difference (0 = always the better image).
    tie_margin: score differences below this are ties.
    both_bad_below: when both scores fall below this the vote is both_bad.
    seed: seed of the rater's own random stream (votes are reproducible given the call sequence).
    adversarial: invert the judge (score = 1 - overall).
    """

    noise: float = 0.05
    tie_margin: float = 0.02
    both_bad_below: float = 0.3
    seed: int = 0
    adversarial: bool = False
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.noise, int | float) and math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0 (0 = deterministic), got {self.noise!r}.")
        if not 0 <= self.tie_margin < 1:
            raise ValueError(f"tie_margin must lie in [0, 1) (0 = no ties), got {self.tie_margin!r}.")
        if not 0 <= self.both_bad_below <= 1:
            raise ValueError(f"both_bad_below must lie in [0, 1] (0 = never both_bad), got {self.both_bad_below!r}.")
        self._rng = random.Random(self.seed)

    def decide(self, left_score: float, right_score: float) -> Vote:
        """The vote for two judge overall scores in [0, 1] (see the module docstring for the rule)."""
        for name, value in (("left_score", left_score), ("right_score", right_score)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a judge score in [0, 1], got {value!r}.")
        if self.adversarial:
            left_score, right_score = 1.0 - left_score, 1.0 - right_score
        if left_score < self.both_bad_below and right_score < self.both_bad_below:
            return "both_bad"
        diff = left_score - right_score
        if abs(diff) < self.tie_margin or diff == 0:
            return "tie"
        if self.noise == 0:
            return "left" if diff > 0 else "right"
        p_left = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, diff / self.noise))))
        return "left" if self._rng.random() < p_left else "right"

    def vote(self, prompt: str | Scene, left_image: Any, right_image: Any) -> Vote:
        """Judge both images against the prompt and vote. Images: HxWx3 uint8 arrays or PIL images."""
        return self.decide(score(left_image, prompt).overall, score(right_image, prompt).overall)


def judge_preference(
    prompt: str | Scene, left_image: Any, right_image: Any, tie_margin: float = 0.0
) -> tuple[Literal["left", "right", "tie"], float, float]:
    """The judge's own deterministic preference and both overall scores: (winner, left_score, right_score).

    Used to label pairs offline (e.g. the preference probes) without a rater's noise or both_bad outcome."""
    if not 0 <= tie_margin < 1:
        raise ValueError(f"tie_margin must lie in [0, 1), got {tie_margin!r}.")
    s_l, s_r = score(left_image, prompt).overall, score(right_image, prompt).overall
    if abs(s_l - s_r) <= tie_margin:
        return "tie", s_l, s_r
    return ("left" if s_l > s_r else "right"), s_l, s_r
