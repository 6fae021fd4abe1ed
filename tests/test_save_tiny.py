"""`python -m ncp.pipelines save-tiny`: the tests' tiny SDXL / SD1.5 pipelines saved as diffusers folders a researcher
loads with stock diffusers and the project's loader, and a tokenizer long enough for every arena prompt (two captions
that differ only at the end must not be cut into one conditioning)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from jobs.prompts import MAX_PROMPT_CHARS
from ncp.pipelines import TINY_MAX_TOKENS, build_tiny_sd15, encode_prompts, is_sdxl, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
CAPTION = "a large red circle above a large purple triangle, black background"


@pytest.mark.parametrize("kind, cls", [("sdxl", StableDiffusionXLPipeline), ("sd15", StableDiffusionPipeline)])
def test_save_tiny_writes_a_pipeline_stock_diffusers_loads(tmp_path: Path, kind: str, cls: type) -> None:
    out = tmp_path / f"tiny-{kind}"
    cmd = [sys.executable, "-m", "ncp.pipelines", "save-tiny", "--kind", kind, "--out", str(out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["out"] == str(out)
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    pipe = cls.from_pretrained(out)
    assert pipe.tokenizer.model_max_length == TINY_MAX_TOKENS
    g = torch.Generator().manual_seed(0)
    image = pipe(CAPTION, num_inference_steps=1, output_type="pt", generator=g).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert is_sdxl(load_pipeline(str(out))) == (kind == "sdxl")
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)  # --out exists: refused
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_the_tiny_tokenizer_covers_the_longest_arena_prompt() -> None:
    pipe = build_tiny_sd15()
    assert TINY_MAX_TOKENS >= MAX_PROMPT_CHARS + 2  # one token per character, plus BOS/EOS
    long = ("a red circle " * 30)[:MAX_PROMPT_CHARS]
    assert len(pipe.tokenizer(long).input_ids) <= TINY_MAX_TOKENS
    a, b = CAPTION, CAPTION.replace("black background", "white background")
    cond = encode_prompts(pipe, [a, b])
    assert not torch.allclose(cond.encoder_hidden_states[0], cond.encoder_hidden_states[1])
