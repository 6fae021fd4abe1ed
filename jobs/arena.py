"""The arena service: what app.py's handlers call. Pairs out, votes in, versions served.

It joins the generation service (ncp.serving), the feedback store and the adapter registry, so that the UI layer has
no SQL and no tensors. Images are written under `<data_dir>/images/<sha256>.png` before their rows, and a pair is
issued to a session with an unguessable token; a vote names that token.

Pool pairs are shown to up to `ratings_per_pair` different sessions (each with its own token), newest first, while
they are of the serving version and younger than `reuse_max_age_s`. Several ratings of the same images give the
consensus that anomaly detection compares each rater with, and they let one generated pair serve several raters, so
a crowd larger than the generator's pace still gets a pair at once. When the crowd outpaces the generator, a pair may
be shown up to twice `ratings_per_pair` times (the "overflow" showings, counted in the admin status) rather than make a
rater wait for diffusion; `overflow_wait_s=None` turns that off, so `ratings_per_pair` is then a strict maximum.

Bounds (each pair issued stores a row): a session holds at most `max_open_pairs` pairs it has not voted on and that
have not expired (the next request is refused with `too_many_open_pairs` until it votes or they expire, after
`pair_ttl_s`), and pairs never voted on are deleted `unvoted_retention_s` after they expired (checked at most every
`purge_every_s`, on the request path); a pair with a vote is never deleted. Vote reasons are tags from REASON_TAGS
(no free text reaches the store or the export).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from feedback_store import FeedbackStore, InputRejected, VoteReceipt, VoteRejected
from feedback_store.records import MAX_REASONS, check_ident, utcnow
from jobs.abuse import VoteGuard
from jobs.prompts import Blocklist, PromptPool, validate_prompt
from jobs.registry import BASE, AdapterRegistry
from ncp.prefetch import PairPrefetcher
from ncp.serving import GeneratedImage, GenerationPaused, GenerationService, ReadyPair

logger = logging.getLogger(__name__)

REASON_TAGS = ("prompt following", "looks", "artifacts")  # the only vote reasons stored (the UI's checkboxes)


def check_reasons(reasons: object) -> tuple[str, ...]:
    """The vote's reason tags, each once, in REASON_TAGS order; raises VoteRejected for anything else."""
    if isinstance(reasons, str | bytes) or not isinstance(reasons, list | tuple):
        raise VoteRejected("invalid_reasons", f"reasons must be a list of tags from {list(REASON_TAGS)}")
    if len(reasons) > MAX_REASONS:
        raise VoteRejected("reasons_too_large", f"{len(reasons)} reasons given; at most {MAX_REASONS} are allowed")
    unknown = [r for r in reasons if r not in REASON_TAGS]  # `in` on a tuple of str: no hashing of odd types
    if unknown:
        raise VoteRejected(
            "invalid_reasons", f"{unknown[0]!r:.40} is not a reason tag; use any of {list(REASON_TAGS)} or none"
        )
    return tuple(t for t in REASON_TAGS if t in reasons)


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class IssuedPairView:
    """What a rater's browser gets: no version names until the vote (anonymous until voted)."""

    pair_id: int
    token: str
    prompt: str
    left_path: str
    right_path: str
    kind: str


@dataclass(frozen=True)
class VoteResult:
    vote_id: int
    outcome: str
    left_version: str
    right_version: str
    control_passed: bool | None = None  # attention-check pairs only


@dataclass
class _Shown:
    """A pool pair already stored and issued, that more sessions may rate (ids cached: no image rows re-added)."""

    ready: ReadyPair
    prompt_id: int
    left_id: int
    right_id: int
    left_to_show: int
    sessions: set[str] = field(default_factory=set)


class ArenaService:
    def __init__(
        self,
        store: FeedbackStore,
        generation: GenerationService,
        registry: AdapterRegistry,
        data_dir: Path,
        pool: PromptPool,
        blocklist: Blocklist,
        model_check: Callable[[str], None] | None = None,
        prefetch_size: int = 8,
        pair_ttl_s: int = 3600,
        seed: int = 0,
        ratings_per_pair: int = 3,
        reuse_max_age_s: float = 600.0,
        guard: VoteGuard | None = None,
        overflow_wait_s: float | None = 0.05,
        max_open_pairs: int = 20,
        unvoted_retention_s: float = 24 * 3600.0,
        purge_every_s: float = 600.0,
    ) -> None:
        if ratings_per_pair < 1:
            raise ValueError(f"ratings_per_pair must be >= 1, got {ratings_per_pair}")
        if max_open_pairs < 1 or unvoted_retention_s < 0:
            raise ValueError(
                f"max_open_pairs must be >= 1 and unvoted_retention_s >= 0, got {max_open_pairs}, "
                f"{unvoted_retention_s}"
            )
        self.store = store
        self.generation = generation
        self.registry = registry
        self.data_dir = Path(data_dir)
        self.image_dir = self.data_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.pool = pool
        self.blocklist = blocklist
        self.model_check = model_check
        self.pair_ttl_s = pair_ttl_s
        self.guard = guard  # abuse defences of the vote path (jobs/abuse.py); None: none
        self.ratings_per_pair = ratings_per_pair
        self.reuse_max_age_s = reuse_max_age_s
        # When the crowd outpaces the generator: wait this long for a fresh pair, then show a pair once more beyond
        # ratings_per_pair (at most twice as many showings) rather than make the rater wait for diffusion. None: off.
        self.overflow_wait_s = overflow_wait_s
        self.overflow_issued = 0  # showings beyond ratings_per_pair (admin status reports it)
        self._shown: list[_Shown] = []  # newest last
        self._shown_lock = threading.Lock()
        self.max_open_pairs = max_open_pairs
        self.unvoted_retention_s = unvoted_retention_s
        self.purge_every_s = purge_every_s
        self._open: dict[str, dict[str, float]] = {}  # session -> {sha256(token): expiry (time.monotonic)}
        self._open_lock = threading.Lock()
        self._last_purge = time.monotonic()
        self.purged_unvoted = 0  # pairs deleted by the retention rule since start
        self._showings: deque[float] = deque(maxlen=4096)  # time.monotonic() of each pool showing (raters' pace)
        self.paused_refusals = 0  # requests refused because generation was paused and no pair was left
        self.prefetcher = PairPrefetcher(
            generation, pool.draw, self.battle_versions, size=prefetch_size, seed=seed, prepare=self._store_pool_pair
        )
        for version in registry.versions():
            generation.register_version(version, registry.info(version).folder)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve the registry's current version (also after a restart) and start prefetching."""
        current = self.registry.current()
        self.store.mark_running_runs_failed("the app restarted while this run was in progress")
        if current != self.generation.serving_version:
            self.generation.swap_adapter(current)
        self.prefetcher.start()

    def stop(self) -> None:
        self.prefetcher.stop()

    def battle_versions(self) -> list[str]:
        """Versions a cross-version pair may pit against the serving one: base and the kept previous versions."""
        versions = [v for v in self.registry.versions() if self.registry.verify(v)]
        known = set(self.generation.known_versions())
        for v in versions:  # published while the app runs (or by hand): make it servable before battling it
            if v not in known:
                self.generation.register_version(v, self.registry.info(v).folder)
        return [BASE, *versions]

    # -- pairs and votes ---------------------------------------------------------------------------------------------
    def _save_image(self, img: GeneratedImage, prompt_id: int) -> int:
        path = self.image_dir / f"{img.sha256}.png"
        if not path.exists():
            tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_bytes(img.png)
            tmp.replace(path)
        return self.store.add_image(
            prompt_id,
            str(path.relative_to(self.data_dir)),
            base_model=img.base_model,
            seed=img.seed,
            scheduler=img.scheduler,
            steps=img.steps,
            guidance=img.guidance,
            width=img.width,
            height=img.height,
            adapter_version=img.adapter_version,
            sha256=img.sha256,
        )

    def _check_open(self, session: str) -> None:
        """Refuse a session that holds max_open_pairs unexpired pairs without a vote (InputRejected)."""
        now = time.monotonic()
        with self._open_lock:
            mine = self._open.get(session)
            if mine:
                for key in [k for k, expiry in mine.items() if expiry <= now]:
                    del mine[key]
            if mine and len(mine) >= self.max_open_pairs:
                wait = min(mine.values()) - now
                raise InputRejected(
                    "too_many_open_pairs",
                    f"this session has {len(mine)} pairs without a vote (the limit is {self.max_open_pairs}); "
                    f"vote on one of them, or wait {wait:.0f} s until the oldest expires",
                )
            if len(self._open) > 10_000:  # bounded memory: forget sessions whose pairs all expired
                self._open = {k: v for k, v in self._open.items() if any(e > now for e in v.values())}

    def _opened(self, session: str, token: str) -> None:
        with self._open_lock:
            self._open.setdefault(session, {})[_token_key(token)] = time.monotonic() + self.pair_ttl_s

    def _voted(self, session: str, token: str) -> None:
        with self._open_lock:
            mine = self._open.get(session)
            if mine is not None:
                mine.pop(_token_key(token), None)
                if not mine:
                    del self._open[session]

    def purge_unvoted(self, force: bool = False) -> int:
        """The retention rule: delete pairs never voted on that expired more than unvoted_retention_s ago (at most
        every purge_every_s unless `force`). Returns how many rows were deleted."""
        now = time.monotonic()
        if not force and now - self._last_purge < self.purge_every_s:
            return 0
        self._last_purge = now
        n = self.store.purge_unvoted_pairs(utcnow() - timedelta(seconds=self.unvoted_retention_s))
        self.purged_unvoted += n
        if n:
            logger.info("deleted %d pair(s) that expired unvoted more than %.0f s ago", n, self.unvoted_retention_s)
        return n

    def next_pair(self, session: str, prompt: str | None = None) -> IssuedPairView:
        """A pair for this session: from the prefetch queue, or generated now for a typed prompt. Raises
        InputRejected("too_many_open_pairs") when the session holds max_open_pairs pairs it has not voted on, and
        InputRejected("invalid_session") for a session the store would refuse: checked first, so a refused request
        takes no ready pair from the queue and stores no prompt or image."""
        check_ident(session, "session", code="invalid_session")  # the store's rule for issue_pair
        self._check_open(session)
        self.purge_unvoted()
        if prompt:
            text = validate_prompt(prompt, self.blocklist, self.model_check)
            if self.prefetcher.paused:
                self.paused_refusals += 1
                raise InputRejected(
                    "generation_paused",
                    "a training round has the GPU, so typed prompts wait until it ends; vote on ready pairs meanwhile",
                )
            try:
                ready = self.prefetcher.produce_one(text)
            except GenerationPaused as err:
                raise InputRejected("generation_paused", f"{err}; try your prompt again after the round") from None
            source, category = "typed", "typed"
            return self._issue(ready, session, source, category)
        self._showings.append(time.monotonic())
        shown = self._take_shown(session)
        if shown is None and self.overflow_wait_s is not None and self.ratings_per_pair > 1:
            ready = self.prefetcher.try_get(self.overflow_wait_s)
            if ready is not None:
                return self._issue(ready, session, "pool", self.pool.category(ready.prompt), reusable=True)
            shown = self._take_shown(session, overflow=True)
        if shown is not None:
            return self._issue_ids(shown.ready, shown.prompt_id, shown.left_id, shown.right_id, session)
        try:
            ready = self.prefetcher.get()
        except GenerationPaused:  # the round has the card and the queue ran out: a pair shown before, if any
            shown = self._take_shown(session, overflow=True)
            if shown is not None:
                return self._issue_ids(shown.ready, shown.prompt_id, shown.left_id, shown.right_id, session)
            self.paused_refusals += 1
            raise InputRejected(
                "generation_paused", "a training round has the GPU and every ready pair is taken; new pairs follow it"
            ) from None
        category = self.pool.category(ready.prompt)
        return self._issue(ready, session, "pool", category, reusable=True)

    def pace_per_s(self, window_s: float = 600.0) -> float:
        """Pool pairs shown to raters per second over the last `window_s` seconds (0 before any)."""
        now = time.monotonic()
        recent = [t for t in list(self._showings) if now - t <= window_s]
        if not recent:
            return 0.0
        return len(recent) / max(now - recent[0], min(window_s, 60.0))

    def _take_shown(self, session: str, overflow: bool = False) -> _Shown | None:
        """The newest pool pair this session has not seen that may be shown once more (None if there is none);
        `overflow`: also pairs shown ratings_per_pair times already, up to twice that."""
        floor = -self.ratings_per_pair if overflow else 0
        now, epoch = time.time(), self.generation.epoch
        with self._shown_lock:
            # Drop pairs of an older serving version (raters should see the new one) and pairs too old to reuse.
            self._shown = [
                s for s in self._shown if s.ready.epoch == epoch and now - s.ready.made_at < self.reuse_max_age_s
            ]
            for s in reversed(self._shown):
                if session not in s.sessions and s.left_to_show > floor:
                    s.left_to_show -= 1
                    s.sessions.add(session)
                    self.overflow_issued += s.left_to_show < 0  # counted under the lock: handlers run concurrently
                    if s.left_to_show <= -self.ratings_per_pair:
                        self._shown.remove(s)
                    return s
        return None

    def _store_pair(self, ready: ReadyPair, source: str, category: str) -> tuple[int, int, int]:
        prompt_id = self.store.add_prompt(ready.prompt, source=source, category=category)
        return prompt_id, self._save_image(ready.left, prompt_id), self._save_image(ready.right, prompt_id)

    def _store_pool_pair(self, ready: ReadyPair) -> ReadyPair:
        """Prefetch hook: image files and rows are written before any rater asks, so /next_pair only issues a token."""
        return dataclasses.replace(ready, stored=self._store_pair(ready, "pool", self.pool.category(ready.prompt)))

    def _issue(
        self, ready: ReadyPair, session: str, source: str, category: str, reusable: bool = False
    ) -> IssuedPairView:
        ids = ready.stored if isinstance(ready.stored, tuple) else self._store_pair(ready, source, category)
        prompt_id, left_id, right_id = ids
        view = self._issue_ids(ready, prompt_id, left_id, right_id, session)
        if reusable and self.ratings_per_pair > 1:
            with self._shown_lock:
                self._shown.append(_Shown(ready, prompt_id, left_id, right_id, self.ratings_per_pair - 1, {session}))
                del self._shown[: -4 * max(1, self.prefetcher.size)]  # bounded memory
        return view

    def _issue_ids(
        self, ready: ReadyPair, prompt_id: int, left_id: int, right_id: int, session: str
    ) -> IssuedPairView:
        issued = self.store.issue_pair(
            prompt_id,
            left_id,
            right_id,
            ready.kind,
            session,
            ttl_s=self.pair_ttl_s,
            control_bad_side=ready.broken_side,
        )
        self._opened(session, issued.token)
        return IssuedPairView(
            pair_id=issued.pair_id,
            token=issued.token,
            prompt=ready.prompt,
            left_path=str(self.image_dir / f"{ready.left.sha256}.png"),
            right_path=str(self.image_dir / f"{ready.right.sha256}.png"),
            kind=ready.kind,
        )

    def register_rater(self, rater: str) -> None:
        """Make sure the rater's pseudonym is in the store before its first vote (the API calls this when it issues a
        pair; a known rater costs a read, FeedbackStore.ensure_rater). Otherwise a new rater's first vote registers it
        on the way (a refused commit, the registration, the vote again): three commits in the vote's round trip,
        300-400 ms when 16 new raters vote at once."""
        self.store.ensure_rater(rater)

    def vote(
        self,
        session: str,
        token: str,
        outcome: str,
        rater: str,
        reasons: tuple[str, ...] = (),
        time_to_vote_ms: int | None = None,
        address: str | None = None,
    ) -> VoteResult:
        """Record a vote (raises VoteRejected with a reason) and return the reveal. With a guard: rate limits (per
        rater, and per client `address` when configured) and daily caps refuse before anything is stored, too-fast
        votes are stored flagged, control votes update trust. `reasons`: tags from REASON_TAGS only."""
        reasons = check_reasons(list(reasons) if isinstance(reasons, tuple) else reasons)

        def record(excluded_reason: str | None) -> VoteReceipt:
            kw = {"reasons": tuple(reasons), "time_to_vote_ms": time_to_vote_ms, "excluded_reason": excluded_reason}
            try:
                return self.store.record_vote(token, session, outcome, rater, **kw)
            except VoteRejected as err:
                if err.reason_code != "unknown_rater":
                    raise
                # First vote of this rater: register the pseudonym only now, so a refused vote stores nothing.
                self.store.ensure_rater(rater)
                return self.store.record_vote(token, session, outcome, rater, **kw)

        receipt = record(None) if self.guard is None else self.guard.vote(rater, time_to_vote_ms, record, address)
        self._voted(session, token)
        return VoteResult(
            receipt.vote_id, receipt.outcome, receipt.left_version, receipt.right_version, receipt.control_passed
        )
