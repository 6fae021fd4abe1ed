"""How much a round trains, and what it may start from: at most `max_epochs` passes over its pairs (a first round on a
few pairs overfits them: the shapes default base collapsed to empty canvases at 7.5 passes), and a rejected candidate
whose probe judge fell clearly below the version it was compared with does not seed the next round."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.loop import judge_drop
from jobs.loop_config import LoopConfig
from jobs.training_pairs import distinct_image_pairs


def test_a_round_passes_over_its_pairs_at_most_max_epochs_times() -> None:
    cfg = LoopConfig(max_steps=150, batch_size=8, max_epochs=2.0)
    assert cfg.round_steps(160) == 40  # 2 passes over 160 pairs in batches of 8
    assert cfg.round_steps(1214) == 150  # enough pairs: max_steps decides
    assert cfg.round_steps(3) == 1 and cfg.round_steps(0) == 1
    assert LoopConfig(max_steps=150, batch_size=8, max_epochs=100).round_steps(160) == 150
    with pytest.raises(ValueError, match="max_epochs"):
        LoopConfig(max_epochs=0)


def test_max_pair_passes_caps_a_round_by_its_distinct_image_pairs_not_its_votes() -> None:
    """Three raters on each of 100 image pairs: 300 rows, 100 distinct pairs; 1.5 passes over them is 19 steps."""
    cfg = LoopConfig(max_steps=100, batch_size=8, max_epochs=2.0, max_pair_passes=1.5)
    assert cfg.round_steps(300, 100) == 19
    assert cfg.round_steps(300, 1000) == 75  # many distinct pairs: max_epochs over the rows decides
    assert cfg.round_steps(300) == 75  # no count given: no pair cap
    assert LoopConfig(max_steps=100, batch_size=8).round_steps(300, 100) == 75  # 0 (the default): no pair cap
    assert cfg.round_steps(300, 0) == 1
    with pytest.raises(ValueError, match="max_pair_passes"):
        LoopConfig(max_pair_passes=-1)


def test_distinct_image_pairs_counts_a_pair_once_whoever_voted_and_in_either_order(tmp_path) -> None:
    rows = {"image_0_uid": ["a", "a", "b", "c", "e"], "image_1_uid": ["b", "b", "a", "d", "c"]}
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    assert distinct_image_pairs(tmp_path / "train.parquet") == 3  # {a,b} three times, {c,d}, {c,e}


def test_judge_drop_reads_the_candidate_against_what_it_was_compared_with() -> None:
    vs_base = {"base_judge": 0.604, "versions": {"candidate": {"judge": 0.426}}}
    assert judge_drop(vs_base) == pytest.approx(0.178)
    vs_serving = {"base_judge": 0.6, "versions": {"candidate": {"judge": 0.70}, "serving": {"judge": 0.68}}}
    assert judge_drop(vs_serving) == pytest.approx(-0.02)  # better than the served version: no drop
    assert judge_drop({"versions": {"candidate": {"implicit_acc": 0.6}}}) == 0.0  # no judge (SDXL): no evidence
    assert judge_drop(vs_base) > LoopConfig().continue_max_drop >= judge_drop(vs_serving)
