"""Schema and migrations: a fresh database and one migrated from an older release end up identical, keep their data,
and refuse what they must (a newer schema, a second store on the same file)."""

from __future__ import annotations

from datetime import datetime

import duckdb
import pytest
from store_fixtures import fast_images

from feedback_store import SCHEMA_VERSION, FeedbackStore, StoreClosed, schema
from feedback_store.requests import token_hash


def columns(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    return con.execute(
        "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
        "ORDER BY table_name, ordinal_position"
    ).fetchall()


def test_fresh_schema_records_every_migration(tmp_path) -> None:
    with FeedbackStore(tmp_path / "a.duckdb") as store:
        assert store.schema_version == SCHEMA_VERSION == len(schema.MIGRATIONS)
        rows = store._cur().execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        assert rows == [(n, name) for n, name, _ in schema.MIGRATIONS]
        assert set(store.counts()) == {
            "raters",
            "prompts",
            "images",
            "pairs",
            "votes",
            "adapter_versions",
            "training_runs",
            "snapshots",
        }
    # reopening applies nothing twice
    with FeedbackStore(tmp_path / "a.duckdb") as store:
        n = store._cur().execute("SELECT count(*) FROM schema_migrations").fetchone()[0]
        assert n == SCHEMA_VERSION


def test_migrating_a_version_1_database_keeps_its_data_and_matches_fresh(tmp_path) -> None:
    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    assert schema.migrate(con, target=1) == 1
    assert "adapter_versions" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}
    # data written by the version-1 release: a rater, a prompt, two images and an issued, not yet voted pair
    now = datetime(2030, 1, 1)
    con.execute("INSERT INTO raters (pseudonym, created) VALUES ('r_old', ?)", [now])
    con.execute(
        "INSERT INTO prompts (text, source, category, created) VALUES ('a blue square', 'pool', NULL, ?)", [now]
    )
    for version, seed in (("base", 1), ("v1", 2)):
        con.execute(
            "INSERT INTO images (prompt_id, path, sha256, base_model, adapter_version, seed, scheduler, steps, "
            "guidance, width, height, created) VALUES (1, ?, ?, 'm', ?, ?, 'ddim', 10, 3.0, 8, 8, ?)",
            [f"{version}.png", f"{seed:064x}", version, seed, now],
        )
    token = "t" * 43
    con.execute(
        "INSERT INTO pairs (prompt_id, left_image_id, right_image_id, left_version, right_version, kind, session, "
        "token_sha256, issued_at, expires_at) VALUES (1, 1, 2, 'base', 'v1', 'cross_version', 's_old', ?, ?, ?)",
        [token_hash(token), now, datetime(2030, 1, 2)],
    )
    con.close()

    with FeedbackStore(old) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.rater("r_old").status == "active"
        assert store.prompt(1).text == "a blue square"
        receipt = store.record_vote(token, "s_old", "right", "r_old", now=datetime(2030, 1, 1, 12))
        assert (receipt.chosen_image_id, receipt.rejected_image_id) == (2, 1)
        store.register_adapter_version("v1", "base", None, {"loss": 0.6})  # a table from migration 2 works
        migrated = columns(store._cur())
    fresh = duckdb.connect(":memory:")
    schema.migrate(fresh)
    assert migrated == columns(fresh)


def test_a_newer_schema_is_refused(tmp_path) -> None:
    path = tmp_path / "new.duckdb"
    con = duckdb.connect(str(path))
    schema.migrate(con)
    con.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', ?)", [SCHEMA_VERSION + 1, datetime.now()])
    con.close()
    with pytest.raises(RuntimeError, match="newer than this code knows"):
        FeedbackStore(path)
    FeedbackStore(tmp_path / "other.duckdb").close()  # the refused file was released; others still open


def test_one_store_per_file_per_process_and_closed_store_refuses(tmp_path) -> None:
    path = tmp_path / "x.duckdb"
    store = FeedbackStore(path)
    with pytest.raises(RuntimeError, match="already open"):
        FeedbackStore(path)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosed):
        store.counts()
    FeedbackStore(path).close()  # free again after close


def test_ids_are_never_reused_after_deletion(tmp_path) -> None:
    """Incremental exports select vote_id > last snapshot's max: a deleted vote's id must not come back."""
    with FeedbackStore(tmp_path / "ids.duckdb") as store:
        pid = store.add_prompt("a green triangle")
        img = fast_images(store, pid, ("base", "v1"))
        store.ensure_rater("r_a")
        store.ensure_rater("r_b")
        t1 = store.issue_pair(pid, img["base"], img["v1"], "cross_version", "s1")
        first = store.record_vote(t1.token, "s1", "left", "r_a")
        assert store.request_deletion("r_a") == 1
    with FeedbackStore(tmp_path / "ids.duckdb") as store:  # the sequence survives a reopen too
        t2 = store.issue_pair(pid, img["base"], img["v1"], "cross_version", "s2")
        second = store.record_vote(t2.token, "s2", "left", "r_b")
        assert second.vote_id > first.vote_id
