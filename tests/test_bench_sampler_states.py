"""bench/sampler_states.py: the recorded states are the sampler's own (eps* puts the final latent exactly at each
state), a combined LoRA's delta is the weighted sum of its sources' and loads with the stock loader, and a short
round of either arm trains and saves an adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

import bench.sampler_states as ss
from ncp.adapters import LoraSettings, add_lora, save_adapter
from ncp.perception import noisy_latents
from ncp.pipelines import build_tiny_sd15
from ncp.shapes.grammar import probe_prompts
from ncp.shapes.model import DEFAULT_STEPS

PROMPTS = probe_prompts(4, seed=5, two_object_prob=0.0)


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    torch.manual_seed(0)
    return ss.make_pairs(ss.fresh_pipeline(), PROMPTS, draw=0)


def test_states_are_the_sampler_trajectory_and_eps_star_reaches_them(pairs: list[dict]) -> None:
    assert pairs, "the judge tied every pair"
    pipe = ss.fresh_pipeline()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    p = pairs[0]
    states, t_k = p["states"][0], p["timesteps"]
    assert states.shape[0] == len(t_k) == DEFAULT_STEPS and t_k[0] > t_k[-1]  # one state per step, high noise first
    assert not torch.equal(p["x0"][0], p["x0"][1]) and not torch.equal(states[0], p["states"][1][0])  # two seeds
    # The first state is the seed's noise (VP-scaled), the last is close to the image the sampler ends at.
    assert abs(states[0].std().item() - 1.0) < 0.2
    assert (states[-1] - p["x0"][0]).pow(2).mean() < (states[0] - p["x0"][0]).pow(2).mean()
    t = torch.tensor([int(round(t_k[3].item()))])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0, x_t = p["x0"][0][None], states[3][None]
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    assert torch.allclose(noisy_latents(sched, x0, eps, t), x_t, atol=1e-5)


def _adapter(tmp: Path, seed: int) -> Path:
    pipe = build_tiny_sd15(seed=0)
    settings = LoraSettings(rank=8, alpha=8.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    add_lora(pipe.unet, settings)
    g = torch.Generator().manual_seed(seed)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=g) * 0.1
    return save_adapter(pipe, pipe.unet, tmp / f"a{seed}", settings)


def test_derived_lora_is_the_weighted_sum_of_deltas_and_loads(tmp_path: Path) -> None:
    a, b = _adapter(tmp_path, 1), _adapter(tmp_path, 2)
    ss.derived(tmp_path / "avg", [a, b], [0.25, 1.5])
    sa, sb, sc = (load_file(str(f / ss.WEIGHTS)) for f in (a, b, tmp_path / "avg"))
    downs = [k for k in sa if ".down." in k]
    assert downs
    for k in downs:
        up = k.replace(".down.", ".up.")
        want = 0.25 * sa[up] @ sa[k] + 1.5 * sb[up] @ sb[k]
        assert sc[k].shape[0] == 16 and torch.allclose(sc[up] @ sc[k], want, atol=1e-6)
    pipe = build_tiny_sd15(seed=0)
    pipe.load_lora_weights(str(tmp_path / "avg"), adapter_name="avg")  # rank 16, alpha 16: scale 1
    assert pipe.unet.peft_config["avg"].r == 16 and pipe.unet.peft_config["avg"].lora_alpha == 16


@pytest.mark.parametrize("arm", ["forward", "sampler"])
def test_a_short_round_of_either_arm_moves_the_lora(pairs: list[dict], arm: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ss, "STEPS", 2)
    monkeypatch.setattr(ss, "BATCH", 2)
    ss.train_round(pairs, arm, 0, tmp_path / arm)
    weights = load_file(str(tmp_path / arm / ss.WEIGHTS))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if ".up." in k)  # B starts at 0: it trained
    assert all(torch.isfinite(v).all() for v in weights.values())
