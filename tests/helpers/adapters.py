"""A LoRA adapter with random, nonzero B matrices (so it changes the images), saved for a test to serve or load."""

from __future__ import annotations

from pathlib import Path

import torch

from ncp.adapters import LoraSettings, add_lora, save_adapter


def random_adapter(pipe, folder: Path, *, rank: int = 8, std: float = 0.5) -> Path:  # noqa: ANN001
    torch.manual_seed(3)
    settings = LoraSettings(rank=rank, alpha=rank)
    add_lora(pipe.unet, settings)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    return save_adapter(pipe, pipe.unet, folder, settings)
