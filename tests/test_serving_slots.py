"""Warmed adapter slots: zero LoRAs leave the base output unchanged, and the first swap is an exact in-place hot-swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jobs.registry import BASE
from ncp.adapters import LoraSettings
from ncp.pipelines import build_tiny_sd15
from ncp.serving import GenerationService, SamplingConfig
from tests.helpers.adapters import random_adapter


def adapter(tmp: Path, rank: int = 8) -> Path:
    return random_adapter(build_tiny_sd15(), tmp / "adapter", rank=rank)


def pixels(service: GenerationService, version: str) -> np.ndarray:
    return np.asarray(service.generate("a red circle", [7], version=version)[0].image, dtype=np.int16)


def test_warm_slots_are_identity_and_first_swap_matches_a_cold_load(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = adapter(tmp_path)
    sampling = SamplingConfig(steps=2, width=32, height=32)
    warm = GenerationService(build_tiny_sd15(), "tiny", sampling, lora_rank=8)
    before = pixels(warm, BASE)
    assert warm.warm_slots(LoraSettings().target_modules, alpha=8) > 0
    assert np.array_equal(pixels(warm, BASE), before), "zero adapters must not change the base model's images"
    warm.register_version("v1", folder)
    warm.swap_adapter("v1")
    cold = GenerationService(build_tiny_sd15(), "tiny", sampling, lora_rank=8)
    cold.register_version("v1", folder)
    cold.swap_adapter("v1")
    assert not np.array_equal(pixels(cold, "v1"), before), "the adapter must change the images"
    assert np.array_equal(pixels(warm, "v1"), pixels(cold, "v1"))
    # The battle slot is warmed too: a cross-version image of v1 while base is served is the same image.
    warm.swap_adapter(BASE)
    assert np.array_equal(pixels(warm, "v1"), pixels(cold, "v1"))
    assert np.array_equal(pixels(warm, BASE), before)
