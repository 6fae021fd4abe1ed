"""Which of a snapshot's pairs a round trains on: strict preferences only, optionally only the served version's own
pairs (on-policy), and no rater above a share of them (the poisoning bound)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def cap_rater_share(src: Path, dst: Path, max_share: float, min_pairs: int, only_version: str | None = None) -> int:
    """Write the strict-preference rows of `src` to `dst` with no rater above `max_share` of the rows (the newest
    rows of an over-represented rater are dropped); returns the row count. With `only_version`, only pairs whose two
    images that version drew (its on-policy pairs) are kept, before the cap."""
    table = pq.read_table(src)
    table = table.filter((pc.field("has_label")) & (pc.field("label_0") != 0.5))
    if only_version is not None:
        table = table.filter((pc.field("adapter_version_0") == only_version)
                             & (pc.field("adapter_version_1") == only_version))  # fmt: skip
    raters = table.column("rater").to_pylist()
    cap = max(1, math.floor(max_share * max(len(raters), min_pairs)))
    seen: dict[str, int] = {}
    keep = []
    for r in raters:
        seen[r] = seen.get(r, 0) + 1
        keep.append(seen[r] <= cap)
    table = table.filter(pa.array(keep, type=pa.bool_()))  # typed: an empty list would be a null array
    pq.write_table(table, dst)
    return table.num_rows


def distinct_image_pairs(path: Path) -> int:
    """How many distinct image pairs the rows of a training file hold (either order counts once): several raters vote
    on one pair, so a pass over the rows goes over each image pair several times."""
    table = pq.read_table(path, columns=["image_0_uid", "image_1_uid"])
    left, right = table.column("image_0_uid").to_pylist(), table.column("image_1_uid").to_pylist()
    return len({frozenset((a, b)) for a, b in zip(left, right, strict=True)})
