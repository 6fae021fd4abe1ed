"""jobs/training_pairs.py: the pairs a round trains on: strict preferences, the served version's own pairs when the
window asks for them (none at all is an empty file, not an error), and the per-rater cap."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.training_pairs import cap_rater_share


def _snapshot(path: Path) -> Path:
    rows = [  # (rater, label_0, has_label, version_0, version_1)
        ("a", 1.0, True, "v0001", "v0001"), ("a", 0.0, True, "v0001", "v0001"), ("a", 1.0, True, "v0001", "v0001"),
        ("b", 0.5, True, "v0001", "v0001"), ("b", 1.0, False, "v0001", "v0001"), ("b", 1.0, True, "base", "v0001"),
        ("c", 0.0, True, "base", "base"),
    ]  # fmt: skip
    cols = list(zip(*rows, strict=True))
    table = pa.table({"rater": cols[0], "label_0": cols[1], "has_label": cols[2], "adapter_version_0": cols[3],
                      "adapter_version_1": cols[4]})  # fmt: skip
    pq.write_table(table, path)
    return path


def test_window_and_cap_keep_the_served_versions_strict_pairs(tmp_path: Path) -> None:
    src = _snapshot(tmp_path / "snap.parquet")
    assert cap_rater_share(src, tmp_path / "all.parquet", 1.0, 1) == 5  # no ties, no both-bad
    assert cap_rater_share(src, tmp_path / "v1.parquet", 1.0, 1, only_version="v0001") == 3
    assert set(pq.read_table(tmp_path / "v1.parquet").column("rater").to_pylist()) == {"a"}
    assert cap_rater_share(src, tmp_path / "capped.parquet", 0.4, 1) == 4  # rater a: at most floor(0.4 x 5) = 2
    # A version just promoted has no pairs of its own yet: an empty file, so the loop can wait instead of failing.
    assert cap_rater_share(src, tmp_path / "none.parquet", 1.0, 1, only_version="v0002") == 0
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
