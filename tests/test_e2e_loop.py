"""End to end on the embedded shapes world: the real Gradio app, simulated raters voting over HTTP, two scheduled
alignment rounds trained (real subprocesses), gated, promoted and hot-swapped while the raters keep voting, and the
lineage of every version checked."""

from __future__ import annotations

import threading
import time

import pytest

from app import build_demo, launch_kwargs
from bench.raters import run_raters
from feedback_store import FeedbackStore
from jobs.loop import LoopConfig
from jobs.runtime import SHAPES_MODEL, ArenaConfig, Runtime
from ncp.serving import PairMix, SamplingConfig
from tests.app_fixtures import free_port

pytestmark = pytest.mark.slow


def wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_live_loop_with_http_raters(tmp_path) -> None:
    loop = LoopConfig(
        model=str(SHAPES_MODEL),
        train_every_s=3600,
        min_new_votes=1,
        min_pairs=12,
        max_steps=8,
        batch_size=4,
        lr=1e-4,
        shapes_probes=6,
        probe_seeds=1,
        gate_min_acc_delta=-1.0,
        gate_min_judge_delta=-1.0,
        max_rater_share=1.0,
        time_limit_s=400,
        eval_time_limit_s=300,
    )
    config = ArenaConfig(
        data_dir=tmp_path / "data",
        model=str(SHAPES_MODEL),
        sampling=SamplingConfig(steps=8),
        mix=PairMix(on_policy=0.7, cross_version=0.3, control=0.0),
        loop=loop,
        schedule=True,
        prefetch=4,
    )
    rt = Runtime(config)
    rt.start()
    demo = build_demo(rt)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs(rt))
    stop = threading.Event()
    summary: dict = {}
    raters = threading.Thread(
        target=lambda: summary.update(
            run_raters(f"http://127.0.0.1:{port}", raters=3, votes=10**6, noise=0.02, stop=stop, pace_s=0.05)
        ),
        daemon=True,
    )
    try:
        raters.start()
        results = []
        for round_no in (1, 2):
            before = rt.store.counts()["votes"]
            # 60 votes: about a third are ties and each pool pair is rated by up to 3 raters, so 60 votes leave
            # comfortably more than min_pairs distinct strict preferences.
            wait_for(lambda b=before: rt.store.counts()["votes"] >= b + 60, 300, f"votes before round {round_no}")
            n_runs = len(rt.store.training_runs(100))
            rt.scheduler.run_now()  # through APScheduler, as the admin tab does
            wait_for(lambda n=n_runs: len(rt.store.training_runs(100)) > n, 120, "the round to start")
            wait_for(lambda: rt.loop.status.state == "idle", 900, f"round {round_no} to finish")
            results.append(rt.loop.status.last)
            votes_at_swap = rt.store.counts()["votes"]
            # Raters keep voting through and after the swap, now on pairs of the new version.
            wait_for(lambda v=votes_at_swap: rt.store.counts()["votes"] >= v + 10, 300, "votes after the swap")
    finally:
        stop.set()
        raters.join(timeout=60)
        demo.close()
        rt.stop()

    assert [r["status"] for r in results] == ["promoted", "promoted"], results
    assert [(r["version"], r["parent"]) for r in results] == [("v0001", "base"), ("v0002", "v0001")]
    assert not summary["errors"], summary["errors"][:5]
    assert summary["votes"] == summary["distinct_vote_ids"] > 60
    assert {"v0001", "v0002"} <= set(summary["versions_seen"]), summary["versions_seen"]

    # Reopen the store (the app is stopped): every version's lineage, in the database and the registry.
    store = FeedbackStore(tmp_path / "data" / "arena.duckdb")
    try:
        for r in results:
            av = store.adapter_version(r["version"])
            assert (av.parent, av.snapshot_id, av.status) == (r["parent"], r["snapshot_id"], "published")
            run = store.training_run(r["run_id"])
            assert run.status == "succeeded" and run.adapter_version == r["version"]
            assert "judge" in r["metrics"]["eval"]["versions"]["candidate"]
            assert rt.registry.info(r["version"]).snapshot_id == r["snapshot_id"]
        snaps = [store.snapshot(r["snapshot_id"]) for r in results]
        assert snaps[1].vote_id_max > snaps[0].vote_id_max
    finally:
        store.close()
