"""Bradley-Terry leaderboard: recovers a known ordering with covering 95% intervals on synthetic votes, counts ties
as half, ignores both_bad and unusable votes, flags preliminary versions, and tracks ratings over time."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import pytest
from store_fixtures import fast_images

from feedback_store import Comparison, FeedbackStore
from feedback_store.stats import ELO_SCALE, fit_bradley_terry, leaderboard, rating_history, win_matrix

TRUE = {"base": 0.0, "v1": 0.35, "v2": 0.7, "v3": 1.2}  # log-strengths
T0 = datetime(2030, 1, 1)


def simulate(n: int, seed: int, minutes_apart: float = 1.0) -> list[Comparison]:
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for i in range(n):
        x, y = rng.choice(len(names), 2, replace=False)
        a, b = names[x], names[y]
        p = 1.0 / (1.0 + math.exp(-(TRUE[a] - TRUE[b])))
        out.append(Comparison(i + 1, a, b, float(rng.random() < p), T0 + timedelta(minutes=minutes_apart * i)))
    return out


def true_elo(v: str) -> float:
    return 1000.0 + ELO_SCALE * (TRUE[v] - TRUE["base"])


def test_recovers_known_ordering_and_intervals_cover_the_truth() -> None:
    board = leaderboard(simulate(3000, seed=1), min_votes=30, n_boot=200, seed=0)
    assert [r.version for r in board.ratings] == ["v3", "v2", "v1", "base"]
    for r in board.ratings:
        assert r.ci_low <= true_elo(r.version) <= r.ci_high, (r, true_elo(r.version))
        assert not r.preliminary
    base = next(r for r in board.ratings if r.version == "base")
    assert (base.rating, base.ci_low, base.ci_high, board.anchor) == (1000.0, 1000.0, 1000.0, "base")
    assert [row["rank"] for row in board.rows()] == [1, 2, 3, 4]
    # deterministic: the same votes and seed give the same page
    assert leaderboard(simulate(3000, seed=1), n_boot=200, seed=0) == board


def test_interval_coverage_over_repeated_experiments() -> None:
    hits = total = 0
    for seed in range(20):
        board = leaderboard(simulate(800, seed=100 + seed), n_boot=100, seed=seed)
        for r in board.ratings:
            if r.version != "base":
                hits += r.ci_low <= true_elo(r.version) <= r.ci_high
                total += 1
    assert hits / total >= 0.85, f"95% intervals covered the truth in only {hits}/{total} cases"


def test_ties_count_half_and_win_rate_against_base() -> None:
    # v1 vs base: 6 wins, 2 ties, 2 losses -> score 7/10; the MLE satisfies sigmoid(d) = 0.7 (tiny ridge aside)
    comps = [Comparison(i, "v1", "base", s, T0) for i, s in enumerate([1.0] * 6 + [0.5] * 2 + [0.0] * 2)]
    board = leaderboard(comps, min_votes=5, n_boot=0, ridge=1e-6)
    v1 = board.ratings[0]
    assert v1.version == "v1" and v1.win_rate_vs_base == pytest.approx(0.7)
    assert v1.rating - 1000.0 == pytest.approx(ELO_SCALE * math.log(0.7 / 0.3), rel=1e-4)
    assert (v1.votes, v1.wins, v1.votes_vs_base) == (10, 7.0, 10)
    # the same result with sides swapped
    swapped = [Comparison(c.vote_id, c.version_b, c.version_a, 1.0 - c.score_a, T0) for c in comps]
    assert leaderboard(swapped, min_votes=5, n_boot=0, ridge=1e-6).ratings[0].rating == pytest.approx(v1.rating)
    assert win_matrix(comps) == [
        {"a": "base", "b": "v1", "wins_a": 2, "ties": 2, "wins_b": 6, "votes": 10, "win_rate_a": 0.3}
    ]


def test_preliminary_flag_and_a_perfect_record_stays_finite() -> None:
    comps = [Comparison(i, "v9", "base", 1.0, T0) for i in range(5)]
    board = leaderboard(comps, min_votes=30, n_boot=50)
    assert all(r.preliminary for r in board.ratings)
    assert all(row["rank"] is None for row in board.rows())
    assert all(math.isfinite(r.rating) and math.isfinite(r.ci_high) for r in board.ratings)
    assert leaderboard([], min_votes=30).ratings == []


def test_fit_matches_gradient_zero() -> None:
    comps = simulate(500, seed=7)
    names = sorted(TRUE)
    a = np.array([names.index(c.version_a) for c in comps])
    b = np.array([names.index(c.version_b) for c in comps])
    s = np.array([c.score_a for c in comps])
    theta = fit_bradley_terry(4, a, b, s, ridge=1e-2)
    p = 1 / (1 + np.exp(-(theta[a] - theta[b])))
    grad = np.bincount(a, s - p, 4) - np.bincount(b, s - p, 4) - 1e-2 * theta
    assert np.abs(grad).max() < 1e-8


def test_rating_history_buckets() -> None:
    comps = simulate(600, seed=3, minutes_apart=10.0)  # 600 votes over ~4.2 days
    daily = rating_history(comps, "day")
    days = sorted({row["until"] for row in daily})
    assert len(days) == 5 and all(d.hour == 0 and d.minute == 0 for d in days)
    assert [max(r["votes"] for r in daily if r["until"] == d) for d in days][-1] == 600
    by_n = rating_history(comps, 200)
    assert sorted({r["votes"] for r in by_n}) == [200, 400, 600]
    final = {r["version"]: r["rating"] for r in by_n if r["votes"] == 600}
    assert max(final, key=final.get) == "v3" and final["base"] == 1000.0
    assert len(rating_history(comps, "hour")) > len(daily)
    with pytest.raises(ValueError):
        rating_history(comps, "week")


def test_store_comparisons_use_only_usable_cross_version_votes(tmp_path) -> None:
    with FeedbackStore(tmp_path / "s.duckdb") as store:
        pid = store.add_prompt("a purple star")
        img = fast_images(store, pid, ("base", "v1"))
        img2 = fast_images(store, pid, ("base",))  # a second base image for an on_policy pair
        for r in ("r_a", "r_b"):
            store.ensure_rater(r)

        def vote(outcome: str, rater: str = "r_a", kind: str = "cross_version") -> int:
            right = img["v1"] if kind == "cross_version" else img2["base"]
            pair = store.issue_pair(pid, img["base"], right, kind, "s1")
            return store.record_vote(pair.token, "s1", outcome, rater).vote_id

        vote("right")
        vote("tie")
        vote("both_bad")  # says nothing about the order
        vote("left", kind="on_policy")  # same version on both sides
        flagged = vote("left")
        store.flag_vote(flagged, "anomalous_rater")
        vote("left", rater="r_b")
        store.set_rater_status("r_b", "shadow_excluded")
        comps = store.cross_version_comparisons()
        assert [(c.version_a, c.version_b, c.score_a) for c in comps] == [("base", "v1", 0.0), ("base", "v1", 0.5)]
        board = leaderboard(comps, min_votes=1, n_boot=0)
        assert board.ratings[0].version == "v1" and board.ratings[0].win_rate_vs_base == 0.75


def test_stats_cli_prints_the_leaderboard(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from store_fixtures import root

    with FeedbackStore(tmp_path / "cli.duckdb") as store:
        pid = store.add_prompt("an orange hexagon")
        img = fast_images(store, pid, ("base", "v1"))
        store.ensure_rater("r_a")
        for outcome in ("right", "right", "left"):
            pair = store.issue_pair(pid, img["base"], img["v1"], "cross_version", "s1")
            store.record_vote(pair.token, "s1", outcome, "r_a")
    env = dict(os.environ, PYTHONPATH=str(root()))
    cmd = [sys.executable, "-m", "feedback_store.stats", "--db", str(tmp_path / "cli.duckdb"), "--min-votes", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.splitlines()
    assert out[1].split()[:2] == ["1", "v1"] and out[2].split()[:3] == ["2", "base", "1000"]
