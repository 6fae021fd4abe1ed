"""Abuse resistance of the vote path: rate limits, daily caps, too-fast votes, trust from control pairs, anomalous
raters, shadow exclusion. The loop turns votes into weights, so a poisoned vote is worse than a bad leaderboard entry.

    guard = VoteGuard(store, AbuseConfig())                      # ArenaService(..., guard=guard) calls guard.vote
    receipt = guard.vote(rater, time_to_vote_ms, record)         # record(excluded_reason) -> VoteReceipt
    flags = guard.review()                                       # anomaly rules over rater_stats; shadow-excludes

What each defence does (DESIGN.md "Abuse"; issue 8):
- Refused before anything is stored (VoteRejected with code "rate_limited" or "daily_cap" and a message the app
  shows): more than `votes_per_minute` (token bucket of `burst` votes) or more than `daily_cap` votes in a UTC day.
  The daily count is read back from the store the first time a rater is seen each day, so a restart does not reset
  it; an identical retry of an accepted vote counts again (conservative).
- Per client address (off unless `address_votes_per_minute` is set): a token bucket of `address_burst` votes per
  network address, counted over ALL vote attempts from it, so a bot that rotates session ids (new pseudonyms, fresh
  per-rater limits) still hits it; refused with code "address_rate_limited". The address is never stored: the
  limiter keys an HMAC of it under a random per-process salt, in memory. Which address is the client's is
  `client_address` (behind a proxy, the entry the nearest `trusted_proxy_hops` proxies appended to X-Forwarded-For;
  a client can forge the rest of that header). Shared addresses (offices, mobile carriers) share the bucket, so the
  rate is per network, not per person: set it several times the per-rater rate.
- Accepted but stored flagged "too_fast" (never trained on): a vote sooner than `min_vote_ms` after its pair was
  issued (time_to_vote_ms is measured by the server).
- Trust: each control (attention-check) vote updates the rater's trust to the posterior mean of its pass rate under
  a Beta(a, b) prior, (a + passed) / (a + b + n); below `min_trust` after at least `min_control_votes` control
  votes, the rater is shadow-excluded.
- Anomalies (`review`, every `review_every_votes` accepted votes in a background thread, or on demand): median time
  to vote under `min_median_vote_ms`, one side chosen in more than `max_side_share` of at least `min_rule_votes`
  votes, agreement with the other raters' majority under `min_agreement` on at least `min_consensus_pairs` pairs.
Shadow exclusion (`set_rater_status(..., "shadow_excluded", reason)`): the rater keeps seeing success; all their
votes, earlier ones included, stay stored but leave training, statistics and the export. Nothing tells the rater.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from feedback_store import FeedbackStore, InputRejected, VoteReceipt, VoteRejected

logger = logging.getLogger(__name__)

ABUSE_REJECTION_CODES = ("rate_limited", "daily_cap", "address_rate_limited")
DAY_S = 86400


@dataclass(frozen=True)
class AbuseConfig:
    """Abuse defences of the vote path (app.py maps env vars onto it; `ArenaConfig.abuse=None` turns them off)."""

    votes_per_minute: float = 30.0  # sustained vote rate per rater (0: no rate limit)
    burst: int = 10  # votes a rater may cast back to back before the rate applies
    daily_cap: int = 1000  # votes per rater per UTC day (0: no cap)
    min_vote_ms: int = 1500  # a vote sooner than this after its pair was issued is stored flagged "too_fast"
    trust_prior: tuple[float, float] = (2.0, 1.0)  # Beta(a, b) prior of the control pass rate (mean 2/3)
    min_trust: float = 0.5  # shadow-exclude below this trust ...
    min_control_votes: int = 5  # ... once the rater has this many control votes
    review_every_votes: int = 50  # run the anomaly review after this many accepted votes (0: only on demand)
    min_rule_votes: int = 20  # votes a rater needs before the speed and side rules judge it
    min_median_vote_ms: int = 1500  # too fast: median time to vote under this
    max_side_share: float = 0.9  # always one side: left (or right) share above this
    min_consensus_pairs: int = 10  # pairs with a majority of >= 2 other raters before agreement is judged
    min_agreement: float = 0.3  # disagreement: agreement with the others' majority under this
    max_tracked_raters: int = 100_000  # in-memory limiter entries (the oldest are forgotten, then re-read)
    address_votes_per_minute: float = 0.0  # sustained vote attempts per client address (0: no address limit)
    address_burst: int = 60  # attempts an address may make back to back before its rate applies
    trusted_proxy_hops: int = 0  # proxies in front of the app that append to X-Forwarded-For (Spaces: 1)

    def __post_init__(self) -> None:
        if self.votes_per_minute < 0 or self.daily_cap < 0 or self.min_vote_ms < 0 or self.review_every_votes < 0:
            raise ValueError("votes_per_minute, daily_cap, min_vote_ms and review_every_votes must be >= 0 (0: off).")
        if self.burst < 1 or self.address_burst < 1:
            raise ValueError(f"burst and address_burst must be >= 1, got {self.burst} and {self.address_burst}.")
        if self.address_votes_per_minute < 0 or self.trusted_proxy_hops < 0:
            raise ValueError("address_votes_per_minute (0: off) and trusted_proxy_hops must be >= 0.")
        if min(self.trust_prior) <= 0:
            raise ValueError(
                f"trust_prior must be two positive Beta parameters, e.g. (2.0, 1.0); got {self.trust_prior}"
            )
        for name in ("min_trust", "max_side_share", "min_agreement"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if min(self.min_control_votes, self.min_rule_votes, self.min_consensus_pairs, self.max_tracked_raters) < 1:
            raise ValueError(
                "min_control_votes, min_rule_votes, min_consensus_pairs, max_tracked_raters must be >= 1."
            )

    def trust(self, controls: int, passed: int) -> float:
        """Posterior mean of the control pass rate: (a + passed) / (a + b + controls)."""
        a, b = self.trust_prior
        return (a + passed) / (a + b + controls)


@dataclass(frozen=True)
class Flag:
    """A rater an anomaly rule (too_fast | one_side | low_agreement | low_trust) flagged, and why."""

    rater: str
    rule: str
    detail: str

    @property
    def reason(self) -> str:
        return f"{self.rule}: {self.detail}"


def detect(stats: list[dict], agreement: list[dict], cfg: AbuseConfig) -> list[Flag]:
    """The anomaly rules over `store.rater_stats()` and `store.rater_agreement()`; active raters only. Pure."""
    flags: list[Flag] = []
    active = {s["rater"] for s in stats if s["status"] == "active"}
    for s in stats:
        rater, n = s["rater"], s["votes"]
        if rater not in active:
            continue
        median = s["median_time_to_vote_ms"]
        if n >= cfg.min_rule_votes and median is not None and median < cfg.min_median_vote_ms:
            flags.append(Flag(rater, "too_fast", f"median time to vote {median:.0f} ms over {n} votes"))
            continue
        right = 1.0 - s["left_share"] - s["tie_share"] - s["both_bad_share"] if n else 0.0
        side, share = ("left", s["left_share"]) if n and s["left_share"] >= right else ("right", right)
        if n >= cfg.min_rule_votes and share > cfg.max_side_share:
            flags.append(Flag(rater, "one_side", f"chose {side} in {share:.0%} of {n} votes"))
            continue
        controls, passed = s["control_votes"], s["control_passed"]
        trust = cfg.trust(controls, passed)
        if controls >= cfg.min_control_votes and trust < cfg.min_trust:
            flags.append(Flag(rater, "low_trust", f"passed {passed}/{controls} control pairs (trust {trust:.2f})"))
    flagged = {f.rater for f in flags}
    for a in agreement:
        if a["rater"] in active and a["rater"] not in flagged and a["consensus_pairs"] >= cfg.min_consensus_pairs:
            if a["agreement"] < cfg.min_agreement:
                detail = f"agreed with the majority on {a['agreements']}/{a['consensus_pairs']} pairs"
                flags.append(Flag(a["rater"], "low_agreement", detail))
    return flags


def client_address(peer: str | None, forwarded_for: str | None, trusted_hops: int) -> str:
    """The client's address: with `trusted_hops` proxies in front, the entry the outermost trusted one appended to
    X-Forwarded-For (counted from the right; entries further left come from the client and can be forged); else, or
    when the header is shorter than that, the socket peer."""
    if trusted_hops > 0 and forwarded_for:
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        if len(hops) >= trusted_hops:
            return hops[-trusted_hops]
    return peer or "unknown"


@dataclass
class _Limit:
    tokens: float
    last: float
    day: int
    day_votes: int

    def take(self, now: float, per_minute: float, burst: int) -> int:
        """Token bucket: refill at `per_minute`, capped at `burst`, then take one token. Returns 0 when taken, else
        the whole seconds until one is available (nothing taken)."""
        rate = per_minute / 60.0
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.last) * rate)
        self.last = now
        if self.tokens < 1.0:
            return math.ceil((1.0 - self.tokens) / rate)
        self.tokens -= 1.0
        return 0


class VoteGuard:
    """The abuse defences around one store (see the module docstring). Thread-safe; `clock` (epoch seconds) is
    injectable so tests need not sleep."""

    def __init__(self, store: FeedbackStore, config: AbuseConfig, clock: Callable[[], float] = time.time) -> None:
        self.store, self.config, self.clock = store, config, clock
        self._limits: OrderedDict[str, _Limit] = OrderedDict()
        self._addresses: OrderedDict[str, _Limit] = OrderedDict()  # HMAC(address) -> bucket; never persisted
        self._address_salt = secrets.token_bytes(32)  # per process: keys cannot be linked across restarts
        self._lock = threading.Lock()
        self._since_review = 0
        self._review_lock = threading.Lock()
        self._review_thread: threading.Thread | None = None

    # -- the vote path ----------------------------------------------------------------------------------------------
    def vote(
        self,
        rater: str,
        time_to_vote_ms: int | None,
        record: Callable[[str | None], VoteReceipt],
        address: str | None = None,
    ) -> VoteReceipt:
        """Admit (or refuse) the vote, record it through `record(excluded_reason)`, then update trust. `address`: the
        client's network address (`client_address`), for the per-address limit; None skips that limit."""
        if address is not None and self.config.address_votes_per_minute:
            self._admit_address(address)
        self._admit(rater)
        fast = time_to_vote_ms is not None and time_to_vote_ms < self.config.min_vote_ms
        try:
            receipt = record("too_fast" if fast else None)
        except BaseException:
            self._refund(rater)  # not stored: it does not count against the daily cap
            raise
        if receipt.control_passed is not None:
            self.update_trust(rater)
        self._count_for_review()
        return receipt

    def _admit(self, rater: str) -> None:
        cfg, now = self.config, self.clock()
        day = int(now // DAY_S)
        with self._lock:
            limit = self._limits.get(rater)
        if cfg.daily_cap and (limit is None or limit.day != day):  # first vote today (or since a restart): count
            stored = self.store.rater_votes_since(rater, datetime.fromtimestamp(day * DAY_S, UTC))
        else:
            stored = 0
        with self._lock:
            limit = self._limits.get(rater)
            if limit is None:
                limit = self._limits[rater] = _Limit(float(cfg.burst), now, day, stored)
            elif limit.day != day:
                limit.day, limit.day_votes = day, stored
            self._limits.move_to_end(rater)
            while len(self._limits) > cfg.max_tracked_raters:
                self._limits.popitem(last=False)
            if cfg.daily_cap and limit.day_votes >= cfg.daily_cap:
                raise VoteRejected(
                    "daily_cap",
                    f"You reached today's limit of {cfg.daily_cap} votes. Thank you! Voting reopens at 00:00 UTC.",
                )
            if cfg.votes_per_minute and (wait := limit.take(now, cfg.votes_per_minute, cfg.burst)):
                raise VoteRejected(
                    "rate_limited",
                    f"Too many votes: at most {cfg.votes_per_minute:g} per minute. Wait {wait} s and vote again.",
                )
            limit.day_votes += 1  # reserved now, so concurrent votes cannot overshoot the cap

    def _admit_address(self, address: str) -> None:
        """The per-address token bucket; every attempt counts (refused and retried ones too)."""
        cfg, now = self.config, self.clock()
        key = hmac.new(self._address_salt, address.encode(), hashlib.sha256).hexdigest()
        with self._lock:
            limit = self._addresses.get(key)
            if limit is None:
                limit = self._addresses[key] = _Limit(float(cfg.address_burst), now, 0, 0)
            self._addresses.move_to_end(key)
            while len(self._addresses) > cfg.max_tracked_raters:
                self._addresses.popitem(last=False)
            if wait := limit.take(now, cfg.address_votes_per_minute, cfg.address_burst):
                raise VoteRejected(
                    "address_rate_limited",
                    f"Too many votes from your network: at most {cfg.address_votes_per_minute:g} per minute. "
                    f"Wait {wait} s and vote again.",
                )

    def _refund(self, rater: str) -> None:
        with self._lock:
            limit = self._limits.get(rater)
            if limit is not None and limit.day_votes > 0:
                limit.day_votes -= 1

    def update_trust(self, rater: str) -> float:
        """Recompute trust from the rater's control votes (idempotent); shadow-exclude when it is too low."""
        controls, passed = self.store.rater_controls(rater)
        trust = self.config.trust(controls, passed)
        record = self.store.set_rater_trust(rater, trust)
        if controls >= self.config.min_control_votes and trust < self.config.min_trust and record.status == "active":
            flag = Flag(rater, "low_trust", f"passed {passed}/{controls} control pairs (trust {trust:.2f})")
            self._exclude(flag)
        return trust

    # -- anomaly review ---------------------------------------------------------------------------------------------
    def review(self) -> list[Flag]:
        """Run the anomaly rules over every rater and shadow-exclude the flagged ones; returns the flags."""
        with self._review_lock:
            flags = detect(self.store.rater_stats(), self.store.rater_agreement(), self.config)
            for flag in flags:
                self._exclude(flag)
        return flags

    def _exclude(self, flag: Flag) -> None:
        try:
            self.store.set_rater_status(flag.rater, "shadow_excluded", reason=flag.reason)
        except InputRejected as err:
            if err.reason_code != "rater_deleted":  # deleted meanwhile: nothing of theirs is left to exclude
                raise
            return
        logger.warning("rater %s shadow-excluded: %s", flag.rater, flag.reason)

    def _count_for_review(self) -> None:
        every = self.config.review_every_votes
        if not every:
            return
        with self._lock:
            self._since_review += 1
            if self._since_review < every or (self._review_thread and self._review_thread.is_alive()):
                return
            self._since_review = 0
            self._review_thread = threading.Thread(target=self._background_review, name="rater-review", daemon=True)
            self._review_thread.start()

    def _background_review(self) -> None:
        try:
            self.review()
        except Exception:  # a failed review must never fail a vote or stop the app; the next one retries
            logger.exception("rater review failed")

    def join(self, timeout: float | None = None) -> None:
        """Wait for a background review in progress (tests, shutdown)."""
        thread = self._review_thread
        if thread is not None:
            thread.join(timeout)


__all__ = ["ABUSE_REJECTION_CODES", "AbuseConfig", "Flag", "VoteGuard", "client_address", "detect"]
