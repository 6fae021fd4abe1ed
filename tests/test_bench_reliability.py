"""bench/reliability.py's parts at toy sizes: a SIGKILL of the real app server (`python -m bench.reliability_server`,
a subprocess) in the middle of a load loses no acknowledged vote and the restart serves the registry's version; the
poisoning arms run end to end; the doc renders from the results.

    python -m pytest -q tests/test_bench_reliability.py      # about 2 min (two app starts, two training rounds)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench import poisoning, reliability_render
from bench.reliability_http import LoadSettings, run
from bench.reliability_render import load_ok, render, training_data
from bench.reliability_server import with_loop_overrides
from jobs.runtime import ArenaConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_ROUND = {"max_steps": 2, "shapes_probes": 2, "probe_seeds": 1}


def test_adversaries_are_spread_over_the_raters() -> None:
    s = poisoning.PoisonSettings(raters=10, adversarial_share=0.2)
    assert poisoning.adversaries(s) == {0, 5}
    assert poisoning.adversaries(dataclasses.replace(s, adversarial_share=0.0)) == set()
    assert len(poisoning.adversaries(dataclasses.replace(s, raters=15))) == 3


def test_loop_overrides_replace_only_the_named_fields() -> None:
    base = ArenaConfig()
    cfg = with_loop_overrides(base, TINY_ROUND)
    assert (cfg.loop.max_steps, cfg.loop.shapes_probes, cfg.loop.probe_seeds) == (2, 2, 1)
    assert dataclasses.replace(cfg.loop, **{k: getattr(base.loop, k) for k in TINY_ROUND}) == base.loop
    with pytest.raises(TypeError):
        with_loop_overrides(base, {"no_such_field": 1})


@pytest.mark.slow
def test_sigkill_mid_load_loses_no_acknowledged_vote(tmp_path) -> None:
    s = LoadSettings(
        clients=2, votes=10, swap_every_s=2.0, round_after=0.3, crash_after=0.5, loop_overrides=TINY_ROUND
    )
    out = run(s, tmp_path)
    crash = out["events"]["crash"]
    assert crash is not None and crash["equal"], crash  # the restarted app serves the registry's pointer
    assert out["acknowledged_votes"] == 20 and out["store"]["acknowledged_missing"] == 0, out["store"]
    assert out["failed_requests"] == 0, out["failures"]
    assert load_ok(out)
    doc = render({"parts": {"crash": out | {"mode": "test", "finished": "now", "part_wall_s": 1.0}}})
    assert "## 2. Crash" in doc and "| crash |" in doc


@pytest.mark.slow
def test_poisoning_arm_runs_a_round_and_reports_its_gain(tmp_path) -> None:
    # The arena samples at the shapes model's own steps: at 2 steps most pairs were ties or both bad, and the defended
    # arm (which also drops votes against the consensus) sometimes had fewer than the 16 strict pairs a round needs.
    s = poisoning.PoisonSettings(raters=5, rounds=1, votes_per_round=300, max_steps=2, probes=2, probe_seeds=1)
    out = poisoning.run(s, tmp_path, arms=("defended",))
    arm = out["arms"]["defended"]
    assert arm["adversaries"] == 1 and arm["refused_votes"] == 0  # human pace: no rate limit, no cap
    (row,) = arm["rounds"]
    assert row["status"] == "promoted" and row["pairs_trained"] > 0, row  # the gate is off in this benchmark
    assert arm["base_judge"] is not None and arm["gain"] == pytest.approx(arm["judge"] - arm["base_judge"], abs=1e-6)
    diag = arm["diagnostics"]
    assert diag["adversaries"]["raters"] == 1 and diag["honest"]["raters"] == 4 and diag["honest"]["votes"] > 0
    doc = render({"parts": {"poisoning": out | {"mode": "test", "finished": "now", "part_wall_s": 1.0}}})
    assert "## 4. Poisoning" in doc


@pytest.mark.slow
def test_poisoning_arms_run_in_parallel_processes_with_their_own_settings(tmp_path) -> None:
    """parallel_arms > 1: each arm in a spawned process; both come back whole, with the clean arm's adversary-free
    raters and the trainer's timestep floor from the settings."""
    s = poisoning.PoisonSettings(raters=5, rounds=1, votes_per_round=300, max_steps=2, probes=2, probe_seeds=1,
                                 steps=2, parallel_arms=2, keep_data=True)  # fmt: skip
    out = poisoning.run(s, tmp_path, arms=("clean", "poisoned"))
    assert set(out["arms"]) == {"clean", "poisoned"} and "goal" in out
    assert (out["arms"]["clean"]["adversaries"], out["arms"]["poisoned"]["adversaries"]) == (0, 1)
    for arm in ("clean", "poisoned"):
        (row,) = out["arms"][arm]["rounds"]
        assert row["status"] == "promoted" and row["pairs_trained"] > 0, row
        (metrics,) = (tmp_path / arm).rglob("adapters/v0001/metrics.json")
        assert json.loads(metrics.read_text())["config"]["timestep_low"] == s.timestep_low > 0


def test_training_data_line_counts_what_reached_the_trainer_per_arm() -> None:
    def arm(*rounds: tuple[int, int]) -> dict:
        return {"rounds": [{"pairs_trained": n, "adversary_pairs_trained": a} for n, a in rounds]}

    r = {
        "arms": {
            "clean": arm((60, 0), (70, 0)),
            "poisoned": arm((60, 12), (70, 15)),
            "defended": arm((48, 0), (55, 1)),
        }
    }
    (_, line) = training_data(r)
    assert "poisoned arm trained on 27 adversarial pairs of 130, the defended arm on 1 of 103" in line
    assert "kept 102 honest pairs where the clean arm had 130" in line
    assert training_data({"arms": {"defended": r["arms"]["defended"]}}) == []  # needs all three arms


def test_poisoning_base_model_is_a_setting_named_in_the_doc(tmp_path) -> None:
    s = poisoning.PoisonSettings(model=str(tmp_path / "headroom-base"))
    config = poisoning.arm_config("defended", s, tmp_path / "data")
    assert config.model == config.loop.model == str(tmp_path / "headroom-base")  # serves and trains the same base
    assert poisoning.PoisonSettings().model == str(ROOT / "models" / "shapes-base")
    assert reliability_render.model_name({"model": str(ROOT / "runs" / "x")}) == "runs/x"
    assert reliability_render.model_name({}) == "models/shapes-base"  # results from before the setting existed


def test_replicated_poisoning_reads_the_goal_from_mean_gains_over_seeds() -> None:
    def out(seed: int, gains: dict[str, float]) -> dict:
        arms = {a: {"gain": g, "gain_ci95": 0.01, "rounds": [{"pairs_trained": 100, "adversary_pairs_trained":
                20 if a == "poisoned" else 0}]} for a, g in gains.items()}  # fmt: skip
        return {"settings": {"seed": seed}, "arms": arms, "goal": poisoning.goal(arms)}

    # Seed 0 alone: the poisoned arm gains twice the clean one (training noise), the defended share reads 150%.
    runs = [out(0, {"clean": 0.02, "poisoned": 0.04, "defended": 0.03}),
            out(1, {"clean": 0.04, "poisoned": 0.01, "defended": 0.03}),
            out(2, {"clean": 0.03, "poisoned": 0.01, "defended": 0.015})]  # fmt: skip
    combined = poisoning.combine(runs)
    assert combined["first_goal"]["defended_share"] == pytest.approx(1.5)
    goal = combined["goal"]
    assert goal["mean_gain"] == pytest.approx({"clean": 0.03, "poisoned": 0.02, "defended": 0.025})
    assert goal["defended_share"] == pytest.approx(0.025 / 0.03) and goal["met"] is True
    assert goal["sd_gain"]["clean"] == pytest.approx(0.01)
    assert [r["arms"]["poisoned"]["adversary_pairs_trained"] for r in combined["replicates"]] == [20, 20, 20]
    # A clean gain that is not positive in every seed: no share.
    runs[2] = out(2, {"clean": -0.01, "poisoned": 0.0, "defended": 0.0})
    assert poisoning.combine(runs)["goal"]["defended_share"] is None
    assert poisoning.combine(runs[:1]) == runs[0]  # one seed: the result as `run` gave it
    table = "\n".join(reliability_render.replicates_table(combined))
    assert "| 1 | +0.040 ± 0.010 | +0.010 ± 0.010 | +0.030 ± 0.010 | 100 (20) | 100 (0) |" in table
    assert "| mean ± sd | +0.030 ± 0.010 | +0.020 ± 0.017 | +0.025 ± 0.009 | | |" in table
