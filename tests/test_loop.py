"""The alignment loop on a real (tiny SD1.5) pipeline: rounds that promote and hot-swap with full lineage, and every
fault of the trainer leaving the served version and the votes untouched.

Each round runs the real `python -m ncp.train` and `python -m ncp.evaluate` subprocesses; faults are injected by
`tests/helpers/fault_trainer.py` around the real trainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedback_store.export import eval_mask
from jobs.loop import LoopConfig
from jobs.runtime import ArenaConfig, Runtime
from ncp.pipelines import build_tiny_sd15
from ncp.serving import PairMix, SamplingConfig

pytestmark = pytest.mark.slow

FAST = dict(
    max_steps=3,
    batch_size=2,
    lora_rank=4,
    lora_alpha=4,
    min_pairs=8,
    min_new_votes=1,
    time_limit_s=180,
    eval_time_limit_s=180,
    gate_min_acc_delta=-1.0,
    gate_min_judge_delta=-1.0,
    max_rater_share=1.0,
)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("loop")
    build_tiny_sd15(seed=0).save_pretrained(root / "model")
    config = ArenaConfig(
        data_dir=root / "data",
        model=str(root / "model"),
        sampling=SamplingConfig(steps=3),
        mix=PairMix(on_policy=1.0, cross_version=0.0, control=0.0),
        loop=LoopConfig(model=str(root / "model"), **FAST),
        schedule=False,
        prefetch=2,
    )
    rt = Runtime(config)
    rt.start()
    raters = [rt.rater_id(f"rater-{i}") for i in range(4)]
    for i in range(40):
        pair = rt.arena.next_pair(f"session-{i % 4}")
        outcome = "left" if Path(pair.left_path).name < Path(pair.right_path).name else "right"
        rt.arena.vote(f"session-{i % 4}", pair.token, outcome, raters[i % 4], time_to_vote_ms=900)
    yield rt
    rt.stop()


def with_launcher(rt: Runtime, mode: str | None, **overrides) -> None:
    launcher = (
        (sys.executable, "-m", "ncp.train")
        if mode is None
        else (sys.executable, "-m", "tests.helpers.fault_trainer", mode)
    )
    rt.loop.config = dataclasses.replace(rt.loop.config, launcher=launcher, **overrides)


def test_two_rounds_promote_hot_swap_and_record_lineage(runtime: Runtime) -> None:
    rt = runtime
    with_launcher(rt, None, timestep_low=0.3)
    first = rt.loop.run_round()
    assert first.status == "promoted", first.reason
    assert first.version == "v0001" and first.parent == "base"
    # The round's trainer ran with the loop's timestep floor (its own record, next to the published weights).
    trained = json.loads((rt.registry.info("v0001").folder / "metrics.json").read_text())["config"]
    assert (trained["timestep_low"], trained["timestep_high"]) == (0.3, 1.0)
    assert rt.registry.current() == "v0001" == rt.generation.serving_version
    # The round's snapshot holds out the loop's share of prompts (a quarter by default): the split its gate scores.
    manifest = json.loads((rt.loop.snapshots_dir / first.snapshot_id / "manifest.json").read_text())
    assert manifest["split"]["eval_fraction"] == rt.loop.config.eval_fraction == 0.25
    # Raters keep voting between rounds; the new votes come from the new version.
    pair = rt.arena.next_pair("session-x")
    assert rt.store.image(rt.store.pair(pair.pair_id).left_image_id).adapter_version == "v0001"
    rt.arena.vote("session-x", pair.token, "left", rt.rater_id("rater-0"))
    # Three votes on a prompt of the held-out split; the evaluator then scores only the newest two held-out pairs.
    held_prompt = next(c for i in range(1000) if eval_mask(pa.array([c := f"a red circle, take {i}"]), 0.1)[0].as_py())
    for _ in range(3):
        pair = rt.arena.next_pair("session-y", prompt=held_prompt)
        rt.arena.vote("session-y", pair.token, "right", rt.rater_id("rater-1"))
    with_launcher(rt, None, eval_max_pairs=2, reference="init")
    second = rt.loop.run_round()
    assert second.status == "promoted", second.reason
    assert (second.version, second.parent) == ("v0002", "v0001")
    assert rt.generation.serving_version == "v0002"
    assert second.metrics["eval"]["eval_pairs"] == 2
    # The evaluator compared both versions on the same pairs: the drop the gate reads, with its paired standard error.
    versions, paired = second.metrics["eval"]["versions"], second.metrics["eval"]["paired"]["candidate-serving"]
    assert paired["acc_delta"] == pytest.approx(
        versions["candidate"]["implicit_acc"] - versions["serving"]["implicit_acc"]
    )
    assert paired["acc_delta_se"] >= 0
    # Both held-out pairs are of one prompt: one cluster, so the prompt-clustered SE is undefined, not a small number.
    assert second.metrics["eval"]["eval_prompts"] == 1 and math.isnan(paired["acc_delta_se_prompts"])
    assert math.isnan(versions["candidate"]["implicit_acc_se_prompts"])
    # The second round continued v0001 with v0001 itself as its DPO reference (iterative DPO); the first had none.
    trained = json.loads((rt.registry.info("v0002").folder / "metrics.json").read_text())
    assert (trained["config"]["reference"], trained["init_adapter"]) == ("init", str(rt.registry.info("v0001").folder))
    # Lineage: each version names its parent and the snapshot (vote ids) it was trained on.
    for res in (first, second):
        av = rt.store.adapter_version(res.version)
        assert av.parent == res.parent and av.snapshot_id == res.snapshot_id and av.status == "published"
        info = rt.registry.info(res.version)
        assert info.parent == res.parent and info.snapshot_id == res.snapshot_id
        run = rt.store.training_run(res.run_id)
        assert run.status == "succeeded" and run.adapter_version == res.version
    snap2 = rt.store.snapshot(second.snapshot_id)
    assert snap2.vote_id_max > rt.store.snapshot(first.snapshot_id).vote_id_max


@pytest.mark.parametrize(
    ("mode", "reason", "overrides"),
    [
        ("raise", "injected trainer crash", {}),
        ("nan", "nan", {}),
        ("sigkill", "SIGKILL", {}),
        ("hang", "time limit", {"time_limit_s": 8}),
        ("corrupt", "load test", {}),
    ],
)
def test_trainer_fault_leaves_served_version_and_votes_unchanged(
    runtime: Runtime, mode: str, reason: str, overrides: dict
) -> None:
    rt = runtime
    served, current = rt.generation.serving_version, rt.registry.current()
    versions, votes = rt.registry.versions(), rt.store.counts()["votes"]
    with_launcher(rt, mode, **overrides)
    try:
        result = rt.loop.run_round()
    finally:
        with_launcher(rt, None, time_limit_s=FAST["time_limit_s"])
    assert result.status == "failed"
    assert reason.lower() in result.reason.lower(), result.reason
    assert rt.generation.serving_version == served and rt.registry.current() == current
    assert rt.registry.versions() == versions
    assert rt.store.counts()["votes"] == votes
    run = rt.store.training_run(result.run_id)
    assert run.status == "failed" and reason.lower() in (run.reason or "").lower()


def test_next_round_after_faults_still_promotes(runtime: Runtime) -> None:
    with_launcher(runtime, None)
    result = runtime.loop.run_round()
    assert result.status == "promoted", result.reason
    assert runtime.generation.serving_version == result.version == runtime.registry.current()


def test_rejected_candidates_seed_the_next_rounds_up_to_the_limit(runtime: Runtime) -> None:
    """A rejected candidate keeps training in the next round (its run records `init_adapter: rejected-<run>`) for at
    most `continue_rejected` rounds in a row; then the line restarts from the served version, which never changed."""
    rt = runtime
    served = rt.registry.current()
    vote = 0

    def round_() -> object:
        nonlocal vote  # a new vote per round: the round's snapshot grows as on a live arena
        pair = rt.arena.next_pair(f"session-line-{vote}")
        rt.arena.vote(f"session-line-{vote}", pair.token, "left", rt.rater_id(f"rater-{vote % 4}"))
        vote += 1
        return rt.loop.run_round()

    # An injected gate that rejects every candidate (this tiny arena has no held-out pairs to fail the real one).
    with_launcher(rt, None, continue_rejected=2)
    real_gate, rt.loop.gate = rt.loop.gate, lambda ev, parent: (False, "injected: reject every candidate")
    try:
        results = [round_() for _ in range(4)]
    finally:
        rt.loop.gate = real_gate
    assert [r.status for r in results] == ["rejected"] * 4, [r.reason for r in results]
    inits = [rt.store.training_run(r.run_id).config["init_adapter"] for r in results]
    first = results[0].run_id
    assert inits == [served, f"rejected-{first}", f"rejected-{first + 1}", served]
    assert rt.registry.current() == served == rt.generation.serving_version
    # The line never outlives a promotion: the promoted candidate is the next round's start.
    promoted = rt.loop.run_round()
    assert promoted.status == "promoted", promoted.reason
    after = round_()
    assert rt.store.training_run(after.run_id).config["init_adapter"] == promoted.version


def test_a_collapsed_candidate_does_not_seed_the_next_round(runtime: Runtime) -> None:
    """A rejected candidate whose probe judge fell far below the base (an injected collapse) ends the line: the next
    round starts from the served version, not from it (LoopConfig.continue_max_drop)."""
    rt = runtime
    served = rt.registry.current()
    evaluator = (sys.executable, "-m", "tests.helpers.collapsed_evaluator")
    rt.loop.config = dataclasses.replace(
        rt.loop.config,
        launcher=(sys.executable, "-m", "ncp.train"),
        evaluator=evaluator,
        continue_rejected=3,
        gate_min_judge_delta=0.0,
    )
    results = []
    try:
        for i in range(2):
            pair = rt.arena.next_pair(f"session-collapse-{i}")
            rt.arena.vote(f"session-collapse-{i}", pair.token, "left", rt.rater_id(f"rater-{i % 4}"))
            results.append(rt.loop.run_round())
    finally:
        rt.loop.config = dataclasses.replace(
            rt.loop.config, evaluator=LoopConfig().evaluator, gate_min_judge_delta=FAST["gate_min_judge_delta"]
        )
    assert [r.status for r in results] == ["rejected", "rejected"], [r.reason for r in results]
    assert "judge 0.300 vs 0.600" in results[0].reason
    inits = [rt.store.training_run(r.run_id).config["init_adapter"] for r in results]
    assert inits == [served, served]  # not f"rejected-{results[0].run_id}"


def test_on_policy_window_trains_only_on_the_served_versions_own_pairs(runtime: Runtime) -> None:
    """train_window="serving": a round trains only on pairs whose two images the served version drew (iterative DPO's
    on-policy data, with that version as the reference), and starts from the served version even after a rejection."""
    rt = runtime
    served = rt.registry.current()
    # Fresh pairs: the served version draws both images (PairMix on_policy=1.0). 24 votes, not fewer: up to `prefetch`
    # of them were drawn before the last promotion, and about a tenth of the prompts fall in the eval split, so a
    # dozen left the round below min_pairs=8 now and then.
    for i in range(24):
        pair = rt.arena.next_pair(f"session-window-{i}")
        rt.arena.vote(f"session-window-{i}", pair.token, "left" if i % 2 else "right", rt.rater_id(f"rater-{i % 4}"))
    with_launcher(rt, None, train_window="serving", reference="init", continue_rejected=2, min_pairs=1000)
    runs_before = len(rt.store.training_runs())
    starved = rt.loop.run_round()  # too few of the served version's own pairs: wait, and record no failed run
    assert starved.status == "skipped" and f"pairs of {served}'s own images; waiting for 1000" in starved.reason
    assert len(rt.store.training_runs()) == runs_before
    with_launcher(rt, None, train_window="serving", reference="init", continue_rejected=2, min_pairs=8)
    real_gate, rt.loop.gate = rt.loop.gate, lambda ev, parent: (False, "injected: reject every candidate")
    try:
        results = []
        for _ in range(2):
            results.append(rt.loop.run_round())
            table = pq.read_table(Path(rt.loop.status.round_dir) / "train.parquet")
            versions = set(
                table.column("adapter_version_0").to_pylist() + table.column("adapter_version_1").to_pylist()
            )
            snapshot = pq.read_table(rt.loop.snapshots_dir / results[-1].snapshot_id / "train.parquet")
            assert versions == {served} and 8 <= table.num_rows < snapshot.num_rows  # earlier versions' pairs dropped
    finally:
        rt.loop.gate = real_gate
    assert [r.status for r in results] == ["rejected"] * 2, [r.reason for r in results]
    runs = [rt.store.training_run(r.run_id).config for r in results]
    assert [c["init_adapter"] for c in runs] == [served, served]  # no rejected line: on-policy rounds restart
    assert all(c["train_window"] == "serving" and c["reference"] == "init" for c in runs)
    assert all(0 < c["distinct_pairs"] <= c["pairs"] for c in runs)  # lineage: how many image pairs the votes held


def test_an_evidence_gated_round_waits_for_held_out_pairs(runtime: Runtime) -> None:
    """gate_require_acc_gain: with fewer strict held-out pairs than the gate needs, the round trains nothing and records
    no run (it could not be promoted); the snapshot's eval split is what it counts."""
    rt = runtime
    with_launcher(rt, None, gate_require_acc_gain=True, gate_min_eval_pairs=1000)
    runs_before = len(rt.store.training_runs())
    try:
        waited = rt.loop.run_round()
    finally:
        with_launcher(rt, None, gate_require_acc_gain=False, gate_min_eval_pairs=LoopConfig().gate_min_eval_pairs)
    assert waited.status == "skipped" and "of the 1000 held-out pairs the gate needs" in waited.reason, waited.reason
    held = int(waited.reason.split()[3])
    snap = rt.loop.snapshots_dir / waited.snapshot_id / "eval.parquet"
    labels = pq.read_table(snap).column("label_0").to_pylist() if snap.exists() else []
    assert held == sum(1 for x in labels if x != 0.5)
    assert len(rt.store.training_runs()) == runs_before
