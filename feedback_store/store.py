"""FeedbackStore: the one DuckDB file of the arena, owned by the app process (see the package docstring for the API).

Concurrency model (DESIGN.md "DuckDB single writer", STACK_NOTES.md): one connection, one cursor per thread; reads run
unlocked on the caller's cursor (MVCC); every write holds one write lock, so writers never conflict; the hot paths
(`issue_pair`, `record_vote`) are committed in groups (voting.py) so an fsync is shared by concurrent callers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import duckdb

from feedback_store import schema
from feedback_store.catalog import CatalogMixin
from feedback_store.lineage import LineageMixin
from feedback_store.queries import PAIR_COLS, QueryMixin
from feedback_store.records import (
    Generation,
    InputRejected,
    IssuedPair,
    Pair,
    PairSpec,
    Rater,
    StoreClosed,
    VoteReceipt,
    as_utc_naive,
    check_choice,
    check_ident,
    clean_text,
    first,
    utcnow,
)
from feedback_store.requests import PairRequest, VoteRequest, prepare_pair, prepare_vote
from feedback_store.voting import WriteCache, apply_votes, insert_pairs

log = logging.getLogger(__name__)

# One FeedbackStore per database file per process: the write lock and the caches live in the object, so a second
# object on the same file would bypass them. (A second process cannot open the file at all: DuckDB's file lock.)
_OPEN_FILES: set[str] = set()
_RATER_COLS = "pseudonym, created, trust, status, status_reason"
_OPEN_FILES_LOCK = threading.Lock()


def _rollback(cur: duckdb.DuckDBPyConnection) -> None:
    try:
        cur.rollback()
    except duckdb.TransactionException:
        pass  # nothing to roll back: a failed COMMIT has already rolled back


class FeedbackStore(CatalogMixin, LineageMixin, QueryMixin):
    """The preference store. `FeedbackStore(":memory:")` in tests, `FeedbackStore(data_dir / "arena.duckdb")` live.

    `data_dir` is the root that image paths are stored relative to (default: the database file's folder).
    """

    def __init__(
        self, path: str | Path, data_dir: str | Path | None = None, threads: int = 1, commit_linger_s: float = 0.002
    ) -> None:
        self.path = str(path)
        if data_dir is not None:
            self.data_dir: Path | None = Path(data_dir).resolve()
        else:
            self.data_dir = None if self.path == ":memory:" else Path(self.path).resolve().parent
        self._key = None if self.path == ":memory:" else str(Path(self.path).resolve())
        with _OPEN_FILES_LOCK:
            if self._key in _OPEN_FILES:
                raise RuntimeError(
                    f"{self._key} is already open in this process; share that FeedbackStore (thread-safe)"
                )
            if self._key is not None:
                _OPEN_FILES.add(self._key)
        try:
            # threads=1 by default: the store runs many tiny statements, where DuckDB's parallel operators only add
            # hand-offs (and on a busy 2-core host, waits); raise it for heavy analytics or exports.
            self._con = duckdb.connect(self.path, config={"threads": int(threads)})
        except BaseException:
            with _OPEN_FILES_LOCK:
                _OPEN_FILES.discard(self._key)  # type: ignore[arg-type]
            raise
        self._local = threading.local()
        self._cursors: dict[int, tuple[threading.Thread, duckdb.DuckDBPyConnection]] = {}
        self._cursors_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._batch_lock = threading.Lock()  # guards the group-commit state below
        self._batch_cond = threading.Condition(self._batch_lock)  # followers wait here for the running batch
        self._linger_cond = threading.Condition(self._batch_lock)  # a lingering leader waits here for joiners
        self._pending: list[PairRequest | VoteRequest] = []
        self._leader = self._lingering = False
        self._last_batch = 1
        self._linger_s = float(commit_linger_s)
        self._rater_status: dict[str, str] = {}  # cache; every status change goes through this object's write lock
        self._cache = WriteCache()
        self._images: dict[int, Generation] = {}
        self._closed = False
        try:
            with self._write_lock:
                self.schema_version = schema.migrate(self._cur())
        except BaseException:
            self.close()
            raise
        log.info("opened feedback store %s (schema %d)", self.path, self.schema_version)

    # -- connection plumbing ---------------------------------------------------------------------------------------
    def _cur(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (DuckDB connections must not be shared across threads)."""
        if self._closed:
            raise StoreClosed(f"FeedbackStore({self.path!r}) is closed; open a new one")
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._con.cursor()
            self._local.cur = cur
            with self._cursors_lock:
                for ident, (thread, old) in list(self._cursors.items()):
                    if not thread.is_alive():  # a finished thread's cursor: close it so they don't pile up
                        old.close()
                        del self._cursors[ident]
                self._cursors[threading.get_ident()] = (threading.current_thread(), cur)
        return cur

    @contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction under the write lock; committed on success, rolled back on any error."""
        with self._write_lock:
            cur = self._cur()
            cur.begin()
            try:
                yield cur
                cur.commit()
            except BaseException:
                self._rater_status.clear()  # it may hold a status change that was not committed; refills lazily
                _rollback(cur)
                raise

    def _submit(self, reqs: Sequence[PairRequest | VoteRequest]) -> list[IssuedPair | VoteReceipt]:
        """Group commit: queue the requests; if no batch is being written, lead one with everything queued so far,
        else wait until the running batch ends (it may have taken these requests) and check again. Requests queued
        together are always written together."""
        batch: list[PairRequest | VoteRequest] = []
        with self._batch_lock:
            self._pending.extend(reqs)
            if self._lingering:
                self._linger_cond.notify()
            while not reqs[0].done and self._leader:
                self._batch_cond.wait()
            if not reqs[0].done:  # no leader and not yet written: lead
                self._leader = True
                # Linger (like PostgreSQL's commit_delay): when the last batch showed a crowd of concurrent writers,
                # give them up to linger_s to join this commit, so one fsync carries them all.
                deadline = time.monotonic() + self._linger_s
                self._lingering = True
                while len(self._pending) < self._last_batch and (left := deadline - time.monotonic()) > 0:
                    self._linger_cond.wait(left)
                self._lingering = False
                batch, self._pending = self._pending, []
        if batch:
            try:
                with self._write_lock:
                    self._run_batch(batch)
            finally:
                with self._batch_lock:
                    self._leader = False
                    self._last_batch = len(batch)
                    self._batch_cond.notify_all()
        for r in reqs:
            if r.error is not None:
                raise r.error
        return [r.result for r in reqs]  # type: ignore[misc]

    def _run_batch(self, batch: list[PairRequest | VoteRequest]) -> None:
        pair_reqs = [r for r in batch if isinstance(r, PairRequest)]
        vote_reqs = [r for r in batch if isinstance(r, VoteRequest)]
        try:
            cur = self._cur()
            statuses = self._statuses(cur, {r.rater for r in vote_reqs})
            now = utcnow()
            if pair_reqs and vote_reqs:
                cur.begin()
            try:  # a batch of one kind is one INSERT statement: DuckDB's autocommit makes it one transaction
                opened = insert_pairs(cur, pair_reqs)
                accepted = apply_votes(cur, vote_reqs, statuses, self._cache)
                if pair_reqs and vote_reqs:
                    cur.commit()
            except BaseException:
                if pair_reqs and vote_reqs:
                    _rollback(cur)
                raise
            self._cache.add_open(opened, now)
            self._cache.add_receipts(accepted)
        except Exception as e:  # nothing of this batch was committed: every caller gets the error, none an ack
            log.exception("write batch of %d requests failed", len(batch))
            for r in batch:
                r.result, r.error = None, e
        finally:
            for r in batch:
                r.done = True
        if vote_reqs:
            log.debug("committed a batch of %d pairs and %d votes", len(pair_reqs), len(vote_reqs))

    def _statuses(self, cur: duckdb.DuckDBPyConnection, raters: set[str]) -> dict[str, str]:
        missing = sorted(r for r in raters if r not in self._rater_status)
        if missing:
            marks = ", ".join("?" * len(missing))
            rows = cur.execute(f"SELECT pseudonym, status FROM raters WHERE pseudonym IN ({marks})", missing)
            self._rater_status.update(dict(rows.fetchall()))
        return {r: self._rater_status[r] for r in raters if r in self._rater_status}

    def close(self) -> None:
        """Close every cursor and the database (idempotent). Pending writes finish first."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._cursors_lock:
                for _, cur in self._cursors.values():
                    cur.close()
                self._cursors.clear()
            self._con.close()
            with _OPEN_FILES_LOCK:
                _OPEN_FILES.discard(self._key)  # type: ignore[arg-type]
        log.info("closed feedback store %s", self.path)

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raters ----------------------------------------------------------------------------------------------------
    def ensure_rater(self, pseudonym: str, now: datetime | None = None) -> Rater:
        """Register a rater pseudonym (see `pseudonymize`) if new; return its record. Never pass a raw identity."""
        check_ident(pseudonym, "rater pseudonym", code="invalid_rater")
        if pseudonym in self._rater_status:  # known (the status cache): a read, no write lock and no commit
            row = first(self._cur().execute(f"SELECT {_RATER_COLS} FROM raters WHERE pseudonym = ?", [pseudonym]))
            if row is not None:
                return Rater(*row)
        with self._write() as cur:
            cur.execute(
                "INSERT INTO raters (pseudonym, created) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [pseudonym, as_utc_naive(now)],
            )
            rater = Rater(*first(cur.execute(f"SELECT {_RATER_COLS} FROM raters WHERE pseudonym = ?", [pseudonym])))
            self._rater_status[pseudonym] = rater.status  # under the write lock: no status change can interleave
        return rater

    def rater(self, pseudonym: str) -> Rater | None:
        row = first(self._cur().execute(f"SELECT {_RATER_COLS} FROM raters WHERE pseudonym = ?", [pseudonym]))
        return Rater(*row) if row else None

    def set_rater_status(self, pseudonym: str, status: str, reason: str | None = None) -> Rater:
        """ "active" or "shadow_excluded" (votes still accepted, silently kept out of training and statistics).
        Deletion is `request_deletion`, which cannot be undone."""
        check_choice(status, ("active", "shadow_excluded"), "status")
        reason = None if reason is None else clean_text(reason, "reason", 200)
        with self._write() as cur:
            row = first(cur.execute("SELECT status FROM raters WHERE pseudonym = ?", [pseudonym]))
            if row is None:
                raise InputRejected("unknown_rater", f"rater {pseudonym!r} is not registered")
            if row[0] == "deleted":
                raise InputRejected("rater_deleted", f"rater {pseudonym!r} asked for deletion; status is final")
            cur.execute(
                "UPDATE raters SET status = ?, status_reason = ? WHERE pseudonym = ?", [status, reason, pseudonym]
            )
            self._rater_status[pseudonym] = status
        return self.rater(pseudonym)  # type: ignore[return-value]

    def set_rater_trust(self, pseudonym: str, trust: float) -> Rater:
        """Trust in [0, 1] (e.g. from control-pair pass rate and agreement; jobs/app decide the policy)."""
        if not 0.0 <= float(trust) <= 1.0:
            raise ValueError(f"trust must be in [0, 1], got {trust}")
        with self._write() as cur:
            cur.execute("UPDATE raters SET trust = ? WHERE pseudonym = ?", [float(trust), pseudonym])
        rater = self.rater(pseudonym)
        if rater is None:
            raise InputRejected("unknown_rater", f"rater {pseudonym!r} is not registered")
        return rater

    def request_deletion(self, pseudonym: str) -> int:
        """Honour a rater's deletion request: delete all their votes (so no later export or statistic contains
        them), keep a tombstone so the pseudonym can never vote again. Returns the number of votes deleted.
        Snapshots exported before stay as they were; their successors' manifests list deleted pseudonyms."""
        check_ident(pseudonym, "rater pseudonym", code="invalid_rater")
        now = utcnow()
        with self._write() as cur:
            deleted = first(cur.execute("SELECT count(*) FROM votes WHERE rater = ?", [pseudonym]))[0]
            cur.execute("DELETE FROM votes WHERE rater = ?", [pseudonym])
            self._cache.clear()
            cur.execute(
                "INSERT INTO raters (pseudonym, created, status, status_reason, deleted_at) "
                "VALUES (?, ?, 'deleted', 'deletion requested', ?) ON CONFLICT (pseudonym) DO UPDATE SET "
                "status = 'deleted', status_reason = 'deletion requested', deleted_at = excluded.deleted_at",
                [pseudonym, now, now],
            )
            self._rater_status[pseudonym] = "deleted"
        log.info("deletion request honoured: %d votes removed", deleted)
        return int(deleted)

    # -- pairs and votes -------------------------------------------------------------------------------------------
    def issue_pair(
        self,
        prompt_id: int,
        left_image_id: int,
        right_image_id: int,
        kind: str,
        session: str,
        ttl_s: float = 3600.0,
        *,
        control_bad_side: str | None = None,
        now: datetime | None = None,
    ) -> IssuedPair:
        """Issue two images of one prompt to one session for one vote. kind: on_policy (same adapter version),
        cross_version (two versions) or control (attention check; control_bad_side names the broken image)."""
        spec = PairSpec(prompt_id, left_image_id, right_image_id, kind, session, control_bad_side)
        return self.issue_pairs([spec], ttl_s, now=now)[0]

    def issue_pairs(
        self, specs: Sequence[PairSpec], ttl_s: float = 3600.0, now: datetime | None = None
    ) -> list[IssuedPair]:
        """Issue several pairs in one transaction (a prefetch queue, one image pair shown to several sessions).
        All are checked first: one invalid spec raises and issues nothing."""
        reqs = [
            prepare_pair(s.prompt_id, self.image(s.left_image_id), self.image(s.right_image_id), s.kind, s.session,
                         ttl_s, s.control_bad_side, now)
            for s in specs
        ]  # fmt: skip
        return self._submit(reqs) if reqs else []  # type: ignore[return-value]

    def purge_unvoted_pairs(self, expired_before: datetime) -> int:
        """The retention rule for unvoted pairs: delete issued pairs that expired before `expired_before` (naive
        UTC) and have no vote. A pair with a vote is never deleted. Returns the number of pairs deleted."""
        cutoff = as_utc_naive(expired_before)
        where = "expires_at < ? AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.pair_id = pairs.pair_id)"
        with self._write() as cur:
            n = first(cur.execute(f"SELECT count(*) FROM pairs WHERE {where}", [cutoff]))[0]
            if n:
                cur.execute(f"DELETE FROM pairs WHERE {where}", [cutoff])
        return int(n)

    def votes_after(self, vote_id: int) -> int:
        """How many stored votes have an id above `vote_id` (e.g. how far a snapshot lags behind)."""
        return int(first(self._cur().execute("SELECT count(*) FROM votes WHERE vote_id > ?", [vote_id]))[0])

    def pair(self, pair_id: int) -> Pair | None:
        row = first(self._cur().execute(f"SELECT {PAIR_COLS} FROM pairs WHERE pair_id = ?", [pair_id]))
        return Pair(*row) if row else None

    def record_vote(
        self,
        token: str,
        session: str,
        outcome: str,
        rater: str | Rater,
        reasons: Sequence[str] = (),
        time_to_vote_ms: int | None = None,
        now: datetime | None = None,
        excluded_reason: str | None = None,
    ) -> VoteReceipt:
        """Record one vote; returns once it is committed. Raises VoteRejected (reason_code) and changes nothing
        when refused. Repeating an accepted vote (same token, session, rater, outcome) returns the first receipt.
        `excluded_reason` (a code such as "too_fast", set by the server) stores the vote flagged in the same
        transaction, so no snapshot can ever see it unflagged."""
        pseudonym = rater.pseudonym if isinstance(rater, Rater) else rater
        if not isinstance(pseudonym, str):
            pseudonym = repr(pseudonym)
        args = (token, session, outcome, pseudonym, reasons, time_to_vote_ms, now, excluded_reason)
        req = prepare_vote(*args)  # type: ignore[arg-type]
        return self._submit([req])[0]  # type: ignore[return-value]
