"""bench/ncp_vs_latent.py: no training or validation prompt is a gate or test probe (the old sweep's leak), the
timestep-weights and random-encoder options do what the arms need, and the quick mode writes its JSON and section
(slow: minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.ncp_vs_latent import MODES, training_prompts
from ncp.evaluate import TEST_PROBES, gate_probe_prompts
from ncp.evaluate import test_probe_prompts as unseen_probe_prompts
from ncp.losses import timestep_weights
from ncp.perception import random_encoder
from ncp.pipelines import build_tiny_sd15
from ncp.train_config import TrainConfig


def test_training_and_validation_prompts_exclude_every_probe() -> None:
    f = MODES["full"]
    prompts = training_prompts(f.train_prompts + f.val_prompts)
    assert len(set(prompts)) == len(prompts) == f.train_prompts + f.val_prompts
    assert not set(prompts) & (set(gate_probe_prompts(256)) | set(unseen_probe_prompts(TEST_PROBES)))
    assert training_prompts(10, skip=5) == prompts[5:15]


def test_timestep_weights_bin_the_schedule_and_random_encoder_is_fresh(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"weights": [0.5, 1.5]}))
    w = timestep_weights(str(path), 1000)
    assert w.shape == (1000,) and w[499] == 0.5 and w[500] == 1.5
    assert TrainConfig(space="latent", timestep_weights=str(path)).timestep_weights == str(path)
    with pytest.raises(ValueError, match="is not a file"):
        TrainConfig(timestep_weights=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="needs space='ncp'"):
        TrainConfig(space="latent", random_encoder=True)
    unet = build_tiny_sd15(seed=0).unet
    enc = random_encoder(unet, seed=1)
    assert type(enc) is type(unet) and not any(p.requires_grad for p in enc.parameters())
    assert not torch.equal(enc.conv_in.weight, unet.conv_in.weight)
    assert torch.equal(enc.conv_in.weight, random_encoder(unet, seed=1).conv_in.weight)  # seeded


@pytest.mark.slow
def test_quick_mode_writes_its_json_and_section(tmp_path: Path) -> None:
    from bench.ncp_vs_latent import main

    out, doc = tmp_path / "r.json", tmp_path / "B.md"
    main(["--quick", "--work", str(tmp_path / "w"), "--out", str(out), "--doc", str(doc)])
    res = json.loads(out.read_text())
    assert {r["arm"] for r in res["runs"]} == {"latent", "ncp", "latent-w", "ncp-rand"}
    assert res["estimate_full_min"] <= 90 and res["cpu_s"] < 300
    text = doc.read_text()
    assert "<!-- BEGIN ncp-vs-latent -->" in text and "python -m bench.ncp_vs_latent --threads 1" in text
    assert "Full figures pending" in text and "Verdict" in text
