"""Leaderboard statistics over adapter versions: Bradley-Terry ratings with bootstrap 95% intervals, win rates against
the base model, the win-rate matrix and the rating history.

Inputs are `Comparison`s (FeedbackStore.cross_version_comparisons(): usable cross_version votes; a tie scores 0.5 for
each side, both_bad is left out). Outputs are plain dataclasses and lists of dicts, ready for a UI table or plot.

Model (Bradley & Terry 1952; the Chatbot Arena leaderboard): P(a beats b) = sigmoid(theta_a - theta_b). We maximise
    sum_votes [ s_ab log sigmoid(theta_a - theta_b) + (1 - s_ab) log sigmoid(theta_b - theta_a) ] - (ridge / 2) |theta|^2
by Newton's method; s_ab = 1, 0.5 (tie) or 0. The small ridge keeps ratings finite when one version has won every
vote. Ratings are shown on the Elo scale, anchored at the base model: rating = 1000 + (400 / ln 10)(theta - theta_base).
Intervals: percentile bootstrap over votes (resampled with replacement, fixed seed, so the page is reproducible).

Run `python -m feedback_store.stats --db data/arena.duckdb` to print the leaderboard of a database.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from feedback_store.records import BASE_VERSION, Comparison

log = logging.getLogger(__name__)

ELO_SCALE = 400.0 / math.log(10.0)
ELO_ANCHOR = 1000.0


@dataclass(frozen=True)
class VersionRating:
    version: str
    rating: float  # Elo scale, base = 1000
    ci_low: float
    ci_high: float
    votes: int  # comparisons this version took part in
    wins: float  # ties count half
    win_rate_vs_base: float | None  # (wins + ties/2) / votes against "base"; None without such votes
    votes_vs_base: int
    preliminary: bool  # fewer than min_votes: shown, not ranked with confidence


@dataclass(frozen=True)
class Leaderboard:
    ratings: list[VersionRating]  # best first
    total_votes: int
    min_votes: int
    anchor: str  # the version held at 1000 (base when it was compared, else the mean of all)
    n_boot: int

    def rows(self) -> list[dict]:
        """One dict per version for a table (rank is None while preliminary)."""
        out, rank = [], 0
        for r in self.ratings:
            rank += 0 if r.preliminary else 1
            out.append({"rank": None if r.preliminary else rank, **r.__dict__})
        return out


def _index(comparisons: Sequence[Comparison]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    versions = sorted({c.version_a for c in comparisons} | {c.version_b for c in comparisons})
    pos = {v: i for i, v in enumerate(versions)}
    a = np.array([pos[c.version_a] for c in comparisons], dtype=np.int64)
    b = np.array([pos[c.version_b] for c in comparisons], dtype=np.int64)
    s = np.array([float(c.score_a) for c in comparisons], dtype=np.float64)
    return versions, a, b, s


def fit_bradley_terry(
    n_versions: int,
    a: np.ndarray,
    b: np.ndarray,
    s: np.ndarray,
    ridge: float = 1e-2,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Penalised maximum-likelihood BT strengths theta (natural-log scale, mean-free up to the ridge) by Newton.

    a, b: version indices of each vote; s: score of a (1, 0.5, 0); weights: vote multiplicities (bootstrap)."""
    w = np.ones_like(s) if weights is None else weights
    theta = np.zeros(n_versions)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(theta[a] - theta[b])))  # P(a beats b)
        r = w * (s - p)
        grad = np.bincount(a, r, n_versions) - np.bincount(b, r, n_versions) - ridge * theta
        h = w * p * (1.0 - p)
        hess = np.zeros((n_versions, n_versions))
        np.add.at(hess, (a, a), -h)
        np.add.at(hess, (b, b), -h)
        np.add.at(hess, (a, b), h)
        np.add.at(hess, (b, a), h)
        hess -= ridge * np.eye(n_versions)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta


def _elo(theta: np.ndarray, anchor: int | None) -> np.ndarray:
    ref = theta[anchor] if anchor is not None else theta.mean()
    return ELO_ANCHOR + ELO_SCALE * (theta - ref)


def leaderboard(
    comparisons: Sequence[Comparison],
    base: str = BASE_VERSION,
    min_votes: int = 30,
    n_boot: int = 200,
    seed: int = 0,
    ridge: float = 1e-2,
) -> Leaderboard:
    """BT ratings with 95% percentile-bootstrap intervals, win rates vs base and vote counts (module docstring)."""
    if min_votes < 0 or n_boot < 0:
        raise ValueError("min_votes and n_boot must be >= 0")
    if not comparisons:
        return Leaderboard([], 0, min_votes, base, n_boot)
    versions, a, b, s = _index(comparisons)
    k = len(versions)
    anchor = versions.index(base) if base in versions else None
    # Votes with the same (a, b, score) are interchangeable: fit on the distinct cells with counts as weights, and
    # bootstrap by drawing cell counts from a multinomial (the same as resampling votes with replacement).
    cells, counts = np.unique(np.stack([a, b, s]), axis=1, return_counts=True)
    ca, cb, cs = cells[0].astype(np.int64), cells[1].astype(np.int64), cells[2]
    elo = _elo(fit_bradley_terry(k, ca, cb, cs, ridge, counts.astype(np.float64)), anchor)
    lo, hi = elo.copy(), elo.copy()
    if n_boot:
        rng = np.random.default_rng(seed)
        boots = np.empty((n_boot, k))
        for i in range(n_boot):
            w = rng.multinomial(len(s), counts / len(s)).astype(np.float64)
            boots[i] = _elo(fit_bradley_terry(k, ca, cb, cs, ridge, w), anchor)
        lo, hi = np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)
    games = np.bincount(a, minlength=k) + np.bincount(b, minlength=k)
    wins = np.bincount(a, s, k) + np.bincount(b, 1.0 - s, k)
    out = []
    for i, v in enumerate(versions):
        # this version's scores in its votes against base (ties count half)
        vs_base = np.concatenate([s[(a == i) & (b == anchor)], 1.0 - s[(b == i) & (a == anchor)]])
        if anchor is None or i == anchor:
            vs_base = np.empty(0)
        out.append(
            VersionRating(
                version=v,
                rating=float(elo[i]),
                ci_low=float(lo[i]),
                ci_high=float(hi[i]),
                votes=int(games[i]),
                wins=float(wins[i]),
                win_rate_vs_base=float(vs_base.mean()) if vs_base.size else None,
                votes_vs_base=len(vs_base),
                preliminary=bool(games[i] < min_votes),
            )
        )
    out.sort(key=lambda r: (r.preliminary, -r.rating, r.version))
    return Leaderboard(out, len(s), min_votes, base if anchor is not None else "mean", n_boot)


def win_matrix(comparisons: Sequence[Comparison]) -> list[dict]:
    """Head-to-head counts per unordered version pair: {a, b, wins_a, ties, wins_b, votes, win_rate_a}."""
    cells: dict[tuple[str, str], list[float]] = {}
    for c in comparisons:
        x, y, sc = (c.version_a, c.version_b, c.score_a)
        if x > y:
            x, y, sc = y, x, 1.0 - sc
        cell = cells.setdefault((x, y), [0.0, 0.0, 0.0])
        cell[0 if sc == 1.0 else 2 if sc == 0.0 else 1] += 1
    return [
        {"a": x, "b": y, "wins_a": int(w), "ties": int(t), "wins_b": int(lost), "votes": int(w + t + lost)}
        | {"win_rate_a": (w + 0.5 * t) / (w + t + lost)}
        for (x, y), (w, t, lost) in sorted(cells.items())
    ]


def rating_history(
    comparisons: Sequence[Comparison], every: str | int = "day", base: str = BASE_VERSION, ridge: float = 1e-2
) -> list[dict]:
    """Ratings refitted on all votes up to the end of each bucket: every="hour", "day" or an int N (every N votes).
    Returns [{"until": datetime, "votes": n, "version": v, "rating": elo}] in time order (point estimates only)."""
    ordered = sorted(comparisons, key=lambda c: (c.created, c.vote_id))
    if not ordered:
        return []
    cut_points: list[int] = []  # exclusive end index of each bucket
    if isinstance(every, int) and not isinstance(every, bool):
        if every < 1:
            raise ValueError("every must be a positive number of votes, 'hour' or 'day'")
        cut_points = list(range(every, len(ordered), every)) + [len(ordered)]
    elif every in ("hour", "day"):
        fmt = "%Y%m%d%H" if every == "hour" else "%Y%m%d"
        for i in range(1, len(ordered)):
            if ordered[i].created.strftime(fmt) != ordered[i - 1].created.strftime(fmt):
                cut_points.append(i)
        cut_points.append(len(ordered))
    else:
        raise ValueError(f"every must be 'hour', 'day' or a positive int, got {every!r}")
    out = []
    for end in cut_points:
        part = ordered[:end]
        versions, a, b, s = _index(part)
        anchor = versions.index(base) if base in versions else None
        elo = _elo(fit_bradley_terry(len(versions), a, b, s, ridge), anchor)
        until = part[-1].created
        if every in ("hour", "day"):
            step = timedelta(hours=1) if every == "hour" else timedelta(days=1)
            until = until.replace(minute=0, second=0, microsecond=0) + step
            if every == "day":
                until = until.replace(hour=0)
        out += [{"until": until, "votes": end, "version": v, "rating": float(elo[i])} for i, v in enumerate(versions)]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    from feedback_store.store import FeedbackStore

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, help="the arena's DuckDB file (not while the app holds it)")
    ap.add_argument("--min-votes", type=int, default=30)
    args = ap.parse_args(argv)
    with FeedbackStore(args.db) as store:
        board = leaderboard(store.cross_version_comparisons(), min_votes=args.min_votes)
    print(f"{'rank':>4}  {'version':<24} {'rating':>7}  {'95% CI':>15}  {'votes':>6}  {'vs base':>7}")
    for r in board.rows():
        wr = "" if r["win_rate_vs_base"] is None else f"{r['win_rate_vs_base']:.0%}"
        ci = f"{r['ci_low']:.0f}..{r['ci_high']:.0f}"
        print(f"{r['rank'] or '-':>4}  {r['version']:<24} {r['rating']:7.0f}  {ci:>15}  {r['votes']:6d}  {wr:>7}")


if __name__ == "__main__":
    main()
