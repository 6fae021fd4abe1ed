"""record_vote and its neighbours: receipts, idempotence, every refusal (with its reason code and the database
unchanged), control pairs, shadow exclusion, flags, quarantine, deletion, and the alignment-loop lineage."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

import pytest
from store_fixtures import World, make_world, table_state

from feedback_store import FeedbackStore, InputRejected, VoteRejected, pseudonymize

T0 = datetime(2030, 5, 1, 12, 0, 0)


@pytest.fixture
def world(tmp_path) -> World:
    store = FeedbackStore(tmp_path / "arena.duckdb")
    w = make_world(store)
    store.ensure_rater("r_alice")
    store.ensure_rater("r_bob")
    yield w
    store.close()


def issue(w: World, session: str = "s1", kind: str = "cross_version", **kw):
    right = w.v1_img if kind == "cross_version" else w.base_img2
    return w.store.issue_pair(w.prompt_id, w.base_img, right, kind, session, now=kw.pop("now", T0), **kw)


def test_receipt_maps_left_right_to_chosen_rejected_and_reveals_versions(world: World) -> None:
    p = issue(world)
    r = world.store.record_vote(p.token, "s1", "right", "r_alice", reasons=["artifacts"], time_to_vote_ms=900, now=T0)
    assert (r.chosen_image_id, r.rejected_image_id) == (world.v1_img, world.base_img)
    assert (r.left_version, r.right_version, r.outcome, r.pair_id) == ("base", "v1", "right", p.pair_id)
    v = world.store.vote(r.vote_id)
    assert (v.rater, v.session, v.reasons, v.time_to_vote_ms, v.kind) == (
        "r_alice",
        "s1",
        ("artifacts",),
        900,
        "cross_version",
    )
    tie = issue(world)
    r2 = world.store.record_vote(tie.token, "s1", "tie", "r_alice", now=T0)
    assert (r2.chosen_image_id, r2.rejected_image_id) == (None, None)
    [pp] = world.store.preference_pairs(now=T0)  # the tie carries no preference
    assert (pp.chosen.image_id, pp.rejected.image_id, pp.chosen.adapter_version) == (
        world.v1_img,
        world.base_img,
        "v1",
    )
    assert pp.prompt == "a large red circle on the left, gray background"


def test_same_vote_again_is_idempotent(world: World) -> None:
    p = issue(world)
    first = world.store.record_vote(p.token, "s1", "left", "r_alice", now=T0)
    before = table_state(world.store)
    again = world.store.record_vote(p.token, "s1", "left", "r_alice", now=T0 + timedelta(days=3))  # even after expiry
    assert again == first
    assert table_state(world.store) == before


def _expired(w: World):
    p = issue(w, ttl_s=60)
    return dict(token=p.token, session="s1", outcome="left", rater="r_alice", now=T0 + timedelta(seconds=61))


def _voted(w: World, **change):
    p = issue(w)
    w.store.record_vote(p.token, "s1", "left", "r_alice", now=T0)
    return dict(token=p.token, session="s1", outcome="left", rater="r_alice", now=T0) | change


def _fresh(w: World, **change):
    return dict(token=issue(w).token, session="s1", outcome="left", rater="r_alice", now=T0) | change


BAD = {
    "forged token": ("unknown_token", lambda w: _fresh(w, token=secrets.token_urlsafe(32))),
    "token of wrong type": ("unknown_token", lambda w: _fresh(w, token=12345)),
    "expired": ("expired", _expired),
    "replay with another outcome": ("conflicting_vote", lambda w: _voted(w, outcome="right")),
    "replay by another rater": ("conflicting_vote", lambda w: _voted(w, rater="r_bob")),
    "replay from a foreign session": ("wrong_session", lambda w: _voted(w, session="s2")),
    "foreign session": ("wrong_session", lambda w: _fresh(w, session="s_other")),
    "session with a newline": ("invalid_session", lambda w: _fresh(w, session="s1\n")),
    "unknown outcome": ("invalid_outcome", lambda w: _fresh(w, outcome="center")),
    "outcome of wrong type": ("invalid_outcome", lambda w: _fresh(w, outcome=1)),
    "too many reasons": ("reasons_too_large", lambda w: _fresh(w, reasons=["a"] * 9)),
    "one reason too long": ("reasons_too_large", lambda w: _fresh(w, reasons=["x" * 201])),
    "reasons too many bytes": ("reasons_too_large", lambda w: _fresh(w, reasons=["é" * 150] * 4)),
    "reasons as one string": ("invalid_reasons", lambda w: _fresh(w, reasons="artifacts")),
    "non-UTF-8 bytes": ("invalid_text", lambda w: _fresh(w, reasons=[b"\xff\xfe bad"])),
    "lone surrogate": ("invalid_text", lambda w: _fresh(w, reasons=["ok \udcff"])),
    "NUL": ("invalid_text", lambda w: _fresh(w, reasons=["a\x00b"])),
    "ANSI escape": ("invalid_text", lambda w: _fresh(w, reasons=["\x1b[31mred"])),
    "bidi override": ("invalid_text", lambda w: _fresh(w, reasons=["\u202egnp.exe"])),
    "negative time to vote": ("invalid_time_to_vote", lambda w: _fresh(w, time_to_vote_ms=-5)),
    "unknown rater": ("unknown_rater", lambda w: _fresh(w, rater="r_nobody")),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_with_its_reason_and_changes_nothing(world: World, case: str) -> None:
    code, make = BAD[case]
    kwargs = make(world)
    before = table_state(world.store)
    with pytest.raises(VoteRejected) as err:
        world.store.record_vote(**kwargs)
    assert err.value.reason_code == code
    assert isinstance(err.value, ValueError) and code in str(err.value)
    assert table_state(world.store) == before


def test_deleted_rater_is_refused_and_their_votes_are_gone(world: World) -> None:
    kept = world.store.record_vote(**_fresh(world, rater="r_bob"))
    world.store.record_vote(**_fresh(world))
    world.store.record_vote(**_fresh(world))
    assert world.store.request_deletion("r_alice") == 2
    assert [v.vote_id for v in world.store.votes()] == [kept.vote_id]
    kwargs = _fresh(world)
    before = table_state(world.store)
    with pytest.raises(VoteRejected) as err:
        world.store.record_vote(**kwargs)
    assert err.value.reason_code == "rater_deleted"
    assert table_state(world.store) == before
    with pytest.raises(InputRejected):
        world.store.set_rater_status("r_alice", "active")  # deletion is final
    assert world.store.ensure_rater("r_alice").status == "deleted"


def test_control_pairs_record_the_broken_side_and_whether_the_rater_passed(world: World) -> None:
    with pytest.raises(ValueError, match="control_bad_side"):
        issue(world, kind="on_policy", control_bad_side="left")
    with pytest.raises(ValueError, match="control_bad_side"):
        issue(world, kind="control")
    ok = issue(world, kind="control", control_bad_side="left")
    bad = issue(world, kind="control", control_bad_side="left", session="s2")
    assert world.store.pair(ok.pair_id).control_bad_side == "left"
    assert world.store.record_vote(ok.token, "s1", "right", "r_alice", now=T0).control_passed is True
    assert world.store.record_vote(bad.token, "s2", "left", "r_bob", now=T0).control_passed is False
    assert world.store.trainable_votes(now=T0) == []  # control pairs never reach training
    stats = {r["rater"]: r for r in world.store.rater_stats()}
    assert (stats["r_alice"]["control_votes"], stats["r_alice"]["control_passed"]) == (1, 1)
    assert (stats["r_bob"]["control_votes"], stats["r_bob"]["control_passed"]) == (1, 0)


def test_pair_checks(world: World) -> None:
    with pytest.raises(ValueError, match="cross_version needs"):
        world.store.issue_pair(world.prompt_id, world.base_img, world.base_img2, "cross_version", "s1")
    with pytest.raises(ValueError, match="on_policy one"):
        world.store.issue_pair(world.prompt_id, world.base_img, world.v1_img, "on_policy", "s1")
    with pytest.raises(InputRejected):
        world.store.issue_pair(world.prompt_id, world.base_img, world.v1_img, "pairwise", "s1")
    other = world.store.add_prompt("a small blue square")
    with pytest.raises(ValueError, match="generated for prompt"):
        world.store.issue_pair(other, world.base_img, world.v1_img, "cross_version", "s1")
    with pytest.raises(InputRejected):
        world.store.issue_pair(world.prompt_id, world.base_img, world.v1_img, "cross_version", "10.0.0.1")


def test_shadow_exclusion_flags_quarantine_and_trainable_votes(world: World) -> None:
    a = world.store.record_vote(**_fresh(world))
    b = world.store.record_vote(**_fresh(world, rater="r_bob"))
    world.store.set_rater_status("r_bob", "shadow_excluded", "left-clicker")
    c = world.store.record_vote(**_fresh(world, rater="r_bob"))  # accepted, silently excluded
    assert world.store.vote(c.vote_id).excluded_reason == "rater_shadow_excluded"
    assert [v.vote_id for v in world.store.trainable_votes(now=T0)] == [a.vote_id]
    world.store.set_rater_status("r_bob", "active")
    assert [v.vote_id for v in world.store.trainable_votes(now=T0)] == [a.vote_id, b.vote_id]
    world.store.flag_vote(a.vote_id, "duplicate_burst")
    assert [v.vote_id for v in world.store.trainable_votes(now=T0)] == [b.vote_id]
    world.store.flag_vote(a.vote_id, None)
    assert [v.vote_id for v in world.store.trainable_votes(since_vote_id=a.vote_id, now=T0)] == [b.vote_id]
    late = world.store.record_vote(**_fresh(world, now=T0 + timedelta(minutes=5)))
    ids = [v.vote_id for v in world.store.trainable_votes(quarantine_s=600, now=T0 + timedelta(minutes=11))]
    assert ids == [a.vote_id, b.vote_id]
    ids = [v.vote_id for v in world.store.trainable_votes(quarantine_s=600, now=T0 + timedelta(minutes=16))]
    assert ids == [a.vote_id, b.vote_id, late.vote_id]


def test_rater_trust_pseudonyms_and_identifier_rules(world: World) -> None:
    assert world.store.set_rater_trust("r_alice", 0.25).trust == 0.25
    with pytest.raises(ValueError):
        world.store.set_rater_trust("r_alice", 1.5)
    p1, p2 = pseudonymize("alice@example.org", "s" * 16), pseudonymize("alice@example.org", "t" * 16)
    assert p1 != p2 and p1.startswith("r_") and "alice" not in p1
    assert world.store.ensure_rater(p1).pseudonym == p1
    for raw in ("alice@example.org", "10.1.2.3", "Mozilla/5.0 (X11)", "", "x" * 129):
        with pytest.raises(InputRejected):
            world.store.ensure_rater(raw)  # no e-mail, IP or user agent can be stored as an identifier
    with pytest.raises(ValueError, match="salt"):
        pseudonymize("alice", "short")


def test_adapter_versions_and_training_runs(world: World) -> None:
    s = world.store
    v1 = s.register_adapter_version("v1", "base", "snap-1", {"judge": 0.8})
    assert (v1.parent, v1.snapshot_id, v1.status, v1.metrics) == ("base", "snap-1", "candidate", {"judge": 0.8})
    with pytest.raises(InputRejected, match="immutable"):
        s.register_adapter_version("v1", "base", "snap-1")
    with pytest.raises(InputRejected, match="not registered"):
        s.register_adapter_version("v3", "v2", "snap-2")
    assert s.set_adapter_status("v1", "published", {"win_rate": 0.6}).metrics == {"judge": 0.8, "win_rate": 0.6}
    run = s.start_training_run("snap-2", "v1", {"lr": 1e-5, "objective": "ncp-dpo"})
    done = s.finish_training_run(run, "succeeded", metrics={"loss": 0.65}, adapter_version="v2")
    assert (done.status, done.adapter_version, done.config["objective"], done.finished is not None) == (
        "succeeded",
        "v2",
        "ncp-dpo",
        True,
    )
    with pytest.raises(InputRejected, match="already finished"):
        s.finish_training_run(run, "failed", "again")
    crashed = s.start_training_run("snap-3", "v1")
    assert s.mark_running_runs_failed("app restarted while training") == 1
    assert s.training_run(crashed).status == "failed"
    assert s.training_run(crashed).reason == "app restarted while training"
    assert [r.run_id for r in s.training_runs()] == [crashed, run]


def test_memory_store_and_prompt_rules(tmp_path) -> None:
    with FeedbackStore(":memory:", data_dir=tmp_path) as store:
        a = store.add_prompt("  a red circle ", "typed")
        assert store.add_prompt("a red circle") == a  # same text, same id
        assert store.prompt(a).source == "typed"
        for bad in ("", "x" * 1001, "a\x07bell"):
            with pytest.raises(InputRejected):
                store.add_prompt(bad)
        with pytest.raises(ValueError, match="not under the data dir"):
            store.add_image(
                a, "/etc/passwd", base_model="m", seed=0, scheduler="d", steps=1, guidance=1, width=8, height=8
            )


def test_after_a_restart_open_pairs_and_replays_resolve_from_the_database(tmp_path) -> None:
    path = tmp_path / "restart.duckdb"
    with FeedbackStore(path) as store:
        w = make_world(store)
        store.ensure_rater("r_alice")
        voted = issue(w)
        first = store.record_vote(voted.token, "s1", "left", "r_alice", now=T0)
        pending = issue(w)
    with FeedbackStore(path) as store:  # fresh process state: nothing cached
        assert store.record_vote(voted.token, "s1", "left", "r_alice", now=T0) == first
        for kwargs, code in (
            (dict(token=voted.token, session="s1", outcome="tie"), "conflicting_vote"),
            (dict(token=voted.token, session="s9", outcome="left"), "wrong_session"),
        ):
            with pytest.raises(VoteRejected) as err:
                store.record_vote(rater="r_alice", now=T0, **kwargs)
            assert err.value.reason_code == code
        receipt = store.record_vote(pending.token, "s1", "right", "r_alice", now=T0)
        assert receipt.vote_id == first.vote_id + 1 and receipt.chosen_image_id == w.v1_img


def test_issue_pairs_is_all_or_nothing(world: World) -> None:
    from feedback_store import PairSpec

    good = PairSpec(world.prompt_id, world.base_img, world.v1_img, "cross_version", "s1")
    bad = PairSpec(world.prompt_id, world.base_img, world.base_img2, "cross_version", "s1")
    before = table_state(world.store)
    with pytest.raises(ValueError):
        world.store.issue_pairs([good, bad])
    assert table_state(world.store) == before
    issued = world.store.issue_pairs([good] * 3)
    assert len({p.pair_id for p in issued}) == 3 and len({p.token for p in issued}) == 3
