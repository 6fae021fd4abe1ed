"""feedback_store: the arena's preference store (DuckDB) with lineage, leaderboard statistics and the export.

One process owns the database file (the app); everything else reads exported Parquet snapshots (DESIGN.md). Imports
only stdlib, duckdb, pyarrow, numpy (never torch, gradio, ncp, jobs). Times are naive UTC datetimes.

Open / close
    store = FeedbackStore(data_dir / "arena.duckdb")      # FeedbackStore(":memory:", data_dir=tmp) in tests
    store.close()                                          # or `with FeedbackStore(...) as store:`
  Migrations (schema.MIGRATIONS, recorded in `schema_migrations`) run on open. Thread-safe: one DuckDB cursor per
  thread, one write lock; use one FeedbackStore per file per process. Image paths are stored relative to `data_dir`
  (default: the database file's folder).

Raters (pseudonymous; no raw identity, IP or user agent is ever stored: identifiers must match [A-Za-z0-9_-]{1,128})
    pseudonymize(raw_id, salt) -> str                      # "r_" + HMAC-SHA256 prefix; the entry point owns the salt
    ensure_rater(pseudonym) -> Rater                       # Rater(pseudonym, created, trust, status, status_reason)
    set_rater_status(pseudonym, "active" | "shadow_excluded", reason=None) -> Rater
    set_rater_trust(pseudonym, trust in [0, 1]) -> Rater
    request_deletion(pseudonym) -> int                     # deletes their votes, keeps a tombstone (status "deleted")
    rater(pseudonym) -> Rater | None;  rater_stats() -> list[dict]   # per-rater activity for anomaly detection
    rater_agreement(min_others=2) -> list[dict]            # per-rater agreement with the other raters' consensus
    rater_controls(pseudonym) -> (control votes, passed);  rater_votes_since(pseudonym, since) -> int

Prompts, images, pairs
    add_prompt(text, source="pool" | "typed", category=None) -> prompt_id        # same text -> same id
    add_image(prompt_id, path, *, base_model, seed, scheduler, steps, guidance, width, height,
              adapter_version="base", sha256=None) -> image_id                   # sha256 computed from the file if None
    issue_pair(prompt_id, left_image_id, right_image_id, kind, session, ttl_s=3600, *, control_bad_side=None)
        -> IssuedPair(pair_id, token, expires_at)
      kind "on_policy" (both images of one adapter version), "cross_version" (two versions), "control" (attention
      check, control_bad_side = "left" | "right" names the broken image). The token is secrets.token_urlsafe(32);
      only its sha256 is stored. prompt(id), image(id) -> Generation, pair(id) -> Pair, prompts(source, category).
    issue_pairs([PairSpec(prompt_id, left_image_id, right_image_id, kind, session, control_bad_side)], ttl_s=3600)
        -> list[IssuedPair]                                # many in one transaction (prefetch); all-or-nothing

Votes
    record_vote(token, session, outcome, rater, reasons=(), time_to_vote_ms=None, now=None, excluded_reason=None)
        -> VoteReceipt                                     # excluded_reason: stored flagged (e.g. "too_fast")
      outcome "left" | "right" | "tie" | "both_bad". Returns only after the vote is committed (group commit: concurrent
      callers share one transaction). Refusals raise VoteRejected(reason_code, message) (a ValueError) and change
      nothing; codes: records.VOTE_REJECTION_CODES (unknown_token, wrong_session, expired, conflicting_vote,
      invalid_outcome, invalid_reasons, reasons_too_large, invalid_text, invalid_session, invalid_time_to_vote,
      unknown_rater, rater_deleted). The same vote again (token, session, rater, outcome) returns the first receipt.
      VoteReceipt(vote_id, pair_id, outcome, chosen_image_id, rejected_image_id, left_version, right_version,
      control_passed, created): the UI's reveal. Votes of shadow-excluded raters are accepted and silently excluded.
    flag_vote(vote_id, excluded_reason | None) -> Vote;  vote(id), votes(since_vote_id) -> list[Vote]
    trainable_votes(since_vote_id=None, quarantine_s=0, now=None) -> list[Vote]
      usable = not flagged, rater active, not a control pair; quarantine holds back the newest votes.
    preference_pairs(since_vote_id=None, quarantine_s=0, now=None) -> list[PreferencePair]
      PreferencePair(vote_id, pair_id, prompt_id, prompt, chosen: Generation, rejected: Generation, rater, created):
      left/right become chosen/rejected here (and in VoteReceipt) only; ties and both_bad are left out.
    cross_version_comparisons() -> list[Comparison];  counts() -> dict[table, rows]

Alignment-loop lineage
    register_adapter_version(version, parent, snapshot_id, metrics=None, status="candidate") -> AdapterVersion
    set_adapter_status(version, status, metrics=None);  adapter_version(v);  adapter_versions()
      status: candidate | published | rejected | retired | rolled_back; "base" is implicit (no adapter).
    start_training_run(snapshot_id, parent_version, config=None, adapter_version=None) -> run_id
    finish_training_run(run_id, status, reason=None, metrics=None, adapter_version=None) -> TrainingRun
    mark_running_runs_failed(reason) -> int;  training_run(id);  training_runs(limit)
    snapshots(), snapshot(id) -> SnapshotRecord

Statistics (feedback_store.stats; plain dataclasses / dicts for the UI)
    leaderboard(store.cross_version_comparisons(), base="base", min_votes=30, n_boot=200, seed=0) -> Leaderboard
      .ratings: [VersionRating(version, rating (Elo scale, base = 1000), ci_low, ci_high, votes, wins,
      win_rate_vs_base, votes_vs_base, preliminary)], .rows() -> list[dict] with rank
    win_matrix(comparisons) -> list[dict];  rating_history(comparisons, every="day" | "hour" | N) -> list[dict]

Export (feedback_store.export; `python -m feedback_store.export --db ... --out ... [--since SNAPSHOT]`)
    export_snapshot(store, out_dir, since=None, *, images=True, include_excluded=False, eval_fraction=0.1,
                    quarantine_s=0) -> Snapshot(snapshot_id, path, manifest)
      `<out>/<snapshot_id>/{train,eval}.parquet + manifest.json`, Pick-a-Pic v2 columns plus lineage (see export.py).
"""

from feedback_store.records import (
    VOTE_REJECTION_CODES,
    AdapterVersion,
    Comparison,
    Generation,
    InputRejected,
    IssuedPair,
    Pair,
    PairSpec,
    PreferencePair,
    Prompt,
    Rater,
    SnapshotRecord,
    StoreClosed,
    TrainingRun,
    Vote,
    VoteReceipt,
    VoteRejected,
    pseudonymize,
)
from feedback_store.schema import SCHEMA_VERSION
from feedback_store.store import FeedbackStore

__all__ = [
    "SCHEMA_VERSION",
    "VOTE_REJECTION_CODES",
    "AdapterVersion",
    "Comparison",
    "FeedbackStore",
    "Generation",
    "InputRejected",
    "IssuedPair",
    "Pair",
    "PairSpec",
    "PreferencePair",
    "Prompt",
    "Rater",
    "SnapshotRecord",
    "StoreClosed",
    "TrainingRun",
    "Vote",
    "VoteReceipt",
    "VoteRejected",
    "pseudonymize",
]
