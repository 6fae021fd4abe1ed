"""The promotion gate reads the held-out accuracy drop against its paired standard error (jobs.gate, ncp.evaluate)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.gate import promotion_gate
from jobs.loop_config import LoopConfig
from ncp.evaluate import correct, grouped_se, mean_se, paired


def _ev(cand_acc: float, serv_acc: float | None, se: float | None, pairs: int = 256) -> dict:
    versions = {"candidate": {"implicit_acc": cand_acc}}
    ev: dict = {"eval_pairs": pairs, "versions": versions}
    if serv_acc is None:
        versions["candidate"]["implicit_acc_se"] = se
    else:
        versions["serving"] = {"implicit_acc": serv_acc}
        ev["paired"] = {
            "candidate-serving": {} if se is None else {"acc_delta": cand_acc - serv_acc, "acc_delta_se": se}
        }
    return ev


def test_a_drop_within_its_noise_passes_and_a_clear_one_rejects() -> None:
    cfg = {"min_acc_delta": -0.02, "min_eval_pairs": 8}
    # -0.06 with SE 0.03: -0.06 + 1.96 x 0.03 = -0.001 >= -0.02, the drop is noise (a live run rejected such ones).
    ok, why = promotion_gate(_ev(0.55, 0.61, 0.03), **cfg)
    assert ok and "SE 0.030" in why
    # The same drop measured precisely is real.
    ok, why = promotion_gate(_ev(0.55, 0.61, 0.005), **cfg)
    assert not ok and "1.96 SE < -0.020" in why
    # z = 0 is the point-estimate rule; a missing SE (an older evaluator) falls back to it as well.
    assert not promotion_gate(_ev(0.55, 0.61, 0.03), acc_z=0.0, min_eval_pairs=8)[0]
    assert not promotion_gate(_ev(0.55, 0.61, None), **cfg)[0]
    # Against the base (accuracy 0.5 by definition) the candidate's own standard error is the drop's.
    assert promotion_gate(_ev(0.45, None, 0.04), **cfg)[0]
    assert not promotion_gate(_ev(0.45, None, 0.01), **cfg)[0]


def test_gate_z_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="gate_acc_z"):
        LoopConfig(gate_acc_z=-1.0)


def test_paired_differences_cancel_the_difficulty_two_versions_share() -> None:
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1.0, 400)  # per held-out pair, shared by every version scored on it
    a = difficulty + 0.3 + rng.normal(0, 0.3, 400)
    b = difficulty + rng.normal(0, 0.3, 400)
    judge = {"a": rng.uniform(0.4, 0.9, (48, 2)), "b": None}
    judge["b"] = judge["a"] - 0.02 + rng.normal(0, 0.01, (48, 2))
    row = paired({"a": a, "b": b}, judge)["a-b"]
    diff = correct(a) - correct(b)
    assert row["acc_delta"] == pytest.approx(correct(a).mean() - correct(b).mean())
    assert row["acc_delta"] > 0 and row["acc_delta_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(400))
    # Unpaired, each accuracy's own noise adds up: the paired error is well below it.
    unpaired = np.sqrt(correct(a).var(ddof=1) / 400 + correct(b).var(ddof=1) / 400)
    assert row["acc_delta_se"] < 0.8 * unpaired
    assert row["judge_delta"] == pytest.approx(0.02, abs=0.005) and row["judge_delta_se"] < 0.002
    # The judge's error is over prompts: a change shared by a prompt's seeds is one observation, not two.
    shared = rng.normal(0, 0.05, (48, 1)).repeat(2, axis=1)
    row = paired({}, {"a": judge["a"] + shared, "b": judge["a"]})["a-b"]
    assert row["judge_delta_se"] == pytest.approx(shared[:, 0].std(ddof=1) / np.sqrt(48))
    assert row["judge_delta_se"] > 1.3 * shared.std(ddof=1) / np.sqrt(96)  # what flattening the seeds reported
    # Versions with no held-out pairs (an empty split) get judge differences only.
    assert set(paired({}, judge)["a-b"]) == {"judge_delta", "judge_delta_se"}


def test_the_evidence_rule_promotes_only_an_accuracy_gain_beyond_noise() -> None:
    """require_acc_gain (the shapes world): a candidate must predict held-out votes better than the base (0.5) beyond
    gain_z of its own SEs, and no worse than the served version; a judge gain alone never promotes (coin-flip rounds
    gained it), the judge only vetoes."""
    cfg = {"min_eval_pairs": 100, "require_acc_gain": True, "gain_z": 1.96, "min_judge_delta": -0.02}
    # Against the base: the candidate's own SE.
    assert promotion_gate(_ev(0.61, None, 0.04, pairs=128), **cfg)[0]  # +0.11, 2.75 SE
    ok, why = promotion_gate(_ev(0.55, None, 0.04, pairs=128), **cfg)  # +0.05: what a coin-flip round moved by
    assert not ok and "no evidence it learned the votes: +0.050 over the base" in why
    # A round that continues the served version: evidence against the base, regression against the served version.
    chained = _ev(0.62, 0.61, 0.02, pairs=384)
    chained["versions"]["candidate"]["implicit_acc_se"] = 0.03
    ok, why = promotion_gate(chained, **cfg)
    assert ok and "implicit acc (latent) 0.620 vs 0.610" in why and "vs base +0.120 (SE 0.030)" in why
    chained["versions"]["candidate"]["implicit_acc_se"] = 0.07  # the same accuracy, not told from chance
    assert not promotion_gate(chained, **cfg)[0]
    worse = _ev(0.60, 0.68, 0.02, pairs=384)  # learned the votes, but clearly predicts them worse than the served one
    worse["versions"]["candidate"]["implicit_acc_se"] = 0.02
    ok, why = promotion_gate(worse, **cfg)
    assert not ok and "1.96 SE < -0.020" in why
    # Too few held-out pairs: no evidence, no promotion (without the rule the criterion is skipped instead).
    ok, why = promotion_gate(_ev(0.9, None, 0.01, pairs=40), **cfg)
    assert not ok and "only 40 held-out pairs (need 100)" in why
    assert promotion_gate(_ev(0.9, None, 0.01, pairs=40), min_eval_pairs=100)[0]
    # The judge vetoes a fall beyond its margin, and tolerates one within it.
    chained["versions"]["candidate"]["implicit_acc_se"] = 0.03
    chained["versions"]["candidate"]["judge"], chained["versions"]["serving"]["judge"] = 0.60, 0.65
    assert not promotion_gate(chained, **cfg)[0]
    chained["versions"]["candidate"]["judge"] = 0.64
    assert promotion_gate(chained, **cfg)[0]


def test_gain_z_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="gate_gain_z"):
        LoopConfig(gate_gain_z=-0.5)


def test_grouped_se_takes_a_prompts_rows_as_one_observation() -> None:
    """The held-out split is drawn by prompt and a live pair is rated several times: six identical ratings of 30
    pairs carry the information of 30 values, not 180."""
    rng = np.random.default_rng(1)
    values, groups = rng.normal(0.1, 0.5, 30), [f"prompt {i}" for i in range(30)]
    rows, row_groups = np.repeat(values, 6), np.repeat(groups, 6).tolist()
    assert grouped_se(rows, row_groups) == pytest.approx(values.std(ddof=1) / np.sqrt(30))
    assert grouped_se(rows, row_groups) > 2.2 * mean_se(rows)[1]  # what the rows' own SE claims: sqrt(6) too small
    # Every row its own cluster: the plain standard error.
    assert grouped_se(values, groups) == pytest.approx(mean_se(values)[1])
    assert np.isnan(grouped_se(values, ["one prompt"] * 30))
    with pytest.raises(ValueError, match="one group per value"):
        grouped_se(values, groups[:-1])
    # paired() reports it beside the SE the gate reads when it is given each pair's prompt.
    a, b = rng.normal(0, 1, 180), rng.normal(0, 1, 180)
    row = paired({"a": a, "b": b}, {}, row_groups)["a-b"]
    assert row["acc_delta_se_prompts"] == pytest.approx(grouped_se(correct(a) - correct(b), row_groups))
    assert "acc_delta_se_prompts" not in paired({"a": a, "b": b}, {})["a-b"]


def test_the_gate_reads_the_prompt_clustered_error_when_the_evaluation_has_it() -> None:
    # A drop of -0.08 is -0.08 + 1.96 x 0.02 < -0.02 in row SEs but within noise in prompt-clustered SEs (a prompt's
    # several ratings carry one piece of evidence): the no-worse rule must let it pass, and says which error it read.
    cfg = {"min_eval_pairs": 8, "min_acc_delta": -0.02}
    ev = _ev(0.55, 0.63, 0.02)
    assert not promotion_gate(ev, **cfg)[0]  # an evaluator without the clustered SE: the row SE
    ev["paired"]["candidate-serving"]["acc_delta_se_prompts"] = 0.05
    ev["eval_prompts"] = 21
    ok, why = promotion_gate(ev, **cfg)
    assert ok and "SE 0.050, 256 pairs of 21 prompts" in why
    # The evidence rule against the base: the candidate's own clustered SE; a NaN one (a single prompt) falls back to
    # the row SE.
    base = _ev(0.60, None, 0.03)
    base["versions"]["candidate"]["implicit_acc_se_prompts"] = 0.06
    assert not promotion_gate(base, require_acc_gain=True, **cfg)[0]
    base["versions"]["candidate"]["implicit_acc_se_prompts"] = float("nan")
    assert promotion_gate(base, require_acc_gain=True, **cfg)[0]
