"""The store's schema as an append-only list of numbered migrations (the simonw/llm pattern).

Never edit or reorder a released migration: append a new one. `migrate()` applies the missing ones in order, each in
its own transaction, and records it in `schema_migrations`. A database written by a newer release (a version this
code does not know) is refused rather than guessed at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import duckdb

from feedback_store.records import first, utcnow

log = logging.getLogger(__name__)

Migration = tuple[int, str, tuple[str, ...]]

MIGRATIONS: tuple[Migration, ...] = (
    (
        1,
        "arena: raters, prompts, images, pairs, votes",
        (
            """CREATE TABLE raters (
                pseudonym VARCHAR PRIMARY KEY,
                created TIMESTAMP NOT NULL,
                trust DOUBLE NOT NULL DEFAULT 1.0,
                status VARCHAR NOT NULL DEFAULT 'active',
                status_reason VARCHAR,
                deleted_at TIMESTAMP)""",
            "CREATE SEQUENCE prompt_id_seq START 1",
            """CREATE TABLE prompts (
                prompt_id BIGINT PRIMARY KEY DEFAULT nextval('prompt_id_seq'),
                text VARCHAR NOT NULL UNIQUE,
                source VARCHAR NOT NULL,
                category VARCHAR,
                created TIMESTAMP NOT NULL)""",
            "CREATE SEQUENCE image_id_seq START 1",
            """CREATE TABLE images (
                image_id BIGINT PRIMARY KEY DEFAULT nextval('image_id_seq'),
                prompt_id BIGINT NOT NULL,
                path VARCHAR NOT NULL,
                sha256 VARCHAR NOT NULL,
                base_model VARCHAR NOT NULL,
                adapter_version VARCHAR NOT NULL,
                seed BIGINT NOT NULL,
                scheduler VARCHAR NOT NULL,
                steps INTEGER NOT NULL,
                guidance DOUBLE NOT NULL,
                width INTEGER NOT NULL,
                height INTEGER NOT NULL,
                created TIMESTAMP NOT NULL)""",
            "CREATE SEQUENCE pair_id_seq START 1",
            # The token is a bearer secret: only its sha256 is stored. left/right versions are copied from the images
            # (immutable facts) so the vote path needs no join.
            """CREATE TABLE pairs (
                pair_id BIGINT PRIMARY KEY DEFAULT nextval('pair_id_seq'),
                prompt_id BIGINT NOT NULL,
                left_image_id BIGINT NOT NULL,
                right_image_id BIGINT NOT NULL,
                left_version VARCHAR NOT NULL,
                right_version VARCHAR NOT NULL,
                kind VARCHAR NOT NULL,
                session VARCHAR NOT NULL,
                token_sha256 VARCHAR NOT NULL UNIQUE,
                issued_at TIMESTAMP NOT NULL,
                expires_at TIMESTAMP NOT NULL,
                control_bad_side VARCHAR)""",
            "CREATE SEQUENCE vote_id_seq START 1",
            # One vote per issued pair (a pair shown to several raters is issued once per session).
            """CREATE TABLE votes (
                vote_id BIGINT PRIMARY KEY DEFAULT nextval('vote_id_seq'),
                pair_id BIGINT NOT NULL UNIQUE,
                rater VARCHAR NOT NULL,
                session VARCHAR NOT NULL,
                outcome VARCHAR NOT NULL,
                reasons VARCHAR[] NOT NULL,
                time_to_vote_ms INTEGER,
                created TIMESTAMP NOT NULL,
                control_passed BOOLEAN,
                excluded_reason VARCHAR)""",
        ),
    ),
    (
        2,
        "alignment loop: adapter versions and training runs",
        (
            """CREATE TABLE adapter_versions (
                version VARCHAR PRIMARY KEY,
                parent VARCHAR,
                snapshot_id VARCHAR,
                metrics VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                created TIMESTAMP NOT NULL)""",
            "CREATE SEQUENCE run_id_seq START 1",
            """CREATE TABLE training_runs (
                run_id BIGINT PRIMARY KEY DEFAULT nextval('run_id_seq'),
                adapter_version VARCHAR,
                parent_version VARCHAR,
                snapshot_id VARCHAR,
                config VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                reason VARCHAR,
                metrics VARCHAR NOT NULL,
                started TIMESTAMP NOT NULL,
                finished TIMESTAMP)""",
        ),
    ),
    (
        3,
        "export snapshots (lineage of the researchers' and trainer's datasets)",
        (
            """CREATE TABLE snapshots (
                snapshot_id VARCHAR PRIMARY KEY,
                parent VARCHAR,
                since_vote_id BIGINT NOT NULL,
                vote_id_max BIGINT NOT NULL,
                rows_train BIGINT NOT NULL,
                rows_eval BIGINT NOT NULL,
                path VARCHAR NOT NULL,
                created TIMESTAMP NOT NULL)""",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest applied migration (0 for an empty database)."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
    )
    row = first(con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations"))
    return int(row[0])


def migrate(
    con: duckdb.DuckDBPyConnection,
    target: int | None = None,
    on_applied: Callable[[int, str], None] | None = None,
) -> int:
    """Apply the missing migrations up to `target` (default: all). Returns the schema version now in force."""
    numbers = [m[0] for m in MIGRATIONS]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"MIGRATIONS must be numbered 1..n without gaps, got {numbers}")
    target = SCHEMA_VERSION if target is None else target
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"target must be in 0..{SCHEMA_VERSION}, got {target}")
    have = current_version(con)
    if have > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {have} is newer than this code knows ({SCHEMA_VERSION}); "
            "upgrade ncp-arena instead of opening it with an older release"
        )
    for number, name, statements in MIGRATIONS:
        if number <= have or number > target:
            continue
        con.begin()
        try:
            for sql in statements:
                con.execute(sql)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [number, name, utcnow()])
            con.commit()
        except duckdb.Error:
            con.rollback()
            raise
        log.info("applied migration %d: %s", number, name)
        if on_applied is not None:
            on_applied(number, name)
    return max(have, min(target, SCHEMA_VERSION))
