"""The "exclusive" GPU plan on a live runtime (tiny SDXL pipeline, real DuckDB, the real scheduler and round): while a
round trains, generation is paused and raters get the prefetched pairs, none waiting while the queue lasts; when it
runs out they are told why (never a generation on the round's card); afterwards the queue refills to its target. The
round's trainer is the fault injector that hangs until the loop's time limit, so the round lasts a known time."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest

from feedback_store import InputRejected
from jobs import views
from jobs.progress import round_status, status_lines
from jobs.runtime import ArenaConfig, Runtime
from ncp.pipelines import build_tiny_sdxl
from ncp.serving import PairMix, SamplingConfig
from tests.helpers.adapters import random_adapter

ROUND_S = 12.0  # the hanging trainer's time limit: how long generation stays paused
SALT = "test-salt-0123456789abcdef"
ADMIN = "admin-token-for-tests"


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001 - any callable
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def exclusive_runtime(tmp: Path, ratings_per_pair: int = 1) -> Runtime:
    model = tmp / "tiny-sdxl"
    if not model.exists():
        build_tiny_sdxl().save_pretrained(model)
    base = ArenaConfig()
    loop = dataclasses.replace(
        base.loop,
        model=str(model),
        launcher=(sys.executable, "-m", "tests.helpers.fault_trainer", "hang"),
        time_limit_s=ROUND_S,
        min_pairs=0,
        min_new_votes=0,
    )
    config = ArenaConfig(
        data_dir=tmp / "data",
        model=str(model),
        sampling=SamplingConfig(steps=2, width=32, height=32, scheduler="dpmpp-2m"),
        mix=PairMix(on_policy=1.0, cross_version=0.0, control=0.0),
        loop=loop,
        schedule=False,
        prefetch=2,
        ratings_per_pair=ratings_per_pair,
        rater_salt=SALT,
        admin_token=ADMIN,
        gpu_plan="exclusive",
    )
    runtime = Runtime(config)
    runtime.start()
    return runtime


@pytest.fixture
def runtime(tmp_path: Path):
    rt = exclusive_runtime(tmp_path)
    yield rt
    rt.stop()


def test_a_paused_round_serves_the_queue_then_refills_it(runtime: Runtime) -> None:
    rt, prefetcher = runtime, runtime.arena.prefetcher
    assert rt.gpu.plan.mode == "exclusive" and rt.gpu.plan.device == "cpu"
    assert "--resolution" in rt.loop.config.extra_train_args  # served at 32 px, native 64: trained at 32
    # The raters' pace (a pair every 10 s) and the round's expected length (40 s) size the queue: 1.25 x 4 = 5.
    rt.gpu.pace = lambda: 0.1
    rt.gpu.expected_round_s = 40.0
    assert rt.gpu.resize() == 5 and prefetcher.size == 5
    wait_for(lambda: prefetcher.qsize() == 5, 180, "the queue to fill to 5 pairs")

    rt.scheduler.run_now()  # the app's own path: the scheduler's job runs the round, then resumes generation
    wait_for(lambda: rt.gpu.paused, 30, "the round to pause generation")
    assert rt.loop.status.state in ("exporting", "training")
    made = prefetcher.made
    assert "generation paused" in rt.gpu.line()

    waited = prefetcher.waited
    issued = [rt.arena.next_pair(f"session-{i}") for i in range(5)]  # every queued pair reaches a rater
    assert prefetcher.waited == waited, "a rater found no ready pair while the queue had some"
    assert len({v.pair_id for v in issued}) == 5 and rt.gpu.paused
    # The admin status and the Progress tab's round lines carry the plan, its reasons and the pause.
    status = json.loads(views.admin_action(rt, "status", "", ADMIN, None))
    assert status["gpu"]["mode"] == "exclusive" and status["gpu"]["generation_paused"] and status["gpu"]["reasons"]
    assert any(line.startswith("GPU plan: exclusive") for line in status_lines(round_status(rt)))
    vote = rt.arena.vote("session-0", issued[0].token, "left", rt.rater_id("rater-0"))
    assert vote.left_version == "base"  # votes go on during the round
    with pytest.raises(InputRejected) as dry:  # the queue is spent: told why, nothing generated on the round's card
        rt.arena.next_pair("session-5")
    assert dry.value.reason_code == "generation_paused"
    with pytest.raises(InputRejected) as typed:
        rt.arena.next_pair("session-6", prompt="a blue square")
    assert typed.value.reason_code == "generation_paused"
    assert prefetcher.made == made, "a pair was generated while the round had the card"

    wait_for(lambda: not rt.gpu.paused, ROUND_S + 60, "the round to end and generation to resume")
    assert rt.loop.status.last["status"] == "failed" and "time limit" in rt.loop.status.last["reason"]
    last = rt.gpu.last
    assert last["queued_at_start"] == 5 and last["refused_while_paused"] == 1 and last["seconds"] >= ROUND_S - 2
    # The round took about ROUND_S, not 40 s: the next round's queue is sized for the measured length.
    assert rt.gpu.expected_round_s < 40.0
    target = rt.gpu.queue_target()
    wait_for(lambda: prefetcher.qsize() >= target, 180, f"the queue to refill to {target} pairs")
    assert prefetcher.made >= made + target
    assert rt.arena.next_pair("session-7").pair_id not in {v.pair_id for v in issued}


def tiny_sdxl_adapter(tmp: Path) -> Path:
    return random_adapter(build_tiny_sdxl(), tmp / "adapter")


def test_a_promotion_during_a_paused_round_keeps_the_old_pairs_as_a_bridge(runtime: Runtime, tmp_path: Path) -> None:
    """A round that promotes swaps the adapter while generation is still paused; the queued pairs of the old version
    are handed out until the new version's pairs are ready, so raters do not wait for the reload and diffusion."""
    rt, prefetcher = runtime, runtime.arena.prefetcher
    wait_for(lambda: prefetcher.qsize() == 2, 120, "the queue to fill")
    version = rt.registry.publish(tiny_sdxl_adapter(tmp_path), parent="base", snapshot_id=None, metrics={}).version
    rt.gpu.before_round()
    rt.registry.set_current(version, reason="test: a round promoted it")
    rt.serve_current()
    assert rt.generation.serving_version == version and prefetcher.bridge_size() == 2
    old = [rt.arena.next_pair(f"s{i}") for i in range(2)]
    assert all(v.pair_id for v in old)
    with pytest.raises(InputRejected):
        rt.arena.next_pair("s2")
    rt.gpu.after_round()
    wait_for(lambda: prefetcher.qsize() >= 1, 120, "a pair of the new version")
    fresh = rt.arena.next_pair("s3")
    sql = "SELECT left_version, right_version FROM pairs WHERE pair_id = ?"
    assert rt.store._cur().execute(sql, [fresh.pair_id]).fetchall() == [(version, version)]
    assert rt.store._cur().execute(sql, [old[0].pair_id]).fetchall() == [("base", "base")]
