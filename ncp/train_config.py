"""The training run's settings: one frozen dataclass, every field with a default and its `--help` text.

`ncp.train` turns each field into a command-line option; the trainer, the loss (`ncp.losses`) and the checkpoints
(`ncp.checkpoints`) read it. It lives apart from the trainer so that those modules depend on the settings, not on
the trainer that uses them (no import cycle).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from ncp.adapters import LoraSettings


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (the CLI exposes every field; `help` metadata is its --help text)."""

    objective: Literal["dpo", "cpo", "sft"] = _opt("dpo", "loss: dpo (needs the reference), cpo or sft (METHOD.md)")
    space: Literal["latent", "ncp"] = _opt("ncp", "where errors are measured: latent eps-MSE or NCP encoder features")
    beta: float = _opt(5000.0, "KL strength beta (dpo/cpo); NCP errors are ~c_t^2 smaller, see METHOD.md")
    sft_weight: float = _opt(0.0, "cpo only: weight lambda of the chosen-image error (paper eq. 9-11)")
    dpo_anchor: float = _opt(
        0.0,
        "dpo only: DPO-Positive lambda, a hinge on the chosen error rising above the "
        "reference's (Pal et al. 2024); 0 = plain DPO",
    )
    uncond_weight: float = _opt(
        0.0,
        "weight of keeping the UNet's empty-prompt prediction at the reference's (eps MSE): classifier-free guidance "
        "then amplifies only the prompt-specific change; 0 = off",
    )
    train_guidance: float = _opt(
        1.0,
        "classifier-free guidance scale of the prediction whose errors the loss compares: 1 = the conditional "
        "prediction (the paper); the sampler's scale g trains eps_u + g (eps_c - eps_u), the prediction that is "
        "sampled, so the learned tilt is not amplified g times at sampling (2x UNet passes)",
    )
    noise_draws: int = _opt(1, "(t, eps) draws per pair per step, averaged inside the loss: less variance, K x cost")
    timestep_low: float = _opt(0.0, "lowest training timestep, as a fraction of the schedule (0 = t from 0)")
    timestep_high: float = _opt(
        1.0,
        "highest training timestep, as a fraction of the schedule; t ~ U[low T, high T). Global attributes "
        "(colour, size, background) are decided at high noise, so a preference on them is learned there",
    )
    lr: float = _opt(1e-5, "AdamW learning rate (after warm-up: constant, or decayed by --lr-schedule)")
    lr_warmup_steps: int = _opt(0, "linear learning-rate warm-up, in optimizer steps")
    lr_schedule: Literal["constant", "linear", "cosine"] = _opt(
        "constant",
        "learning rate after warm-up: constant, or decayed to 0 at max_steps (linear, cosine). A decayed rate ends on "
        "the average of the last steps' noisy updates instead of on the last one",
    )
    weight_decay: float = _opt(1e-2, "AdamW weight decay (paper: 1e-2)")
    adam_8bit: bool = _opt(False, "8-bit AdamW from bitsandbytes (CUDA; must be installed)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (paper: 1.0)")
    batch_size: int = _opt(1, "pairs per process per micro-step; effective batch = this x accumulation x processes")
    gradient_accumulation: int = _opt(1, "micro-steps per optimizer step")
    max_steps: int = _opt(100, "optimizer steps to run")
    max_seconds: float = _opt(0.0, "wall-clock limit in seconds; stops early and still saves (0 = none)")
    mixed_precision: Literal["no", "fp16", "bf16"] = _opt(
        "no", "autocast precision; frozen text encoders (and the UNet for latent space) are cast to it"
    )
    gradient_checkpointing: bool = _opt(False, "recompute UNet activations in backward (less memory, slower)")
    lora_rank: int = _opt(64, "LoRA rank r (paper: 64); fixed for a deployment")
    lora_alpha: float = _opt(64.0, "LoRA alpha (paper: 64); fixed for a deployment")
    lora_targets: tuple[str, ...] = _opt(("to_q", "to_k", "to_v", "to_out.0"), "UNet module names that get LoRA")
    include_mid: bool = _opt(False, "ncp: add the mid block to the encoder (released SD1.5 runs: on; SDXL: off)")
    normalize: bool = _opt(False, "ncp: divide the perceptual error by the mean squared target feature")
    timestep_weights: str = _opt(
        "",
        "JSON file {'weights': [w_0..w_{K-1}]}: each sample's errors are scaled by w of its timestep's bin (K equal bins "
        "of the schedule), e.g. the measured E[PL/L | t] normalised to mean 1, so latent DPO weights timesteps as NCP "
        "does without its encoder metric (bench/ncp_vs_latent.py); empty = unweighted",
    )
    random_encoder: bool = _opt(
        False,
        "ncp: measure PL through a random-initialised copy of the UNet (same architecture, seeded by --seed) instead "
        "of the pretrained reference encoder: is it the learned perception that helps, or any fixed feature map",
    )
    seed: int = _opt(0, "seed of LoRA init, data order, timesteps and noise")
    resolution: int = _opt(0, "training image size in pixels (0 = the model's native size)")
    keep_ties: bool = _opt(False, "train on 0.5/0.5 ties too (as ordered pairs, jpg_0 first); default drops them")
    absolute_winners: bool = _opt(False, "keep only pairs whose chosen image is an absolute winner (paper sec. 5)")
    coin_flip_labels: bool = _opt(
        False,
        "null arm: swap each pair's chosen/rejected with probability 1/2 (seeded by --seed); labels carry no signal",
    )
    latent_cache_dir: str = _opt("", "folder for cached VAE latents (shared across runs); empty = memory only")
    checkpoint_every: int = _opt(0, "save a resumable checkpoint every N optimizer steps (0 = never)")
    checkpoint_dir: str = _opt("", "where checkpoints go (default: '<out>.checkpoints'); the latest 2 are kept")
    resume: str = _opt("", "'latest' (newest in checkpoint_dir, if any) or a checkpoint folder; empty = fresh")
    init_adapter: str = _opt("", "adapter folder to continue from (same LoRA rank, alpha and targets)")
    reference: Literal["base", "init"] = _opt(
        "base",
        "dpo/cpo reference policy: base (adapters off, the paper) or init (the init adapter, frozen: iterative DPO, "
        "each round's KL is measured from the version it continues, so rounds move past one round's tilt)",
    )
    progress_file: str = _opt("", "JSON-lines progress file (start/step/end/error events); empty = none")

    def __post_init__(self) -> None:
        for name, kind in get_type_hints(TrainConfig).items():
            if getattr(kind, "__origin__", None) is Literal and getattr(self, name) not in get_args(kind):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; choose one of {get_args(kind)}.")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        checks = {
            "beta": self.beta > 0 and math.isfinite(self.beta),
            "sft_weight": self.sft_weight >= 0 and math.isfinite(self.sft_weight),
            "dpo_anchor": self.dpo_anchor >= 0 and math.isfinite(self.dpo_anchor),
            "noise_draws": self.noise_draws >= 1,
            "train_guidance": self.train_guidance > 0 and math.isfinite(self.train_guidance),
            "timestep_low": 0.0 <= self.timestep_low < self.timestep_high,
            "timestep_high": self.timestep_low < self.timestep_high <= 1.0,
            "uncond_weight": self.uncond_weight >= 0 and math.isfinite(self.uncond_weight),
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "max_grad_norm": self.max_grad_norm > 0,
            "weight_decay": self.weight_decay >= 0,
            "batch_size": self.batch_size >= 1,
            "gradient_accumulation": self.gradient_accumulation >= 1,
            "max_steps": self.max_steps >= 1,
            "max_seconds": self.max_seconds >= 0,
            "lr_warmup_steps": self.lr_warmup_steps >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "resolution": self.resolution == 0 or (self.resolution >= 8 and self.resolution % 8 == 0),
            "seed": self.seed >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                hint = TrainConfig.__dataclass_fields__[name].metadata["help"]
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range ({hint}).")
        if self.random_encoder and self.space != "ncp":
            raise ValueError("random_encoder replaces the NCP encoder: it needs space='ncp'.")
        if self.timestep_weights and not Path(self.timestep_weights).is_file():
            raise ValueError(f"timestep_weights={self.timestep_weights!r} is not a file (JSON {{'weights': [...]}}).")
        if self.reference == "init" and not self.init_adapter:
            raise ValueError("reference='init' needs init_adapter: the adapter whose frozen copy is the reference.")
        if self.dpo_anchor and self.objective != "dpo":
            raise ValueError(
                f"dpo_anchor={self.dpo_anchor} needs objective 'dpo' (DPO-Positive), not {self.objective!r}."
            )
        self.lora_settings()  # validates rank, alpha and targets with LoraSettings' own errors
        if self.adam_8bit and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "adam_8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA only), or drop adam_8bit."
            )

    def lora_settings(self) -> LoraSettings:
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha, target_modules=self.lora_targets)
