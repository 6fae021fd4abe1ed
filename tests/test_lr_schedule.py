"""ncp.train --lr-schedule: the learning rate after warm-up is constant or decays to 0 at max_steps, and a real training
run on a tiny SD1.5 pipeline steps with exactly those rates (read back from its progress file)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ncp.pipelines import build_tiny_sd15
from ncp.train import build_parser, config_from_args
from ncp.trainer import TrainConfig, lr_factor, train


def test_constant_linear_and_cosine_factors_after_a_linear_warm_up() -> None:
    def factors(kind: str) -> list[float]:
        cfg = TrainConfig(lr_schedule=kind, lr_warmup_steps=2, max_steps=10)
        return [lr_factor(cfg, s) for s in range(11)]

    const, lin, cos = factors("constant"), factors("linear"), factors("cosine")
    assert const[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lin[:3] == const[:3] == cos[:3]  # warm-up shared
    assert const[3:] == [1.0] * 8
    assert lin[2:] == pytest.approx([1 - k / 8 for k in range(9)])  # 1 at the end of warm-up, 0 at max_steps
    assert cos[2] == 1.0 and cos[6] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(cos[2:], cos[3:], strict=False))  # monotone decay
    assert cos[4] > lin[4] and cos[8] < lin[8]  # the cosine holds the rate longer, then drops faster


def test_the_cli_reads_the_schedule_and_refuses_an_unknown_one() -> None:
    parser = build_parser()
    base = ["--model", "m", "--data", "d", "--out", "o"]
    assert config_from_args(parser.parse_args(base)).lr_schedule == "constant"  # the default keeps old runs' rates
    assert config_from_args(parser.parse_args([*base, "--lr-schedule", "cosine"])).lr_schedule == "cosine"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--lr-schedule", "step"])
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")  # type: ignore[arg-type]


def _pairs(path: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    rows = [(f"a red circle number {i}", png(), png(), float(i % 2), float(1 - i % 2)) for i in range(n)]
    cols = list(zip(*rows, strict=True))
    pq.write_table(pa.table({"caption": list(cols[0]), "jpg_0": pa.array(cols[1], pa.binary()),
                             "jpg_1": pa.array(cols[2], pa.binary()), "label_0": list(cols[3]),
                             "label_1": list(cols[4])}), path)  # fmt: skip
    return path


def test_a_training_run_steps_with_the_decayed_rates(tmp_path: Path) -> None:
    build_tiny_sd15(seed=0).save_pretrained(tmp_path / "sd15")
    data, progress = _pairs(tmp_path / "pairs.parquet"), tmp_path / "progress.jsonl"
    cfg = TrainConfig(lr=1e-3, lr_schedule="linear", max_steps=4, batch_size=2, lora_rank=4, lora_alpha=4.0,
                      beta=5000.0, progress_file=str(progress))  # fmt: skip
    train(cfg, model=str(tmp_path / "sd15"), data=str(data), out=tmp_path / "adapter", show_progress=False)
    steps = [e for e in map(json.loads, progress.read_text().splitlines()) if e.get("event") == "step"]
    # the rate logged after optimizer step k is the one the next step would use: 1e-3 x (1 - k/4)
    assert [e["lr"] for e in steps] == pytest.approx([1e-3 * (1 - k / 4) for k in range(1, 5)])
    assert all(math.isfinite(e["loss"]) for e in steps)
