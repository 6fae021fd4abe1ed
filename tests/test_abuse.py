"""Abuse resistance of the vote path (jobs/abuse.py): rate limits and daily caps refuse and store nothing, too-fast
votes are stored flagged, control pairs set trust and shadow-exclude, the anomaly rules flag the right raters and
never an honest one, and shadow-excluded votes never reach the export. A real DuckDB file and the real
ArenaService.vote; pairs are issued through the store (the vote path never generates), so no pipeline is needed.

    python -m pytest -q tests/test_abuse.py
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from store_fixtures import table_state

from feedback_store import FeedbackStore, VoteRejected
from feedback_store.export import export_snapshot
from jobs.abuse import AbuseConfig, VoteGuard, client_address, detect
from jobs.arena import ArenaService
from jobs.prompts import Blocklist, PoolPrompt, PromptPool
from jobs.registry import AdapterRegistry

OFF = {"votes_per_minute": 0, "daily_cap": 0, "min_vote_ms": 0, "review_every_votes": 0}


class FakeClock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


class World:
    """A store on a real file, image pairs without pixels, and the real ArenaService.vote behind a VoteGuard."""

    def __init__(self, tmp: Path, **config: object) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.store = FeedbackStore(tmp / "arena.duckdb")
        self.clock = FakeClock()
        self.guard = VoteGuard(self.store, AbuseConfig(**{**OFF, **config}), clock=self.clock)  # type: ignore[arg-type]
        pool = PromptPool([PoolPrompt("a red circle", "one object")])
        registry = AdapterRegistry(tmp / "adapters")
        self.arena = ArenaService(self.store, None, registry, tmp, pool, Blocklist(tmp / "blocklist.txt"), guard=self.guard)  # type: ignore[arg-type]  # fmt: skip
        self.images: list[tuple[int, int]] = []

    def image_pair(self) -> tuple[int, int]:
        """A new prompt with two base images (distinct sha256s)."""
        n = len(self.images)
        pid = self.store.add_prompt(f"prompt {n}", "pool", "test")
        ids = tuple(
            self.store.add_image(pid, f"images/{n}-{k}.png", base_model="tiny", seed=k, scheduler="ddim", steps=1,
                                 guidance=1.0, width=8, height=8, sha256=hashlib.sha256(f"{n}-{k}".encode()).hexdigest())
            for k in (0, 1)
        )  # fmt: skip
        self.images.append(ids)  # type: ignore[arg-type]
        return ids  # type: ignore[return-value]

    def issue(self, session: str, pair: tuple[int, int] | None = None, control: str | None = None) -> str:
        left, right = pair or self.image_pair()
        pid = self.store.image(left).prompt_id
        kind = "control" if control else "on_policy"
        return self.store.issue_pair(pid, left, right, kind, session, control_bad_side=control).token

    def vote(self, rater: str, outcome: str = "left", ms: int | None = 3000, control: str | None = None):
        return self.arena.vote(rater, self.issue(rater, control=control), outcome, rater, time_to_vote_ms=ms)

    def seed(self, rater: str, pair: tuple[int, int], outcome: str, ms: int = 3000) -> None:
        """A vote straight through the store (fast: no guard), for the anomaly rules."""
        self.store.ensure_rater(rater)
        self.store.record_vote(self.issue(rater, pair), rater, outcome, rater, time_to_vote_ms=ms)


@pytest.fixture
def world(tmp_path: Path):
    worlds: list[World] = []

    def make(**config: object) -> World:
        worlds.append(World(tmp_path / str(len(worlds)), **config))
        return worlds[-1]

    yield make
    for w in worlds:
        w.guard.join()
        w.store.close()


def test_rate_limit_refuses_with_a_code_and_stores_nothing(world) -> None:
    w = world(votes_per_minute=6, burst=3)
    for _ in range(3):
        w.vote("r_burst")
    token = w.issue("r_burst")
    before = table_state(w.store)
    with pytest.raises(VoteRejected) as err:
        w.arena.vote("r_burst", token, "left", "r_burst", time_to_vote_ms=3000)
    assert (
        err.value.reason_code == "rate_limited"
        and "per minute" in err.value.message
        and "Wait 10 s" in err.value.message
    )
    assert table_state(w.store) == before  # refused: no vote, no rater change
    w.clock.t += 10  # 6 per minute: one vote back every 10 s
    assert w.arena.vote("r_burst", token, "left", "r_burst", time_to_vote_ms=3000).vote_id
    with pytest.raises(VoteRejected, match="rate_limited"):
        w.vote("r_burst")
    w.vote("r_other")  # limits are per rater


def test_address_limit_spans_raters_refills_and_stores_nothing(world) -> None:
    """The per-address bucket counts every attempt from an address whatever rater (session) it claims; refused
    attempts store nothing; it refills at its rate; other addresses and address-less calls are not affected."""
    w = world(address_votes_per_minute=6, address_burst=2)
    for rater in ("r_a", "r_b"):
        w.arena.vote(rater, w.issue(rater), "left", rater, time_to_vote_ms=3000, address="198.51.100.1")
    token = w.issue("r_c")
    before = table_state(w.store)
    with pytest.raises(VoteRejected) as err:
        w.arena.vote("r_c", token, "left", "r_c", time_to_vote_ms=3000, address="198.51.100.1")
    assert err.value.reason_code == "address_rate_limited" and "Wait 10 s" in err.value.message
    assert table_state(w.store) == before
    assert w.arena.vote("r_c", token, "left", "r_c", time_to_vote_ms=3000, address="198.51.100.2").vote_id
    w.vote("r_d")  # no address (e.g. a local script path): only the per-rater limits apply
    w.clock.t += 10
    w.arena.vote("r_e", w.issue("r_e"), "left", "r_e", time_to_vote_ms=3000, address="198.51.100.1")
    assert "198.51.100.1" not in repr(w.guard._addresses)  # keyed by an HMAC, not the address


def test_client_address_trusts_only_the_proxy_appended_entries() -> None:
    assert client_address("10.0.0.5", None, 0) == "10.0.0.5"
    assert client_address("10.0.0.5", "203.0.113.9", 0) == "10.0.0.5"  # no proxy: the header is the client's
    assert client_address("10.0.0.5", "203.0.113.9", 1) == "203.0.113.9"
    assert client_address("10.0.0.5", "6.6.6.6, 203.0.113.9", 1) == "203.0.113.9"  # forged left part ignored
    assert client_address("10.0.0.5", "6.6.6.6, 203.0.113.9, 10.1.1.1", 2) == "203.0.113.9"
    assert client_address("10.0.0.5", "203.0.113.9", 2) == "10.0.0.5"  # shorter than the proxy chain: the peer
    assert client_address(None, None, 1) == "unknown"


def test_daily_cap_counts_stored_votes_survives_a_restart_and_resets_next_utc_day(world) -> None:
    w = world(daily_cap=3)
    with pytest.raises(VoteRejected, match="unknown_token"):  # refused by the store: does not count
        w.arena.vote("r_cap", "Z" * 43, "left", "r_cap", time_to_vote_ms=3000)
    for _ in range(3):
        w.vote("r_cap")
    token = w.issue("r_cap")
    before = table_state(w.store)
    with pytest.raises(VoteRejected) as err:
        w.arena.vote("r_cap", token, "left", "r_cap", time_to_vote_ms=3000)
    assert err.value.reason_code == "daily_cap" and "00:00 UTC" in err.value.message
    assert table_state(w.store) == before
    restarted = VoteGuard(w.store, w.guard.config, clock=w.clock)  # a new process reads today's count back
    w.arena.guard = restarted
    with pytest.raises(VoteRejected, match="daily_cap"):
        w.arena.vote("r_cap", token, "left", "r_cap", time_to_vote_ms=3000)
    w.clock.t += 86400
    assert w.arena.vote("r_cap", token, "left", "r_cap", time_to_vote_ms=3000).vote_id


def test_too_fast_votes_succeed_for_the_rater_but_are_stored_flagged(world) -> None:
    w = world(min_vote_ms=1500)
    fast, slow, unknown = w.vote("r_fast", ms=400), w.vote("r_fast", ms=1500), w.vote("r_fast", ms=None)
    assert fast.vote_id and fast.outcome == "left"  # the rater sees a normal reveal
    assert w.store.vote(fast.vote_id).excluded_reason == "too_fast"
    assert w.store.vote(slow.vote_id).excluded_reason is None and w.store.vote(unknown.vote_id).excluded_reason is None
    assert {v.vote_id for v in w.store.trainable_votes()} == {slow.vote_id, unknown.vote_id}


def test_control_pairs_set_trust_and_shadow_exclude_a_careless_rater(world) -> None:
    w = world(min_trust=0.5, min_control_votes=5)
    early = w.vote("r_careless")  # before any control vote: trainable, until the rater is excluded
    trusts = []
    for i in range(5):  # the broken image is on the right: "left" passes. Passes 1 of 5.
        w.vote("r_careless", "left" if i == 0 else "right", control="right")
        w.vote("r_careful", "left", control="right")
        trusts.append(w.store.rater("r_careless").trust)
    # Beta(2, 1) posterior mean: (2 + passed) / (3 + n)
    assert trusts == pytest.approx([3 / 4, 3 / 5, 3 / 6, 3 / 7, 3 / 8])
    careless, careful = w.store.rater("r_careless"), w.store.rater("r_careful")
    assert (
        careless.status == "shadow_excluded"
        and careless.status_reason == "low_trust: passed 1/5 control pairs (trust 0.38)"
    )
    assert careful.status == "active" and careful.trust == pytest.approx(7 / 8)
    later = w.vote("r_careless")  # accepted as usual: nothing tells the rater
    assert later.vote_id and w.store.vote(later.vote_id).excluded_reason == "rater_shadow_excluded"
    trainable = {v.vote_id for v in w.store.trainable_votes()}
    assert early.vote_id not in trainable and later.vote_id not in trainable
    good = w.vote("r_careful")
    assert good.vote_id in {v.vote_id for v in w.store.trainable_votes()}


def _seed_crowd(w: World) -> None:
    """Honest raters h1..h3 agree; `contrarian` picks the other image of the same pairs (sides vary per pair);
    `lefty` always votes left and `speedy` in 0.6 s, each on images nobody else rated. h3 strays on two pairs."""
    for j in range(12):
        a, b = w.image_pair()
        order = (a, b) if j % 2 else (b, a)  # the same images, shown in either order
        good = "left" if order[0] == a else "right"
        bad = "right" if good == "left" else "left"
        for rater in ("h1", "h2", "h3", "contrarian"):
            choice = bad if rater == "contrarian" or (rater == "h3" and j < 2) else good
            w.seed(rater, order, choice)
    for j in range(24):
        w.seed("lefty", w.image_pair(), "left")
        w.seed("speedy", w.image_pair(), ("left", "right", "tie")[j % 3], ms=600)


def test_anomaly_rules_flag_the_right_raters_and_never_an_honest_one(world) -> None:
    w = world()
    _seed_crowd(w)
    agreement = {a["rater"]: a for a in w.store.rater_agreement()}
    assert agreement["contrarian"]["agreement"] == 0.0 and agreement["contrarian"]["consensus_pairs"] == 12
    # Where h3 strays, the others' majority (h3 + contrarian) is wrong, so h1 and h2 "disagree" there: 10/12 each.
    assert [agreement[h]["agreement"] for h in ("h1", "h2", "h3")] == pytest.approx([10 / 12] * 3)

    flags = {f.rater: f for f in w.guard.review()}
    assert {r: f.rule for r, f in flags.items()} == {
        "speedy": "too_fast",
        "lefty": "one_side",
        "contrarian": "low_agreement",
    }
    assert flags["lefty"].detail == "chose left in 100% of 24 votes"
    for rater in ("h1", "h2", "h3"):
        assert w.store.rater(rater).status == "active"
    for rater, flag in flags.items():
        record = w.store.rater(rater)
        assert (record.status, record.status_reason) == ("shadow_excluded", flag.reason)
    assert w.guard.review() == []  # excluded raters are not flagged again

    # The export (what the trainer reads) has only the honest raters' votes; the others' stay stored, for audits.
    snap = export_snapshot(w.store, w.store.data_dir / "snapshots", images=False, eval_fraction=0.0)
    assert set(pq.read_table(snap.path / "train.parquet").column("rater").to_pylist()) == {"h1", "h2", "h3"}
    assert {v.rater for v in w.store.votes()} == {"h1", "h2", "h3", *flags}
    assert {v.rater for v in w.store.trainable_votes()} == {"h1", "h2", "h3"}


def test_detect_needs_enough_evidence() -> None:
    cfg = AbuseConfig()
    row = {"rater": "r", "status": "active", "votes": 19, "control_votes": 0, "control_passed": 0, "left_share": 1.0,
           "tie_share": 0.0, "both_bad_share": 0.0, "median_time_to_vote_ms": 100.0}  # fmt: skip
    assert detect([row], [{"rater": "r", "consensus_pairs": 9, "agreements": 0, "agreement": 0.0}], cfg) == []
    right = row | {"votes": 20, "left_share": 0.05, "median_time_to_vote_ms": 2000.0}
    assert [f.reason for f in detect([right], [], cfg)] == ["one_side: chose right in 95% of 20 votes"]
    assert detect([row | {"status": "shadow_excluded", "votes": 50}], [], cfg) == []


def test_review_runs_in_the_background_every_k_votes(world) -> None:
    w = world(review_every_votes=4, min_rule_votes=4)
    for _ in range(4):
        w.vote("r_lefty", "left")
    w.guard.join(timeout=30)
    assert w.store.rater("r_lefty").status == "shadow_excluded"
    assert w.store.rater("r_lefty").status_reason == "one_side: chose left in 100% of 4 votes"


def test_config_checks_teach() -> None:
    with pytest.raises(ValueError, match="burst must be >= 1"):
        AbuseConfig(burst=0)
    with pytest.raises(ValueError, match="min_trust must be in"):
        AbuseConfig(min_trust=2.0)
    assert AbuseConfig().trust(0, 0) == pytest.approx(2 / 3)
