"""Read side of the store: votes, training pairs, comparisons for the statistics, rater activity, moderation flags.

"Usable" votes everywhere below: not flagged (excluded_reason IS NULL), cast by a rater who is active now, on a pair
that is not a control pair. Deleted raters have no votes left (FeedbackStore.request_deletion).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from feedback_store.records import (
    PROMPT_SOURCES,
    Comparison,
    Generation,
    PreferencePair,
    Prompt,
    Vote,
    as_utc_naive,
    check_choice,
    clean_text,
    first,
)

IMAGE_COLS = (
    "image_id, prompt_id, path, sha256, base_model, adapter_version, seed, scheduler, steps, guidance, width, "
    "height, created"
)
PAIR_COLS = (
    "pair_id, prompt_id, left_image_id, right_image_id, left_version, right_version, kind, session, issued_at, "
    "expires_at, control_bad_side"
)
_VOTE_SELECT = (
    "SELECT v.vote_id, v.pair_id, v.rater, v.session, v.outcome, v.reasons, v.time_to_vote_ms, v.created, p.kind, "
    "v.control_passed, v.excluded_reason FROM votes v JOIN pairs p ON p.pair_id = v.pair_id "
    "JOIN raters r ON r.pseudonym = v.rater"
)
USABLE = "v.excluded_reason IS NULL AND r.status = 'active' AND p.kind <> 'control'"


def _vote(row: tuple) -> Vote:
    return Vote(*row[:5], tuple(row[5]), *row[6:])


class QueryMixin:
    """Mixed into FeedbackStore; relies on its `_cur()` (this thread's cursor) and `_write()` (write transaction)."""

    _cur: Any
    _write: Any

    def _window(self, since_vote_id: int | None, quarantine_s: float, now: datetime | None) -> list:
        if quarantine_s < 0:
            raise ValueError(f"quarantine_s must be >= 0, got {quarantine_s}")
        return [since_vote_id or 0, as_utc_naive(now) - timedelta(seconds=quarantine_s)]

    def vote(self, vote_id: int) -> Vote | None:
        row = first(self._cur().execute(f"{_VOTE_SELECT} WHERE v.vote_id = ?", [vote_id]))
        return _vote(row) if row else None

    def votes(self, since_vote_id: int | None = None) -> list[Vote]:
        """Every stored vote after since_vote_id (flagged and control votes included), oldest first."""
        rows = self._cur().execute(f"{_VOTE_SELECT} WHERE v.vote_id > ? ORDER BY v.vote_id", [since_vote_id or 0])
        return [_vote(r) for r in rows.fetchall()]

    def trainable_votes(
        self, since_vote_id: int | None = None, quarantine_s: float = 0.0, now: datetime | None = None
    ) -> list[Vote]:
        """Usable votes (see module docstring) after since_vote_id and older than quarantine_s seconds (the
        quarantine lets anomaly checks flag a burst before it reaches training). All four outcomes, oldest first."""
        sql = f"{_VOTE_SELECT} WHERE v.vote_id > ? AND v.created <= ? AND {USABLE} ORDER BY v.vote_id"
        return [_vote(r) for r in self._cur().execute(sql, self._window(since_vote_id, quarantine_s, now)).fetchall()]

    def preference_pairs(
        self, since_vote_id: int | None = None, quarantine_s: float = 0.0, now: datetime | None = None
    ) -> list[PreferencePair]:
        """Trainable votes with a strict preference, as prompt/chosen/rejected (ties and both_bad carry none and are
        left out, as the reference DPO code drops ties). Oldest first."""
        img = ", ".join(f"{{a}}.{c.strip()}" for c in IMAGE_COLS.split(","))
        sql = (
            f"SELECT v.vote_id, v.pair_id, p.prompt_id, q.text, v.rater, v.created, {img.format(a='c')}, "
            f"{img.format(a='x')} FROM votes v JOIN pairs p ON p.pair_id = v.pair_id "
            "JOIN raters r ON r.pseudonym = v.rater JOIN prompts q ON q.prompt_id = p.prompt_id "
            "JOIN images c ON c.image_id = CASE WHEN v.outcome = 'left' THEN p.left_image_id ELSE p.right_image_id END "
            "JOIN images x ON x.image_id = CASE WHEN v.outcome = 'left' THEN p.right_image_id ELSE p.left_image_id END "
            f"WHERE v.outcome IN ('left', 'right') AND v.vote_id > ? AND v.created <= ? AND {USABLE} "
            "ORDER BY v.vote_id"
        )
        out = []
        for row in self._cur().execute(sql, self._window(since_vote_id, quarantine_s, now)).fetchall():
            chosen, rejected = Generation(*row[6:19]), Generation(*row[19:32])
            out.append(PreferencePair(row[0], row[1], row[2], row[3], chosen, rejected, row[4], row[5]))
        return out

    def cross_version_comparisons(self, since: datetime | None = None) -> list[Comparison]:
        """Usable cross_version votes as comparisons for stats.py: left version vs right version, left's score
        1 / 0.5 (tie) / 0; both_bad says nothing about the order and is left out."""
        sql = (
            "SELECT v.vote_id, p.left_version, p.right_version, "
            "CASE v.outcome WHEN 'left' THEN 1.0 WHEN 'right' THEN 0.0 ELSE 0.5 END::DOUBLE, v.created "
            "FROM votes v JOIN pairs p ON p.pair_id = v.pair_id JOIN raters r ON r.pseudonym = v.rater "
            f"WHERE p.kind = 'cross_version' AND v.outcome <> 'both_bad' AND {USABLE} AND v.created >= ? "
            "ORDER BY v.vote_id"
        )
        rows = self._cur().execute(sql, [since or datetime(1970, 1, 1)]).fetchall()
        return [Comparison(*r) for r in rows]

    def flag_vote(self, vote_id: int, excluded_reason: str | None) -> Vote:
        """Exclude a vote from training and statistics (e.g. "anomalous_rater", "duplicate_burst"); None clears it.
        The rater is not told (shadow exclusion)."""
        if excluded_reason is not None:
            excluded_reason = clean_text(excluded_reason, "excluded_reason", 200)
            if not excluded_reason:
                raise ValueError("excluded_reason must be a non-empty code such as 'anomalous_rater', or None")
        with self._write() as cur:
            cur.execute("UPDATE votes SET excluded_reason = ? WHERE vote_id = ?", [excluded_reason, vote_id])
        vote = self.vote(vote_id)
        if vote is None:
            raise ValueError(f"vote {vote_id} does not exist")
        return vote

    def rater_stats(self) -> list[dict]:
        """Per-rater activity for anomaly detection: votes, control votes and passes, tie/both_bad/left shares,
        median time to vote, trust and status. Deleted raters are left out."""
        sql = """
            SELECT r.pseudonym AS rater, r.status, r.trust, count(v.vote_id) AS votes,
                count(*) FILTER (WHERE p.kind = 'control') AS control_votes,
                count(*) FILTER (WHERE v.control_passed) AS control_passed,
                avg(CASE WHEN v.outcome = 'tie' THEN 1.0 ELSE 0.0 END) AS tie_share,
                avg(CASE WHEN v.outcome = 'both_bad' THEN 1.0 ELSE 0.0 END) AS both_bad_share,
                avg(CASE WHEN v.outcome = 'left' THEN 1.0 ELSE 0.0 END) AS left_share,
                median(v.time_to_vote_ms) AS median_time_to_vote_ms,
                count(*) FILTER (WHERE v.excluded_reason IS NOT NULL) AS flagged_votes
            FROM raters r LEFT JOIN votes v ON v.rater = r.pseudonym LEFT JOIN pairs p ON p.pair_id = v.pair_id
            WHERE r.status <> 'deleted' GROUP BY ALL ORDER BY r.pseudonym"""
        cur = self._cur().execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def rater_controls(self, pseudonym: str) -> tuple[int, int]:
        """(control votes, control votes passed) of one rater: the evidence behind its trust score."""
        sql = (
            "SELECT count(*), count(*) FILTER (WHERE v.control_passed) FROM votes v "
            "JOIN pairs p ON p.pair_id = v.pair_id WHERE v.rater = ? AND p.kind = 'control'"
        )
        n, passed = first(self._cur().execute(sql, [pseudonym]))  # type: ignore[misc]
        return int(n), int(passed)

    def rater_votes_since(self, pseudonym: str, since: datetime) -> int:
        """Votes stored for one rater at or after `since` (flagged ones included): a daily cap's count after a
        restart."""
        sql = "SELECT count(*) FROM votes WHERE rater = ? AND created >= ?"
        return int(first(self._cur().execute(sql, [pseudonym, as_utc_naive(since)]))[0])  # type: ignore[index]

    def rater_agreement(self, min_others: int = 2) -> list[dict]:
        """Per rater, agreement with the consensus of the OTHER raters on the same two images (read-only).

        Votes are grouped by the unordered pair of image sha256s (a pair shown to several sessions, in either order,
        is one group) and each outcome is mapped onto that order, so side order does not matter. For each of a
        rater's non-control votes, the others are the usable votes of other raters in its group (not flagged, rater
        active); it is judged when there are at least `min_others` of them and one image holds a strict majority
        among them (a tie or both-bad majority is not judged: agreeing on "tie" says little, and an adversary who
        inverts preferences would agree with every tie). Returns [{rater, consensus_pairs, agreements, agreement}] for raters with a judged vote;
        agreement = agreements / consensus_pairs."""
        sql = """
            WITH lab AS (
                SELECT v.rater, v.vote_id, r.status = 'active' AND v.excluded_reason IS NULL AS usable,
                    least(l.sha256, x.sha256) AS a, greatest(l.sha256, x.sha256) AS b,
                    CASE WHEN v.outcome IN ('tie', 'both_bad') THEN v.outcome
                        WHEN (v.outcome = 'left') = (l.sha256 <= x.sha256) THEN 'a' ELSE 'b' END AS label
                FROM votes v JOIN pairs p ON p.pair_id = v.pair_id JOIN raters r ON r.pseudonym = v.rater
                JOIN images l ON l.image_id = p.left_image_id JOIN images x ON x.image_id = p.right_image_id
                WHERE p.kind <> 'control' AND r.status <> 'deleted'),
            tally AS (  -- per own vote: how many others gave each label
                SELECT o.rater, o.vote_id, o.label, w.label AS other_label, count(*) AS n
                FROM lab o JOIN lab w ON w.a = o.a AND w.b = o.b AND w.rater <> o.rater AND w.usable
                GROUP BY ALL),
            judged AS (
                SELECT rater, vote_id, any_value(label) AS label, sum(n) AS others, max(n) AS top,
                    arg_max(other_label, n) AS majority
                FROM tally GROUP BY rater, vote_id)
            SELECT rater, count(*) AS consensus_pairs, count(*) FILTER (WHERE label = majority) AS agreements
            FROM judged WHERE others >= ? AND 2 * top > others AND majority IN ('a', 'b')
            GROUP BY rater ORDER BY rater"""
        rows = self._cur().execute(sql, [int(min_others)]).fetchall()
        return [{"rater": r, "consensus_pairs": int(n), "agreements": int(k), "agreement": k / n} for r, n, k in rows]

    def prompts(self, source: str | None = None, category: str | None = None) -> list[Prompt]:
        """Stored prompts (e.g. the curated pool: source="pool"), oldest first."""
        if source is not None:
            check_choice(source, PROMPT_SOURCES, "source")
        sql = "SELECT prompt_id, text, source, category, created FROM prompts WHERE (? IS NULL OR source = ?) "
        sql += "AND (? IS NULL OR category = ?) ORDER BY prompt_id"
        return [Prompt(*r) for r in self._cur().execute(sql, [source, source, category, category]).fetchall()]

    def counts(self) -> dict[str, int]:
        """Row counts per table (for the UI's "N votes so far" and for tests)."""
        tables = ("raters", "prompts", "images", "pairs", "votes", "adapter_versions", "training_runs", "snapshots")
        sql = " UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in tables)  # fixed names, no user input
        return {name: int(n) for name, n in self._cur().execute(sql).fetchall()}
