"""Implicit reward margins of adapter versions on held-out preference pairs, in latent AND in NCP space, from one set
of shared UNet passes (the evaluator's accuracy criterion; `ncp.evaluate` reads them).

Diffusion-DPO's implicit reward of a version v is r_v(x) = -(E_v(x) - E_ref(x)) (METHOD.md; Wallace et al. eq. 14),
with E the per-sample error of the space v was TRAINED in: the latent eps error L (paper eq. 8) for latent DPO, the
perceptual error PL of the reference UNet's encoder (eq. 12-17) for NCP-DPO. A version is right on a held-out pair
when r_v(chosen) > r_v(rejected). Judging an NCP candidate by L asks it about a loss it never saw: PL weights high
noise about 30x more than L does (METHOD.md "Reading results"), so the two accuracies can disagree.

Per pair and draw one t, eps and reverse-step noise z, shared by its two images and by both spaces (METHOD.md).
The encoder is the down-block stack with every adapter off and no normalisation: the loop's NCP setting
(`ncp.perception.per_sample_errors(space="ncp")`, whose errors these match; tests/test_evaluate_space.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ncp.adapters import reference_mode
from ncp.data import coin_flip, load_pairs
from ncp.latents import encode_pairs
from ncp.losses import timestep_bounds
from ncp.perception import ddpm_step_to_prev, encoder_features, noisy_latents
from ncp.pipelines import encode_prompts, is_sdxl
from ncp.train_config import TrainConfig

SPACES = ("latent", "ncp")
Z_SEED_OFFSET = 7919  # z comes from its own generator, so the latent draws (eps, t) are those of the latent-only code


def _mean_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B,), float32
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def held_out_margins(
    pipe,
    adapters: Sequence[str],
    data: Sequence[str | Path],
    *,
    draws: int = 4,
    seed: int = 0,
    batch: int = 16,
    timestep_low: float = 0.0,
    max_pairs: int = 0,
    spaces: Sequence[str] = SPACES,
    coin_flip_labels: bool = False,
    pairs: Sequence | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """space -> adapter name -> (pairs,) margins r(chosen) - r(rejected), averaged over `draws` shared (t, eps, z)
    draws with t in [timestep_low T, T) (the slice the rounds train on, ncp.losses.timestep_bounds).

    `max_pairs` > 0 keeps only the last that many pairs (a snapshot lists votes in vote order: the newest), so a round's
    evaluation does not grow with the arena's age. NCP costs the encoder (about 45% of a UNet pass) on the target,
    the reference and each adapter's one-step prediction, on top of the UNet passes both spaces share.
    `coin_flip_labels`: each pair's label replaced by a coin flip (bench.loop --null). `pairs`: the
    `held_out_pairs(data, max_pairs)` a caller already loaded (then `data` and `max_pairs` are not read again)."""
    bad = [s for s in spaces if s not in SPACES]
    if bad or not spaces:
        raise ValueError(f"spaces must be a non-empty subset of {SPACES}, got {tuple(spaces)!r}.")
    pairs = list(pairs) if pairs is not None else held_out_pairs(data, max_pairs)
    if coin_flip_labels:  # the null arm: the gate reads coin flips too, or real held-out votes would pick its versions
        pairs = coin_flip(pairs, f"held-out-{seed}")
    if not pairs or not adapters:
        return {s: {a: np.zeros(0) for a in adapters} for s in spaces}
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    encoded = encode_pairs(pairs, pipe.vae, resolution=size, model_key="eval")
    sched, unet, sdxl = pipe.scheduler, pipe.unet, is_sdxl(pipe)
    gen, zgen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + Z_SEED_OFFSET)
    lo, t_max = timestep_bounds(TrainConfig(timestep_low=timestep_low), sched.config.num_train_timesteps)
    out: dict[str, dict[str, list]] = {s: {a: [] for a in adapters} for s in spaces}
    for i in range(0, len(encoded), batch):
        chunk = encoded[i : i + batch]
        lat = torch.cat([torch.stack([p.chosen for p in chunk]), torch.stack([p.rejected for p in chunk])])  # (2B,..)
        cond = encode_prompts(pipe, [p.prompt for p in chunk]).repeat(2)
        ehs = cond.encoder_hidden_states
        added = cond.added_cond_kwargs(torch.stack([p.time_ids for p in chunk]).repeat(2, 1)) if sdxl else None
        margin = {s: {a: torch.zeros(len(chunk)) for a in adapters} for s in spaces}
        for _ in range(draws):
            eps = torch.randn((len(chunk), *lat.shape[1:]), generator=gen).repeat(2, 1, 1, 1)
            t = torch.randint(lo, t_max, (len(chunk),), generator=gen).repeat(2)
            x_t = noisy_latents(sched, lat, eps, t)
            pipe.disable_lora()
            preds = {None: unet(x_t, t, ehs, added_cond_kwargs=added).sample}  # None: the reference (adapters off)
            pipe.enable_lora()
            for a in adapters:
                pipe.set_adapters([a])
                preds[a] = unet(x_t, t, ehs, added_cond_kwargs=added).sample
            errs = {"latent": {k: _mean_sq(p, eps) for k, p in preds.items()}}  # paper eq. 8
            if "ncp" in spaces:
                errs["ncp"] = _perceptual(unet, sched, lat, eps, t, (ehs, added), preds, zgen)
            for s in spaces:
                for a in adapters:
                    lc, lr = (errs[s][a] - errs[s][None]).chunk(2)
                    margin[s][a] += (lr - lc) / draws  # r(c) - r(r) = -(Lc - Lrc) + (Lr - Lrr)
        for s in spaces:
            for a in adapters:
                out[s][a].append(margin[s][a])
    return {s: {a: torch.cat(v).numpy() for a, v in by.items()} for s, by in out.items()}


def held_out_pairs(data: Sequence[str | Path], max_pairs: int = 0) -> list:
    """The held-out pairs margins are computed for, in vote order (ties dropped; `max_pairs` > 0: the newest only).
    The snapshot's held-out split is drawn by prompt (feedback_store.snapshot.eval_mask), so a prompt's pairs, and
    every rating of one pair, are one cluster."""
    pairs, _ = load_pairs(list(data))
    return pairs[-max_pairs:] if max_pairs > 0 else pairs


def _perceptual(unet, sched, lat, eps, t, cond, preds: dict, zgen: torch.Generator) -> dict:  # noqa: ANN001
    """PL of each prediction (paper eq. 12-17): one reverse step t -> t-1 with the prediction, with the true eps (the
    target) and the same z, all in float32 as the trainer runs them; then the reference encoder f at t-1."""
    ehs, added = cond
    z = torch.randn((len(t) // 2, *lat.shape[1:]), generator=zgen).repeat(2, 1, 1, 1)
    x_s = noisy_latents(sched, lat.float(), eps.float(), t)
    x_target, t_prev = ddpm_step_to_prev(sched, x_s, eps, t, z)
    with reference_mode(unet):  # f = the base's encoder, one fixed metric for every version

        def f(x: torch.Tensor) -> torch.Tensor:
            return encoder_features(unet, x, t_prev, ehs.float(), added)

        f_target = f(x_target)
        return {k: _mean_sq(f(ddpm_step_to_prev(sched, x_s, p, t, z)[0]), f_target) for k, p in preds.items()}


def correct(margins: np.ndarray) -> np.ndarray:
    """Per pair: 1 where the implicit reward ranks the chosen image first, 0.5 on a tie, 0 otherwise."""
    return (margins > 0) + 0.5 * (margins == 0)


def accuracy(margins: np.ndarray) -> float:
    if margins.size == 0:
        return float("nan")
    return float(np.mean(correct(margins)))
