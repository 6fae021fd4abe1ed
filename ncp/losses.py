"""The loss of one training micro-batch: per-sample errors of the pairs (`ncp.perception`) turned into the objective
(`ncp.objectives`), with the trainer's options (noise draws per pair, DPO-Positive, the empty-prompt hold).

Used by the trainer (`ncp.trainer.train`) and, unchanged, by the benchmarks, so what they measure is what trains:
    out = pair_loss(unet, scheduler, batch, cond, config, generator, sdxl=False, uncond=uncond_conditioning(pipe))
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ncp.adapters import policy_reference_mode, unwrap_unet
from ncp.latents import PairBatch
from ncp.objectives import PreferenceLoss, preference_loss
from ncp.perception import noisy_latents, per_sample_errors
from ncp.pipelines import Conditioning
from ncp.train_config import TrainConfig


def timestep_bounds(config: TrainConfig, num_train_timesteps: int) -> tuple[int, int]:
    """[lo, hi) of the training timesteps: the whole schedule by default (METHOD.md: t ~ U{0..T-1}), or the slice
    `timestep_low`..`timestep_high` of it. Diffusion-DPO's loss is an expectation over t (Wallace et al. eq. 14);
    restricting t reweights it towards the noise levels at which the preferred attributes are decided."""
    lo = min(int(config.timestep_low * num_train_timesteps), num_train_timesteps - 1)
    return lo, max(lo + 1, round(config.timestep_high * num_train_timesteps))


def pair_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    batch: PairBatch,
    cond: Conditioning,
    config: TrainConfig,
    generator: torch.Generator,
    *,
    sdxl: bool,
    uncond: Conditioning | None = None,
    encoder: torch.nn.Module | None = None,
) -> PreferenceLoss:
    """The loss of one micro-batch of B pairs: errors of the 2B images [chosen; rejected], then the objective.

    With `noise_draws` K > 1 every pair is noised K times (K B rows per side) and its errors are averaged over the
    draws BEFORE the objective: a lower-variance estimate of the expectation over (t, eps) that eq. 8 takes inside
    the sigmoid (Jensen moves it outside only to allow one draw)."""
    device = next(unwrap_unet(unet).parameters()).device
    b, shape = batch.chosen.shape[0], batch.chosen.shape[1:]
    k = config.noise_draws
    # ONE timestep, noise and variance noise per pair and draw, shared by its chosen and rejected image (METHOD.md).
    noise = torch.randn((k * b, *shape), generator=generator).repeat(2, 1, 1, 1).to(device)
    lo, hi = timestep_bounds(config, scheduler.config.num_train_timesteps)
    steps = torch.randint(lo, hi, (k * b,), generator=generator).repeat(2).to(device)
    z = (
        torch.randn((k * b, *shape), generator=generator).repeat(2, 1, 1, 1).to(device)
        if config.space == "ncp"
        else None
    )
    reps = (k, 1, 1, 1)
    latents = torch.cat([batch.chosen.repeat(reps), batch.rejected.repeat(reps)]).to(device)  # (2KB, C, h, w)
    cond2 = cond.repeat(2 * k)
    added = cond2.added_cond_kwargs(batch.time_ids.repeat(2 * k, 1)) if sdxl else None
    guided = None
    if config.train_guidance != 1.0:
        if uncond is None:
            raise ValueError(
                "train_guidance != 1 needs the empty prompt's conditioning: pass uncond=uncond_conditioning(pipe)."
            )
        u2 = uncond.repeat(len(latents)).to(device, cond2.encoder_hidden_states.dtype)
        guided = (
            u2.encoder_hidden_states,
            u2.added_cond_kwargs(batch.time_ids.repeat(2 * k, 1).to(device)) if sdxl else None,
        )
    errors = per_sample_errors(
        unet,
        scheduler,
        latents,
        noise,
        steps,
        (cond2.encoder_hidden_states, added),
        space=config.space,
        with_reference=config.objective == "dpo",
        include_mid=config.include_mid,
        normalize=config.normalize,
        variance_noise=z,
        encoder=encoder,
        guidance=config.train_guidance,
        uncond=guided,
    )
    if config.timestep_weights:  # w(t) scales the errors, so beta keeps its latent scale (weights have mean 1)
        w = timestep_weights(config.timestep_weights, scheduler.config.num_train_timesteps).to(device)[steps]
        ref = None if errors.reference is None else errors.reference * w
        errors = type(errors)(errors.policy * w, ref)

    def per_pair(err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (2KB,) -> chosen, rejected: (B,) each
        return tuple(half.view(k, b).mean(0) for half in err.chunk(2))

    chosen, rejected = per_pair(errors.policy)
    ref = (None, None) if errors.reference is None else per_pair(errors.reference)
    out = preference_loss(
        config.objective, chosen, rejected, *ref, beta=config.beta, sft_weight=config.sft_weight,
        anchor=config.dpo_anchor,
    )  # fmt: skip
    if not config.uncond_weight:
        return out
    if uncond is None:
        raise ValueError(
            "uncond_weight > 0 needs the empty prompt's conditioning: pass uncond=uncond_conditioning(pipe)."
        )
    drift = uncond_drift(unet, scheduler, latents[:b], noise[:b], steps[:b], uncond, batch.time_ids, sdxl=sdxl)
    return PreferenceLoss(out.loss + config.uncond_weight * drift, {**out.metrics, "uncond_drift": drift.item()})


@functools.lru_cache(maxsize=8)
def timestep_weights(path: str, num_train_timesteps: int) -> torch.Tensor:
    """w(t) for t in [0, T) from a JSON file {"weights": [w_0..w_{K-1}]} of K equal bins of the schedule.

    Why errors and not the loss: NCP's PL is to first order c_t^2 times the eps error seen through the encoder's
    Jacobian (METHOD.md), i.e. a timestep-weighted latent error; scaling L_theta and L_ref by w(t) = E[PL/L | t]
    reproduces that weighting with the latent metric. Where NCP's loss stays near ln 2 (the logsigmoid's linear
    range) this equals weighting each sample's loss by w(t), and it averages correctly over noise draws."""
    weights = json.loads(Path(path).read_text())["weights"]
    if not weights or any(not (w >= 0) for w in weights):
        raise ValueError(f"{path}: 'weights' must be a non-empty list of numbers >= 0.")
    bins = torch.arange(num_train_timesteps) * len(weights) // num_train_timesteps
    return torch.tensor(weights, dtype=torch.float32)[bins]


def uncond_drift(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    steps: torch.Tensor,
    uncond: Conditioning,
    time_ids: torch.Tensor,
    *,
    sdxl: bool,
) -> torch.Tensor:
    """Mean squared difference of the policy's and the reference's empty-prompt eps on the pairs' noisy latents.

    The preference objectives train the conditional prediction only, but the LoRA also moves the unconditional one,
    never checked, and classifier-free guidance at scale g samples with (1 - g) eps(empty) + g eps(prompt): an
    untrained drift of the empty-prompt branch enters g - 1 times over. Holding that branch at the reference leaves
    the change prompt-specific, which guidance amplifies instead."""
    b = latents.shape[0]
    x_t = noisy_latents(scheduler, latents, noise, steps)
    cond = uncond.repeat(b).to(latents.device)
    added = cond.added_cond_kwargs(time_ids.to(latents.device)) if sdxl else None
    eps = unet(x_t, steps, cond.encoder_hidden_states, added_cond_kwargs=added).sample
    with torch.no_grad(), policy_reference_mode(unet):
        eps_ref = unwrap_unet(unet)(x_t, steps, cond.encoder_hidden_states, added_cond_kwargs=added).sample
    return (eps.float() - eps_ref.float()).pow(2).mean()
