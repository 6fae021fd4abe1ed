"""bench/serving_cuda.py: the GPU serving check runs the same code on the CPU (fp32), every check holds there, its
LoRA shape is the deployment's, and a result renders into a docs section that shows a failed check.

    python -m pytest -q tests/test_bench_serving_cuda.py      # about 1 min on 2 CPU cores
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import serving_cuda
from jobs.loop import LoopConfig


def test_the_check_uses_the_deployments_lora_shape() -> None:
    assert (serving_cuda.LORA_RANK, serving_cuda.LORA_ALPHA) == (LoopConfig().lora_rank, LoopConfig().lora_alpha)


@pytest.mark.slow
def test_serving_check_holds_on_the_cpu_and_renders(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "s.json"
    assert serving_cuda.main(["--device", "cpu", "--prompts", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["device"], result["dtype"]) == ("cpu", "float32")
    assert len(result["checks"]) == 6 and all(result["checks"].values())
    assert 0.3 < result["judge"] <= 1.0 and result["v1_mean_abs_change"] > 0.5
    result["checks"]["battle-slot image equals the served one"] = False
    serving_cuda.publish(result, docs=tmp_path / "docs")
    text = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "<!-- BEGIN serving-cuda -->" in text and "| battle-slot image equals the served one | **NO** |" in text
    assert json.loads((tmp_path / "docs" / "benchmarks" / "serving_cuda.json").read_text()) == result
