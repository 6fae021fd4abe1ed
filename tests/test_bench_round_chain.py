"""bench/round_chain.py: the chained rounds of both references run as real subprocesses on the shapes model and the
doc section's verdicts are generated from the rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench import round_chain
from jobs.runtime import SHAPES_MODEL


def _png(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _result() -> dict:
    def row(r: int, gain: float) -> dict:
        return {"round": r, "steps": 400 * r, "judge": 0.65 + gain, "base_judge": 0.65, "gain": gain, "ci": 0.02}

    settings = {"model": "runs/shapes-headroom", "pairs_file": "snap.parquet", "rounds": 3, "steps": 400, "lr": 1e-3,
                "beta": 5e5, "timestep_low": 0.3, "probes": 48, "probe_seeds": 2}  # fmt: skip
    return {"settings": settings, "wall_s": 600.0,
            "arms": {"base": [row(1, 0.01), row(2, 0.03), row(3, 0.02)],
                     "init": [row(1, 0.01), row(2, -0.02), row(3, -0.05)]}}  # fmt: skip


def test_section_reads_both_arms_from_the_rows() -> None:
    text = round_chain.markdown(_result())
    assert "| 2 | 800 | +0.030 ± 0.020 | -0.020 ± 0.020 |" in text
    assert "--pairs-file <a snapshot's train.parquet> --rounds 3 --steps 400`" in text
    assert "- Reference `base`: mean gain over rounds 2-3 +0.025; best +0.030 after round 2; last +0.020." in text
    assert "- Reference `init`: mean gain over rounds 2-3 -0.035; best +0.010 after round 1; last -0.050." in text


@pytest.mark.slow
def test_a_tiny_chain_runs_both_references_from_one_shared_round(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 8
    table = pa.table({"caption": [f"a red circle on the left, gray background {i}" for i in range(n)],
                      "jpg_0": pa.array([_png(rng) for _ in range(n)], pa.binary()),
                      "jpg_1": pa.array([_png(rng) for _ in range(n)], pa.binary()),
                      "label_0": [1.0] * n, "label_1": [0.0] * n})  # fmt: skip
    pq.write_table(table, tmp_path / "pairs.parquet")
    out = tmp_path / "chain.json"
    args = ["--model", str(SHAPES_MODEL), "--pairs-file", str(tmp_path / "pairs.parquet"), "--rounds", "2",
            "--steps", "2", "--probes", "2", "--probe-seeds", "1", "--out", str(out), "--docs", str(tmp_path)]  # fmt: skip
    round_chain.main(args)
    res = json.loads(out.read_text())
    assert set(res["arms"]) == {"base", "init"} and (tmp_path / "round_chain.png").stat().st_size > 0
    assert "<!-- BEGIN round-chain -->" in (tmp_path / "BENCHMARKS.md").read_text()
    base, init = res["arms"]["base"], res["arms"]["init"]
    assert base[0] == init[0] and [r["steps"] for r in base] == [r["steps"] for r in init] == [2, 4]
    assert base[1]["gain"] == pytest.approx(base[1]["judge"] - base[1]["base_judge"], abs=1e-6)
    with pytest.raises(SystemExit):
        round_chain.main(["--pairs-file", str(tmp_path / "missing.parquet")])
