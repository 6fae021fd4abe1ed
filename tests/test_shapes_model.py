"""The embedded shapes-world model: loads offline from the repo folder as a stock diffusers pipeline, generates images
of the right size that follow the prompt better than chance, and takes the same LoRA / NCP code path as SD1.5."""

from __future__ import annotations

import json

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from jobs.runtime import SHAPES_MODEL
from ncp.adapters import LoraSettings, add_lora, lora_parameters
from ncp.perception import per_sample_errors
from ncp.pipelines import encode_prompts, load_pipeline
from ncp.shapes.grammar import VOCABULARY, probe_prompts
from ncp.shapes.judge import score
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SIZE, LATENT_SIZE


def test_folder_is_a_small_standard_pipeline() -> None:
    index = json.loads((SHAPES_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    size = sum(f.stat().st_size for f in SHAPES_MODEL.rglob("*") if f.is_file())
    assert size < 25 * 2**20, f"model folder is {size / 2**20:.1f} MB; the limit is 25 MB"
    assert (SHAPES_MODEL / "README.md").exists(), "the model card is missing"


def test_loads_offline_and_generates_prompt_following_images() -> None:
    pipe = DiffusionPipeline.from_pretrained(SHAPES_MODEL, local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.set_progress_bar_config(disable=True)
    for word in VOCABULARY:  # every grammar word is one token
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    prompts = probe_prompts(8, seed=3)
    gen = torch.Generator().manual_seed(0)
    images = pipe(prompts, num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE, generator=gen).images
    assert all(im.size == (IMAGE_SIZE, IMAGE_SIZE) for im in images)
    scores = [score(im, p) for im, p in zip(images, prompts, strict=True)]
    # Chance level for colour is 1/6: the trained model must clearly beat it.
    assert np.mean([s.attributes_correct["color"] for s in scores]) > 0.3
    assert np.mean([s.overall for s in scores]) > 0.3


def test_lora_and_ncp_follow_the_sd_code_path() -> None:
    pipe = load_pipeline(SHAPES_MODEL)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    cond = encode_prompts(pipe, probe_prompts(2, seed=1))
    latents = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE)
    errors = per_sample_errors(
        pipe.unet,
        pipe.scheduler,
        latents,
        torch.randn_like(latents),
        torch.tensor([100, 700]),
        (cond.encoder_hidden_states, None),
        space="ncp",
        with_reference=True,
        variance_noise=torch.randn_like(latents),
    )
    assert errors.policy.shape == (2,) and torch.allclose(errors.policy, errors.reference)  # LoRA B starts at 0
    errors.policy.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(pipe.unet))
