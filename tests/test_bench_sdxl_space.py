"""bench/sdxl_space.py's tiny path on the CPU (the GPU run is the same code on the full-size SDXL pipeline): each card
gets a plan, a round with the plan's trainer options, a hot-swap, rater accounting and a docs row; the 24 GB card
pauses generation (its round ran while the queue served the rater), the 80 GB card trains beside it; the full-size
run refuses to start without CUDA with a message that says how to run it.

    python -m pytest -q tests/test_bench_sdxl_space.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import sdxl_space as bench


def test_tiny_run_covers_every_card(tmp_path: Path) -> None:
    out, docs = tmp_path / "s.json", tmp_path / "BENCHMARKS.md"
    args = ["--tiny", "--device", "cpu", "--cards", "24", "80", "--micro-steps", "1", "--budget-s", "3000"]
    assert bench.main([*args, "--out", str(out), "--docs", str(docs)]) == 0
    data = json.loads(out.read_text())
    assert data["tiny"] and len(data["idle_pair_s"]) == 2
    cards = data["cards"]  # the two modes: 24 GB pauses generation for the round, 80 GB trains beside it
    assert sorted(cards, key=int) == ["24", "80"]
    for gb, rec in cards.items():
        assert "error" not in rec, (gb, rec.get("traceback") or rec.get("error"))
        assert math.isfinite(rec["round_200_steps_s"]) and rec["round_200_steps_s"] > 0
        rung = rec["plan"]["rung"]
        assert rung["micro_batch"] * rung["accumulation"] == bench.BATCH
        assert rec["swap_stall_s"] >= 0 and rec["raters"]["requests"] >= 0
    assert cards["24"]["plan"]["mode"] == "exclusive" and cards["80"]["plan"]["mode"] == "shared"
    pause = cards["24"]["pause"]  # the round ran with generation paused, then it resumed
    assert pause is not None and pause["queued_at_start"] >= 1 and pause["seconds"] > 0
    assert cards["24"]["pair_s_during_round"] == []  # nothing generated while the round had the card
    text = docs.read_text()
    assert "<!-- BEGIN sdxl-space -->" in text and "| 24 GB | exclusive |" in text and "CPU smoke" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_full_run_without_cuda_says_how_to_run_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert bench.main(["--device", "cuda", "--out", str(tmp_path / "x.json"), "--docs", ""]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "python bench/sdxl_space.py --device cuda" in err and "--tiny" in err
