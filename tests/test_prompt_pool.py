"""jobs.prompts.PromptPool draws by category (uniformly, or by weights) and the shapes world's pool: prompt-disjoint
from the evaluator's probes, drawn at the probe set's two-object share."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from jobs.prompts import PoolPrompt, PromptPool
from jobs.runtime import SHAPES_TWO_OBJECT_SHARE, shapes_pool
from ncp.evaluate import PROBE_SEED
from ncp.shapes.grammar import probe_prompts


def _shares(pool: PromptPool, n: int = 20000) -> dict[str, float]:
    rng = random.Random(0)
    counts = Counter(pool.category(pool.draw(rng)) for _ in range(n))
    return {c: k / n for c, k in counts.items()}


def test_categories_are_drawn_uniformly_unless_weighted() -> None:
    prompts = [PoolPrompt(f"a{i}", "a") for i in range(9)] + [PoolPrompt("b0", "b")]
    assert _shares(PromptPool(prompts))["b"] == pytest.approx(0.5, abs=0.02)  # by category, not by prompt
    assert _shares(PromptPool(prompts, weights={"a": 3, "b": 1}))["b"] == pytest.approx(0.25, abs=0.02)
    assert set(_shares(PromptPool(prompts, weights={"a": 1}))) == {"a"}  # a category without weight is never drawn
    for bad in ({"c": 1.0}, {"a": -1.0}, {"a": 0.0, "b": 0.0}):
        with pytest.raises(ValueError, match="Category weights"):
            PromptPool(prompts, weights=bad)


def test_shapes_pool_matches_the_probe_mix_and_never_holds_a_probe() -> None:
    pool = shapes_pool(seed=1)
    assert _shares(pool)["two objects"] == pytest.approx(SHAPES_TWO_OBJECT_SHARE, abs=0.02)
    texts = [t for texts in pool.by_category.values() for t in texts]
    assert len(texts) == len(set(texts)) > 1000  # distinct prompts, far more than a round's votes see twice
    assert not set(texts) & set(probe_prompts(256, seed=PROBE_SEED, two_object_prob=0.3))
