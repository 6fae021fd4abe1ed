"""The hot write path: issuing pairs and recording votes, validated and committed in groups.

Why groups: a DuckDB commit costs a WAL write + fsync (1.5-9 ms measured on the project's shared 2-core machines,
STACK_NOTES.md) plus about 2-3 ms of CPU for a 10-column row, so one commit per vote caps a store at a few hundred
votes/s. Every acknowledged vote must be committed, so instead of acknowledging early the store commits in groups:
callers queue their request, one of them (the leader, holding the write lock) validates and inserts every queued
request with ONE statement/transaction, commits, then all of them return. One caller alone pays one commit per vote;
concurrent callers share one. When the previous group had several writers, the leader lingers up to
`commit_linger_s` (2 ms) for them to join (PostgreSQL's commit_delay idea), so groups stay full. Nothing is
acknowledged before its commit.

Validation that needs no database (outcome, text, sizes) runs in the caller's thread before queueing; the rest
(token, session, replay, expiry, rater) runs in the leader against committed state plus the batch itself. The state
it needs (open pairs, recent receipts) is kept in a WriteCache that only the leader updates after each commit, so the
common case needs no SELECT at all; unknown tokens (after a restart or eviction) are looked up with SQL.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

import duckdb

from feedback_store.records import (
    MAX_REASON_CHARS,
    MAX_REASONS,
    MAX_REASONS_BYTES,
    MAX_TIME_TO_VOTE_MS,
    OUTCOMES,
    PAIR_KINDS,
    Generation,
    InputRejected,
    IssuedPair,
    VoteReceipt,
    VoteRejected,
    as_utc_naive,
    check_choice,
    check_ident,
    clean_text,
)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class PairRequest:
    prompt_id: int
    left_image_id: int
    right_image_id: int
    left_version: str
    right_version: str
    kind: str
    session: str
    token: str
    issued_at: datetime
    expires_at: datetime
    control_bad_side: str | None
    done: bool = False
    result: IssuedPair | None = None
    error: BaseException | None = None


@dataclass
class VoteRequest:
    token_sha256: str
    session: str
    outcome: str
    rater: str
    reasons: tuple[str, ...]
    time_to_vote_ms: int | None
    now: datetime
    excluded_reason: str | None = None  # stored flagged from the start (e.g. "too_fast"): never trained on
    done: bool = False
    result: VoteReceipt | None = None
    error: BaseException | None = None


def prepare_vote(
    token: object,
    session: object,
    outcome: object,
    rater: str,
    reasons: Sequence[str | bytes],
    time_to_vote_ms: int | None,
    now: datetime | None,
    excluded_reason: str | None = None,
) -> VoteRequest:
    """The checks that need no database. Raises VoteRejected with the reason code."""
    if not isinstance(token, str) or not 16 <= len(token) <= 128:
        raise VoteRejected("unknown_token", "the pair token is not one this server issued; request a new pair")
    try:
        check_ident(session, "session", code="invalid_session")
    except InputRejected as e:
        raise VoteRejected(e.reason_code, e.message) from None
    if outcome not in OUTCOMES:
        raise VoteRejected("invalid_outcome", f"outcome must be one of {list(OUTCOMES)}, got {outcome!r:.40}")
    if isinstance(reasons, str | bytes) or not isinstance(reasons, Sequence):
        raise VoteRejected("invalid_reasons", "reasons must be a list of short strings, e.g. ['artifacts']")
    if len(reasons) > MAX_REASONS:
        raise VoteRejected("reasons_too_large", f"{len(reasons)} reasons given; at most {MAX_REASONS} are allowed")
    cleaned: list[str] = []
    for i, reason in enumerate(reasons):
        try:
            text = clean_text(reason, f"reasons[{i}]", max_chars=10 * MAX_REASON_CHARS)
        except InputRejected as e:
            raise VoteRejected(e.reason_code, e.message) from None
        if len(text) > MAX_REASON_CHARS:
            raise VoteRejected(
                "reasons_too_large", f"reasons[{i}] has {len(text)} characters; at most {MAX_REASON_CHARS} allowed"
            )
        cleaned.append(text)
    if sum(len(r.encode("utf-8")) for r in cleaned) > MAX_REASONS_BYTES:
        raise VoteRejected("reasons_too_large", f"reasons exceed {MAX_REASONS_BYTES} bytes in total; shorten them")
    if time_to_vote_ms is not None and (
        isinstance(time_to_vote_ms, bool)
        or not isinstance(time_to_vote_ms, int)
        or not 0 <= time_to_vote_ms <= MAX_TIME_TO_VOTE_MS
    ):
        raise VoteRejected(
            "invalid_time_to_vote", f"time_to_vote_ms must be an int in [0, {MAX_TIME_TO_VOTE_MS}] or None"
        )
    if excluded_reason is not None:  # set by the server (jobs/abuse.py), never by a client: a code, not text
        check_ident(excluded_reason, "excluded_reason", code="invalid_excluded_reason")
    return VoteRequest(
        token_sha256=token_hash(token),
        session=str(session),
        outcome=str(outcome),
        rater=rater,
        reasons=tuple(cleaned),
        time_to_vote_ms=time_to_vote_ms,
        now=as_utc_naive(now),
        excluded_reason=excluded_reason,
    )


def prepare_pair(
    prompt_id: int,
    left: Generation | None,
    right: Generation | None,
    kind: str,
    session: str,
    ttl_s: float,
    control_bad_side: str | None,
    now: datetime | None,
) -> PairRequest:
    """Check a pair before it is issued (images exist, belong to the prompt, match the kind) and mint its token."""
    check_choice(kind, PAIR_KINDS, "kind")
    check_ident(session, "session", code="invalid_session")
    if (kind == "control") != (control_bad_side is not None):
        raise ValueError("control_bad_side ('left' or 'right') is required for kind='control' and only then")
    if control_bad_side is not None:
        check_choice(control_bad_side, ("left", "right"), "control_bad_side")
    if left is None or right is None or left.prompt_id != prompt_id or right.prompt_id != prompt_id:
        raise ValueError(f"both images must exist and be generated for prompt {prompt_id} (add_image first)")
    if left.image_id == right.image_id:
        raise ValueError("a pair needs two different images")
    same = left.adapter_version == right.adapter_version
    if (kind == "cross_version" and same) or (kind == "on_policy" and not same):
        raise ValueError(
            f"kind={kind!r} does not match the adapter versions {left.adapter_version!r}, {right.adapter_version!r}: "
            "cross_version needs two different versions, on_policy one"
        )
    issued = as_utc_naive(now)
    if not 0 < ttl_s <= 7 * 24 * 3600:
        raise ValueError(f"ttl_s must be in (0, 604800] seconds, got {ttl_s}")
    return PairRequest(
        prompt_id=prompt_id,
        left_image_id=left.image_id,
        right_image_id=right.image_id,
        left_version=left.adapter_version,
        right_version=right.adapter_version,
        kind=kind,
        session=session,
        token=secrets.token_urlsafe(32),  # unguessable bearer token; only its sha256 is stored
        issued_at=issued,
        expires_at=issued + timedelta(seconds=ttl_s),
        control_bad_side=control_bad_side,
    )


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


class PairRow(NamedTuple):
    """What the vote path needs to know about an issued pair."""

    pair_id: int
    session: str
    expires_at: datetime
    kind: str
    control_bad_side: str | None
    left_image_id: int
    right_image_id: int
    left_version: str
    right_version: str


class WriteCache:
    """What the vote path would otherwise read per batch: issued-but-unvoted pairs and recent receipts, by token
    hash. Only the store's single writer changes pairs and votes, so after each commit it updates this cache and the
    cache never contradicts the database; a token it does not know is simply looked up (after a restart, after
    eviction). Bounded: expired open pairs are pruned, old receipts evicted."""

    def __init__(self, max_open: int = 200_000, max_receipts: int = 50_000) -> None:
        self.open: dict[str, PairRow] = {}
        self.receipts: OrderedDict[str, tuple[str, str, VoteReceipt]] = OrderedDict()
        self.max_open, self.max_receipts = max_open, max_receipts

    def add_open(self, items: list[tuple[str, PairRow]], now: datetime) -> None:
        self.open.update(items)
        if len(self.open) > self.max_open:
            grace = now - timedelta(minutes=5)
            self.open = {h: p for h, p in self.open.items() if p.expires_at > grace}
            while len(self.open) > self.max_open:  # still too many: forget the oldest (they fall back to SQL)
                del self.open[next(iter(self.open))]

    def add_receipts(self, items: list[tuple[str, str, str, VoteReceipt]]) -> None:
        """(token hash, session, rater, receipt) of committed votes."""
        for h, session, rater, receipt in items:
            self.open.pop(h, None)
            self.receipts[h] = (session, rater, receipt)
        while len(self.receipts) > self.max_receipts:
            self.receipts.popitem(last=False)

    def clear(self) -> None:
        self.open.clear()
        self.receipts.clear()


_PAIR_COLUMNS = {
    "prompt_id": "BIGINT",
    "left_image_id": "BIGINT",
    "right_image_id": "BIGINT",
    "left_version": "VARCHAR",
    "right_version": "VARCHAR",
    "kind": "VARCHAR",
    "session": "VARCHAR",
    "token_sha256": "VARCHAR",
    "issued_at": "TIMESTAMP",
    "expires_at": "TIMESTAMP",
    "control_bad_side": "VARCHAR",
}
_VOTE_COLUMNS = {
    "pair_id": "BIGINT",
    "rater": "VARCHAR",
    "session": "VARCHAR",
    "outcome": "VARCHAR",
    "reasons": "VARCHAR[]",
    "time_to_vote_ms": "INTEGER",
    "created": "TIMESTAMP",
    "control_passed": "BOOLEAN",
    "excluded_reason": "VARCHAR",
}


def _insert(cur: duckdb.DuckDBPyConnection, table: str, columns: dict[str, str], rows: list[tuple], ret: str) -> list:
    """One parameterised INSERT for the whole batch (one statement, not one per row): columns as typed lists."""
    names = ", ".join(columns)
    if len(rows) == 1:  # a lone writer: plain VALUES binds and plans faster (measured ~0.7 ms less CPU)
        sql = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))}) RETURNING {ret}"
        return cur.execute(sql, list(rows[0])).fetchall()
    select = ", ".join(f"unnest(?::{t}[])" for t in columns.values())
    sql = f"INSERT INTO {table} ({names}) SELECT {select} RETURNING {ret}"
    return cur.execute(sql, [list(col) for col in zip(*rows, strict=True)]).fetchall()


def insert_pairs(cur: duckdb.DuckDBPyConnection, requests: list[PairRequest]) -> list[tuple[str, PairRow]]:
    """Insert the batch's pairs (no commit) and set each request's IssuedPair; returns the cache entries."""
    if not requests:
        return []
    hashes = [token_hash(r.token) for r in requests]
    rows = [
        tuple(h if c == "token_sha256" else getattr(r, c) for c in _PAIR_COLUMNS)
        for r, h in zip(requests, hashes, strict=True)
    ]
    ids = {h: pid for pid, h in _insert(cur, "pairs", _PAIR_COLUMNS, rows, "pair_id, token_sha256")}
    out = []
    for r, h in zip(requests, hashes, strict=True):
        r.result = IssuedPair(pair_id=ids[h], token=r.token, expires_at=r.expires_at)
        fields = (r.session, r.expires_at, r.kind, r.control_bad_side, r.left_image_id, r.right_image_id)
        out.append((h, PairRow(ids[h], *fields, r.left_version, r.right_version)))
    return out


def _receipt(pair: PairRow, vote_id: int, outcome: str, control_passed: bool | None, created: datetime) -> VoteReceipt:
    # Left/right become chosen/rejected here and only here (DESIGN.md, "one vocabulary").
    sides = {"left": (pair.left_image_id, pair.right_image_id), "right": (pair.right_image_id, pair.left_image_id)}
    chosen, rejected = sides.get(outcome, (None, None))
    return VoteReceipt(
        vote_id=vote_id,
        pair_id=pair.pair_id,
        outcome=outcome,  # type: ignore[arg-type]
        chosen_image_id=chosen,
        rejected_image_id=rejected,
        left_version=pair.left_version,
        right_version=pair.right_version,
        control_passed=control_passed,
        created=created,
    )


def _lookup(
    cur: duckdb.DuckDBPyConnection, hashes: list[str]
) -> tuple[dict[str, PairRow], dict[str, tuple[str, str, VoteReceipt]]]:
    """The SQL path for tokens the cache does not know: their pairs and any committed votes on them."""
    if not hashes:
        return {}, {}
    pairs = {
        row[1]: PairRow(row[0], *row[2:])
        for row in cur.execute(
            "SELECT pair_id, token_sha256, session, expires_at, kind, control_bad_side, left_image_id, "
            f"right_image_id, left_version, right_version FROM pairs WHERE token_sha256 IN ({_placeholders(len(hashes))})",
            hashes,
        ).fetchall()
    }
    voted: dict[str, tuple[str, str, VoteReceipt]] = {}
    if pairs:
        by_id = {p.pair_id: h for h, p in pairs.items()}
        for pair_id, vote_id, rater, outcome, created, passed in cur.execute(
            "SELECT pair_id, vote_id, rater, outcome, created, control_passed FROM votes "
            f"WHERE pair_id IN ({_placeholders(len(by_id))})",
            list(by_id),
        ).fetchall():
            h = by_id[pair_id]
            voted[h] = (pairs[h].session, rater, _receipt(pairs[h], vote_id, outcome, passed, created))
    return pairs, voted


def apply_votes(
    cur: duckdb.DuckDBPyConnection, requests: list[VoteRequest], rater_status: dict[str, str], cache: WriteCache
) -> list[tuple[str, str, str, VoteReceipt]]:
    """Validate the batch against committed state (cache, else SQL) and against itself, insert the accepted votes
    (no commit) and set each request's receipt or VoteRejected. `rater_status` maps every requester to its status
    (missing: unknown rater). Returns (token hash, session, rater, receipt) of accepted votes for the cache."""
    if not requests:
        return []
    unknown = sorted({r.token_sha256 for r in requests} - cache.open.keys() - cache.receipts.keys())
    pairs, voted = _lookup(cur, unknown)
    new: dict[str, tuple] = {}  # token hash -> row to insert (first accepted request of this batch)
    waiting: list[tuple[VoteRequest, PairRow]] = []  # accepted or repeated within the batch: receipt after insert
    for req in requests:
        h = req.token_sha256
        prior = voted.get(h) or cache.receipts.get(h)
        if prior is not None:
            # Already voted: only the same vote again gets the first receipt back (idempotent); all else is refused.
            session, rater, receipt = prior
            if session != req.session:
                req.error = VoteRejected("wrong_session", "this pair was issued to another session")
            elif (rater, receipt.outcome) != (req.rater, req.outcome):
                req.error = VoteRejected("conflicting_vote", "this pair already has a different vote")
            else:
                req.result = receipt
            continue
        pair = pairs.get(h) or cache.open.get(h)
        if pair is None:
            req.error = VoteRejected("unknown_token", "the pair token is not one this server issued")
            continue
        if pair.session != req.session:
            req.error = VoteRejected("wrong_session", "this pair was issued to another session")
            continue
        if h in new:
            if (new[h][1], new[h][3]) != (req.rater, req.outcome):
                req.error = VoteRejected("conflicting_vote", "this pair already has a different vote")
            else:
                waiting.append((req, pair))
            continue
        if req.now > pair.expires_at:
            req.error = VoteRejected("expired", f"the pair expired at {pair.expires_at:%Y-%m-%d %H:%M:%S} UTC")
            continue
        status = rater_status.get(req.rater)
        if status is None:
            req.error = VoteRejected("unknown_rater", f"rater {req.rater!r} is not registered; call ensure_rater()")
            continue
        if status == "deleted":
            req.error = VoteRejected("rater_deleted", "this rater asked for deletion; votes are no longer taken")
            continue
        # Control (attention-check) pairs: passed iff the rater picked the intact image.
        passed = None
        if pair.kind == "control":
            passed = req.outcome == {"left": "right", "right": "left"}[pair.control_bad_side]
        # Shadow exclusion: the rater sees a normal receipt; the vote never reaches training or statistics.
        excluded = "rater_shadow_excluded" if status == "shadow_excluded" else req.excluded_reason
        new[h] = (pair.pair_id, req.rater, req.session, req.outcome, list(req.reasons), req.time_to_vote_ms)
        new[h] += (req.now, passed, excluded)
        waiting.append((req, pair))
    if not new:
        return []
    vote_ids = dict(_insert(cur, "votes", _VOTE_COLUMNS, list(new.values()), "pair_id, vote_id"))
    receipts = {}
    for req, pair in waiting:
        row = new[req.token_sha256]
        req.result = receipts.setdefault(
            req.token_sha256, _receipt(pair, vote_ids[pair.pair_id], row[3], row[7], row[6])
        )
    return [(h, new[h][2], new[h][1], receipt) for h, receipt in receipts.items()]
