"""`python -m ncp.shapes.pretrain` end to end on a tiny budget: a loadable pipeline, checkpoints, and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(tmp: Path, unet_steps: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "ncp.shapes.pretrain",
        "--out",
        str(tmp / "out"),
        "--work",
        str(tmp / "work"),
        "--vae-steps",
        "2",
        "--unet-steps",
        str(unet_steps),
        "--batch",
        "2",
        "--vae-batch",
        "2",
        "--ckpt-every",
        "2",
        "--decoder-steps",
        "2",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)


def test_pretrain_writes_a_loadable_pipeline_and_resumes(tmp_path: Path) -> None:
    run(tmp_path, 2)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle on the left, white background", num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    assert (tmp_path / "work" / "latest" / "step.txt").read_text() == "2"
    run(tmp_path, 4)  # resumes from the step-2 checkpoint instead of starting over
    assert (tmp_path / "work" / "latest" / "step.txt").read_text() == "4"
    log = [json.loads(x) for x in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert sum(1 for r in log if r.get("stage") == "vae" and r.get("done")) == 1, "the VAE stage ran twice"
    done = next(r for r in log if r.get("stage") == "vae" and r.get("done"))
    # The latents are centred per channel (the pipeline decodes them with no shift): means ~0 on a fresh batch.
    assert max(abs(m) for m in done["channel_means_after"]) < 0.1, done
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear", "the shipped recipe's noise schedule"
