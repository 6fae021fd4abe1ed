"""docs/DATA.md's majority query, run as written on a real export (file-backed DuckDB store, real PNGs) with repeated,
conflicting ratings of the same image pairs: 2-1 keeps the majority's image, a 1-1 split (the third a tie) and a
pair of ties and both-bad are dropped; the repeated rows share the image uids and differ in pair and ranking id.

    python -m pytest -q tests/test_data_doc.py
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from test_store_export import Arena

from feedback_store.export import export_snapshot

DOC = Path(__file__).resolve().parents[1] / "docs" / "DATA.md"


def test_the_documented_majority_query_aggregates_repeated_ratings(tmp_path: Path) -> None:
    arena = Arena(tmp_path)
    try:
        # Arena.vote walks its 12 prompts in turn: vote k lands on prompt k % 12, always the same two images.
        plan = {0: ("left", "left", "right"), 1: ("left", "right", "tie"), 2: ("tie", "both_bad", "tie")}
        for rnd, rater in enumerate(("r_ann", "r_ben", "r_cat")):
            for prompt in range(12):
                arena.vote(rater, plan.get(prompt, ("right",) * 3)[rnd])
        snap = export_snapshot(arena.store, tmp_path / "snapshots", eval_fraction=0.0)
    finally:
        arena.store.close()
    train = snap.files["train.parquet"]
    rows = pq.read_table(train).to_pylist()
    first = [r for r in rows if r["caption"] == rows[0]["caption"]]
    assert len(first) == 3 and len({(r["image_0_uid"], r["image_1_uid"]) for r in first}) == 1
    assert len({r["pair_id"] for r in first}) == 3 and len({r["ranking_id"] for r in first}) == 3

    sql = re.search(r"```sql\n(.*?)```", DOC.read_text(), re.S).group(1).replace("'train.parquet'", f"'{train}'")
    got = {r[0]: r[1:] for r in duckdb.sql(sql).fetchall()}
    by_prompt = {i: rows[i]["caption"] for i in range(12)}  # the first 12 rows are the first round, in prompt order
    left_uid = {i: rows[i]["image_0_uid"] for i in range(12)}
    right_uid = {i: rows[i]["image_1_uid"] for i in range(12)}
    assert got[by_prompt[0]][:2] == (left_uid[0], right_uid[0]) and got[by_prompt[0]][2:] == (3, 3)
    assert by_prompt[1] not in got and by_prompt[2] not in got  # a 1-1 split; only ties and both-bad
    assert all(got[by_prompt[i]][:2] == (right_uid[i], left_uid[i]) for i in range(3, 12))
    assert len(got) == 10
