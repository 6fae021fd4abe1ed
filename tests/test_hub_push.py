"""The optional hub push: validated config, and a failing hub never disturbs the app (the failure is recorded)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from feedback_store import FeedbackStore
from jobs.hub_push import HubPushConfig, HubPusher
from tests.store_fixtures import make_world


def closed_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there, connections are refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"repo_id": "no-slash", "token": "t"}, "user/name"),
        ({"repo_id": "user/data set", "token": "t"}, "user/name"),
        ({"repo_id": "user/data", "token": ""}, "token"),
        ({"repo_id": "user/data", "token": "t", "every_s": 5}, "at least 60"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HubPushConfig(**kwargs)


def test_an_unreachable_hub_is_recorded_as_failed_and_nothing_else_changes(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "arena.duckdb")
    world = make_world(store)
    issued = store.issue_pair(world.prompt_id, world.base_img, world.base_img2, "on_policy", "s1")
    store.ensure_rater("r_0123456789abcdef0123456789abcdef")
    store.record_vote(issued.token, "s1", "left", "r_0123456789abcdef0123456789abcdef", time_to_vote_ms=2000)
    before = store.counts()
    cfg = HubPushConfig("user/prefs", "hf_fake_token", endpoint=f"http://127.0.0.1:{closed_port()}")
    pusher = HubPusher(store, tmp_path, cfg)
    assert pusher.status() == {"status": "never"}
    result = pusher.push()
    assert result["status"] == "failed" and result["reason"], result
    assert json.loads((tmp_path / "hub_push.json").read_text())["status"] == "failed"
    # The snapshot it tried to push exists locally, complete and immutable; votes are untouched.
    snaps = [p for p in (tmp_path / "hub_snapshots").iterdir() if p.is_dir()]
    assert len(snaps) == 1 and (snaps[0] / "manifest.json").exists()
    assert json.loads((snaps[0] / "manifest.json").read_text())["rows"]["total"] == 1
    after = store.counts()
    assert {k: v for k, v in after.items() if k != "snapshots"} == {
        k: v for k, v in before.items() if k != "snapshots"
    }
