"""The hot write path: issuing pairs and recording votes, validated and committed in groups.

Why groups: a DuckDB commit costs a WAL write + fsync (1.5-9 ms measured on the project's shared 2-core machines,
STACK_NOTES.md) plus about 2-3 ms of CPU for a 10-column row, so one commit per vote caps a store at a few hundred
votes/s. Every acknowledged vote must be committed, so instead of acknowledging early the store commits in groups:
callers queue their request, one of them (the leader, holding the write lock) validates and inserts every queued
request with ONE statement/transaction, commits, then all of them return. One caller alone pays one commit per vote;
concurrent callers share one. When the previous group had several writers, the leader lingers up to
`commit_linger_s` (2 ms) for them to join (PostgreSQL's commit_delay idea), so groups stay full. Nothing is
acknowledged before its commit.

Validation that needs no database (outcome, text, sizes) runs in the caller's thread before queueing
(feedback_store/requests.py); the rest (token, session, replay, expiry, rater) runs in the leader against committed
state plus the batch itself. The state it needs (open pairs, recent receipts) is kept in a WriteCache that only the
leader updates after each commit, so the common case needs no SELECT at all; unknown tokens (after a restart or
eviction) are looked up with SQL.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime, timedelta
from typing import NamedTuple

import duckdb

from feedback_store.records import (
    IssuedPair,
    VoteReceipt,
    VoteRejected,
)
from feedback_store.requests import PairRequest, VoteRequest, token_hash


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
