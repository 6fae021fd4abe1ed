"""An app restart during a training round: the interrupted run is recorded failed with its reason, the registry's
current version is served again, and no acknowledged vote is lost."""

from __future__ import annotations

from jobs.runtime import Runtime
from tests.app_fixtures import tiny_runtime


def test_restart_mid_round_marks_run_failed_and_serves_registry_version(tmp_path) -> None:
    rt = tiny_runtime(tmp_path, serve_adapter=True)
    served = rt.registry.current()
    assert served != "base" and rt.generation.serving_version == served
    pair = rt.arena.next_pair("s1")
    vote = rt.arena.vote("s1", pair.token, "left", rt.rater_id("r1"))
    run_id = rt.store.start_training_run(None, served, config={"trigger": "test"})  # a round in flight
    config = rt.config
    rt.stop()  # the process goes away with the run still "running"

    rt2 = Runtime(config)
    rt2.start()
    try:
        run = rt2.store.training_run(run_id)
        assert run.status == "failed" and "restarted" in run.reason
        assert rt2.generation.serving_version == served == rt2.registry.current()
        assert rt2.store.vote(vote.vote_id) is not None
        assert rt2.arena.next_pair("s2").pair_id > pair.pair_id
    finally:
        rt2.stop()
