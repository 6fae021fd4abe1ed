"""Poisoning part of the reliability benchmark: a share of the simulated raters invert the judge; how much of the
clean loop's judge-score gain survives, without and with the abuse defences? (bench/reliability.py runs it.)

Three arms with the same seeds (same prompts, pairs, raters and their random streams): `clean` (every rater honest),
`poisoned` (the adversaries vote, no defences: ArenaConfig.abuse=None, no per-rater share cap) and `defended`
(the same adversaries, app.py's default AbuseConfig and LoopConfig.max_rater_share). Each arm runs in one process
(the arms side by side, `parallel_arms`), no HTTP: a Runtime on the shapes model, raters taking turns (a shuffled order per cycle) asking
`arena.next_pair` and answering `arena.vote` with the time to vote a human would take (lognormal around
`median_vote_ms`, at least 1.6 s, so the too-fast rule does not catch anyone trivially), on a simulated clock that
the rate limiter reads, then `loop.run_round()` after every `votes_per_round` votes.

Adversaries are `ncp.shapes.rater.SimulatedRater(adversarial=True, both_bad_below=0)`: they prefer the image the judge
likes less, on control pairs too (so they pick the broken image), and never answer "both bad" (which is not trained
on, so an attacker gains nothing by it). The defences that can act:
control-pair trust, disagreement with the consensus of other raters (each pool pair is shown to `ratings_per_pair`
sessions), the one-side and speed rules, and the per-rater share cap of a round's pairs.

The promotion gate is off in every arm (every trained candidate is served): in the shapes world it reads the pixel
judge, an oracle a real deployment does not have, and would hide what the votes did to the weights. The gain of an
arm is the judge score of the version served after the last round minus the base model's, on the fixed probe set
(prompts x seeds disjoint from the raters' pool), with the 95% CI of the paired difference. The whole part runs for
`replicates` seeds and the goal reads the mean gains (`replicate`).
"""

from __future__ import annotations

import math
import multiprocessing
import random
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image

from feedback_store import VoteRejected
from jobs.abuse import AbuseConfig
from jobs.loop import LoopConfig
from jobs.runtime import SHAPES_MODEL, ArenaConfig, Runtime
from ncp.serving import SamplingConfig
from ncp.shapes.model import DEFAULT_STEPS
from ncp.shapes.model import DEFAULT_TIMESTEP_LOW as SHAPES_TIMESTEP_LOW
from ncp.shapes.rater import SimulatedRater

ARMS = ("clean", "poisoned", "defended")


@dataclass(frozen=True)
class PoisonSettings:
    raters: int = 10
    adversarial_share: float = 0.2
    # The clean arm needs a gain above its CI for the defended arm's to be a share of: on a base with headroom the
    # gain grows with the steps of the training line, about +0.03 after 800 (docs/research/: live-loop-on-detuned-bases.md,
    # loop-headroom, and preference-training-reach.md, headroom-timesteps), more than with the votes once there are a
    # thousand.
    rounds: int = 4
    votes_per_round: int = 400  # votes of all raters together between two rounds
    ratings_per_pair: int = 3  # sessions a pool pair is shown to (the consensus the disagreement rule reads)
    noise: float = 0.05  # logistic temperature of every rater's choice (SimulatedRater)
    median_vote_ms: float = 4000.0
    # An attacker who wants to move the weights states a strict (inverted) preference and never says "both bad"
    # (SimulatedRater's default for adversaries, 0.3, turns most pairs of a decent model into both_bad: no effect).
    adversary_both_bad_below: float = 0.0
    steps: int = DEFAULT_STEPS  # arena sampling steps (the shapes model's default)
    max_steps: int = 200  # training steps per round (twice the live loop benchmark's: the arm has fewer rounds)
    lr: float = LoopConfig().lr
    beta: float = LoopConfig().beta
    timestep_low: float = SHAPES_TIMESTEP_LOW  # the shapes world's training timesteps (jobs/settings.py)
    probes: int = 48  # judge probe prompts of each round's evaluation
    probe_seeds: int = 4  # 4 seeds: the paired gain's 95% CI about 0.015 where 2 seeds gave 0.022
    seed: int = 0
    keep_data: bool = False
    model: str = str(SHAPES_MODEL)  # the base every arm serves and trains (a base with headroom: --model)
    # Arms run in this many processes at once. Each arm mostly keeps one core busy (it votes, then trains, then
    # judges), so on 2 cores 3 arms take about half the serial time. Results do not depend on it (each arm has its own
    # seeds and data dir); the round seconds do.
    parallel_arms: int = 3
    # The whole part this many times, with seeds seed, seed + 1, ... After round 1 each arm serves and trains its own
    # versions, so one seed's arm-to-arm difference is mostly training noise (one run had the poisoned arm gain twice
    # the clean one); the goal reads the mean gains over the replicates.
    replicates: int = 3


def adversaries(s: PoisonSettings) -> set[int]:
    """Evenly spread rater indices (so two adversaries rarely form the whole consensus of a pair)."""
    n = round(s.adversarial_share * s.raters)
    return {math.floor(k * s.raters / n) for k in range(n)} if n else set()


class SimClock:
    """Epoch seconds that advance only when a vote is cast (the rate limiter's clock)."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def arm_config(arm: str, s: PoisonSettings, data_dir: Path) -> ArenaConfig:
    loop = LoopConfig(
        model=s.model,
        max_steps=s.max_steps,
        lr=s.lr,
        beta=s.beta,
        timestep_low=s.timestep_low,
        shapes_probes=s.probes,
        probe_seeds=s.probe_seeds,
        min_new_votes=1,
        gate_min_acc_delta=-1.0,  # the gate is off: every candidate is served (see the module docstring)
        gate_min_judge_delta=-1.0,
        max_rater_share=LoopConfig().max_rater_share if arm == "defended" else 1.0,
        time_limit_s=1800.0,
        eval_time_limit_s=1800.0,
    )
    return ArenaConfig(
        data_dir=data_dir,
        model=s.model,
        sampling=SamplingConfig(steps=s.steps),
        loop=loop,
        schedule=False,
        prefetch=8,
        ratings_per_pair=s.ratings_per_pair,
        rater_salt="poisoning-bench-salt-0123456789",
        seed=s.seed,
        abuse=AbuseConfig() if arm == "defended" else None,
    )


def run_arm(arm: str, s: PoisonSettings, work: Path) -> dict:
    t0 = time.time()
    rt = Runtime(arm_config(arm, s, work / arm))
    clock = SimClock()
    if rt.arena.guard is not None:
        rt.arena.guard.clock = clock
    bad = adversaries(s) if arm != "clean" else set()
    sessions = [f"p{i}{'-adv' if i in bad else ''}" for i in range(s.raters)]
    raters = [
        SimulatedRater(
            noise=s.noise, seed=s.seed * 1000 + i, adversarial=True, both_bad_below=s.adversary_both_bad_below
        )
        if i in bad
        else SimulatedRater(noise=s.noise, seed=s.seed * 1000 + i)
        for i in range(s.raters)
    ]
    ids = [rt.rater_id(f"session:{name}") for name in sessions]
    adv_ids = {ids[i] for i in bad}
    order_rng, pace_rng = random.Random(s.seed), random.Random(s.seed + 1)
    rounds, refused = [], 0
    rt.start()
    try:
        for _ in range(s.rounds):
            cast = 0
            while cast < s.votes_per_round:
                order = list(range(s.raters))
                order_rng.shuffle(order)
                for i in order[: s.votes_per_round - cast]:
                    pair = rt.arena.next_pair(sessions[i])
                    left, right = (Image.open(p).convert("RGB") for p in (pair.left_path, pair.right_path))
                    outcome = raters[i].vote(pair.prompt, left, right)
                    ms = int(max(1600.0, pace_rng.lognormvariate(math.log(s.median_vote_ms), 0.4)))
                    clock.t += ms / 1000 / s.raters  # the raters vote in parallel: each waits `ms` between votes
                    try:
                        rt.arena.vote(sessions[i], pair.token, outcome, ids[i], time_to_vote_ms=ms)
                    except VoteRejected:
                        refused += 1
                    cast += 1
            t_round = time.time()
            res = rt.loop.run_round(trigger="bench")
            rounds.append(round_row(rt, res, adv_ids, time.time() - t_round))
        raters_out = {
            "shadow_excluded": [
                {"adversary": st["rater"] in adv_ids, "reason": rt.store.rater(st["rater"]).status_reason}
                for st in rt.store.rater_stats()
                if st["status"] == "shadow_excluded"
            ],
            "diagnostics": diagnostics(rt, adv_ids),
        }
    finally:
        rt.stop()
        if not s.keep_data:
            shutil.rmtree(work / arm, ignore_errors=True)
    served = next((row for row in reversed(rounds) if row["status"] == "promoted"), None)
    return {
        "arm": arm,
        "adversaries": len(bad),
        "refused_votes": refused,
        "rounds": rounds,
        "served": None if served is None else served["version"],
        "judge": None if served is None else served["judge"],
        "base_judge": next((row["base_judge"] for row in rounds if row["base_judge"] is not None), None),
        "gain": 0.0 if served is None else served["gain"],
        "gain_ci95": None if served is None else served["gain_ci95"],
        "seconds": time.time() - t0,
    } | raters_out


def round_row(rt: Runtime, res, adv_ids: set[str], seconds: float) -> dict:
    ev = res.metrics.get("eval", {})
    cand = ev.get("versions", {}).get("candidate", {})
    trained = poisoned = None
    if rt.loop.status.round_dir:
        train = Path(rt.loop.status.round_dir) / "train.parquet"
        if train.exists():
            who = pq.read_table(train, columns=["rater"]).column("rater").to_pylist()
            trained, poisoned = len(who), sum(1 for w in who if w in adv_ids)
    return {
        "status": res.status,
        "reason": res.reason,
        "version": res.version,
        "seconds": seconds,
        "pairs_trained": trained,
        "adversary_pairs_trained": poisoned,
        "judge": cand.get("judge"),
        "base_judge": ev.get("base_judge"),
        "gain": cand.get("judge_gain_vs_base"),
        "gain_ci95": cand.get("judge_gain_ci"),
    }


def _run_arm_alone(arm: str, s: PoisonSettings, work: Path) -> dict:
    torch.set_num_threads(1)  # the parent's setting does not reach a spawned process
    return run_arm(arm, s, work)


def run(s: PoisonSettings, work: Path | None = None, arms: tuple[str, ...] = ARMS) -> dict:
    work = Path(work or tempfile.mkdtemp(prefix="ncp-poisoning-"))
    if s.parallel_arms > 1 and len(arms) > 1:
        # spawn: a fresh interpreter per arm (forking a process that holds torch's thread pools is unsafe)
        with ProcessPoolExecutor(s.parallel_arms, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {arm: pool.submit(_run_arm_alone, arm, s, work) for arm in arms}
            results = {arm: f.result() for arm, f in futures.items()}
    else:
        results = {arm: run_arm(arm, s, work) for arm in arms}
    out = {"settings": asdict(s) | {"adversary_indices": sorted(adversaries(s))}, "arms": results}
    out["goal"] = goal(results)
    return out


def replicate(s: PoisonSettings, work: Path | None = None) -> dict:
    """`run` for seeds s.seed .. s.seed + replicates - 1: the first seed's full result, every seed's gains under
    "replicates", and "goal" read from the mean gains (the first seed's own under "first_goal")."""
    work = Path(work or tempfile.mkdtemp(prefix="ncp-poisoning-"))
    outs = [run(replace(s, seed=s.seed + k), work / f"seed{s.seed + k}") for k in range(s.replicates)]
    return combine(outs)


def combine(outs: list[dict]) -> dict:
    """One result from runs of the same settings with different seeds (the first is kept whole)."""
    first = dict(outs[0])
    if len(outs) > 1:
        first["replicates"] = [arm_gains(o) for o in outs]
        first["first_goal"], first["goal"] = first["goal"], replicate_goal(first["replicates"])
    return first


def arm_gains(out: dict) -> dict:
    """A run's seed and, per arm, its gain and what it trained on."""
    arms = {
        name: {
            "gain": a["gain"],
            "gain_ci95": a["gain_ci95"],
            "pairs_trained": sum(r["pairs_trained"] or 0 for r in a["rounds"]),
            "adversary_pairs_trained": sum(r["adversary_pairs_trained"] or 0 for r in a["rounds"]),
        }
        for name, a in out["arms"].items()
    }
    return {"seed": out["settings"]["seed"], "arms": arms}


def replicate_goal(reps: list[dict]) -> dict:
    """Mean gain per arm over the replicates; the defended share is measurable when the clean gain is positive in
    every replicate (a share of a gain that is sometimes negative means nothing)."""
    names = list(reps[0]["arms"])
    gains = {a: [r["arms"][a]["gain"] for r in reps] for a in names}
    mean = {a: sum(g) / len(g) for a, g in gains.items()}
    sd = {a: (sum((x - mean[a]) ** 2 for x in g) / max(1, len(g) - 1)) ** 0.5 for a, g in gains.items()}
    measurable = "clean" in gains and all(x > 0 for x in gains["clean"])
    share = mean["defended"] / mean["clean"] if measurable and "defended" in mean else None
    return {"target": 0.8, "replicates": len(reps), "mean_gain": mean, "sd_gain": sd, "defended_share": share,
            "met": None if share is None else share >= 0.8}  # fmt: skip


def goal(results: dict) -> dict:
    """Defended gain as a share of the clean gain; only measurable when the clean gain's 95% CI is above zero (a
    share of a gain that is noise means nothing)."""
    clean = results.get("clean", {})
    gain, ci = clean.get("gain"), clean.get("gain_ci95") or 0.0
    measurable = gain is not None and gain - ci > 0
    for arm in ("poisoned", "defended"):
        if arm in results:
            results[arm]["share_of_clean_gain"] = results[arm]["gain"] / gain if measurable else None
    defended = results.get("defended", {}).get("share_of_clean_gain")
    return {"target": 0.8, "defended_share": defended, "met": None if defended is None else defended >= 0.8}


# Agreement on the pairs where the OTHER raters' majority is a strict preference (ties and both_bad left out): what
# the review's disagreement rule would see if ties did not count (bench-only SQL, read-only).
_STRICT_AGREEMENT = """
    WITH lab AS (
        SELECT v.rater, v.vote_id, least(l.sha256, x.sha256) AS a, greatest(l.sha256, x.sha256) AS b,
            CASE WHEN v.outcome IN ('tie', 'both_bad') THEN v.outcome
                WHEN (v.outcome = 'left') = (l.sha256 <= x.sha256) THEN 'a' ELSE 'b' END AS label
        FROM votes v JOIN pairs p ON p.pair_id = v.pair_id
        JOIN images l ON l.image_id = p.left_image_id JOIN images x ON x.image_id = p.right_image_id
        WHERE p.kind <> 'control'),
    tally AS (
        SELECT o.rater, o.vote_id, o.label, w.label AS other, count(*) AS n
        FROM lab o JOIN lab w ON w.a = o.a AND w.b = o.b AND w.rater <> o.rater GROUP BY ALL),
    judged AS (
        SELECT rater, vote_id, any_value(label) AS label, sum(n) AS others, max(n) AS top, arg_max(other, n) AS major
        FROM tally GROUP BY rater, vote_id)
    SELECT rater, count(*), count(*) FILTER (WHERE label = major)
    FROM judged WHERE others >= 2 AND 2 * top > others AND major IN ('a', 'b') GROUP BY rater"""


def diagnostics(rt: Runtime, adv_ids: set[str]) -> dict:
    """Adversaries against honest raters on what the defences read: control passes, the review's agreement with the
    consensus (ties count), and agreement where the consensus is a strict preference."""
    stats = {s["rater"]: s for s in rt.store.rater_stats()}
    agree = {a["rater"]: a for a in rt.store.rater_agreement()}
    strict = {r: (n, k) for r, n, k in rt.store._cur().execute(_STRICT_AGREEMENT).fetchall()}

    def group(adv: bool) -> dict:
        who = [r for r in stats if (r in adv_ids) == adv]
        ctl = sum(stats[r]["control_votes"] for r in who)
        cons = sum(agree[r]["consensus_pairs"] for r in who if r in agree)
        sp = sum(strict.get(r, (0, 0))[0] for r in who)
        return {
            "raters": len(who),
            "votes": sum(stats[r]["votes"] for r in who),
            "control_votes": ctl,
            "control_pass_rate": sum(stats[r]["control_passed"] for r in who) / ctl if ctl else None,
            "consensus_pairs": cons,
            "agreement": sum(agree[r]["agreements"] for r in who if r in agree) / cons if cons else None,
            "strict_consensus_pairs": sp,
            "strict_agreement": sum(strict.get(r, (0, 0))[1] for r in who) / sp if sp else None,
        }

    return {"adversaries": group(True), "honest": group(False)}
