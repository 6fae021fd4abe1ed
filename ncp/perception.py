"""Per-sample errors in latent space and in the noise-conditioned perceptual space of the UNet encoder (NCP; paper
sec. 4, eq. 12-17; METHOD.md "NCP: the perceptual space").

latent: L = mean_{C,H,W} (eps_theta(x_t, t, c) - eps)^2                                     (paper eq. 8)
ncp:    x_theta / x_ref / x_target = one reverse DDPM step t -> t' = t - 1 (clamped at 0) with eps_theta / eps_ref /
        the true eps, all with the SAME variance noise z                                         (eq. 12-14)
        PL = mean (f(x_theta, c, t') - f(x_target, c, t'))^2, f = the reference UNet's encoder  (eq. 15-17)

The encoder f is the UNet's downsampling stack run with every adapter disabled (reference weights), frozen but not
under no_grad for the policy branch, so gradients flow through it into eps_theta. Its features are the encoder's
output, the hidden state after the LAST down block (B, C_last, H/2^k, W/2^k), or with `include_mid` the mid-block
output (same shape), flattened to (B, N); this is the bottleneck the released NCP code uses (`get_unet_middle_states`,
down only for SDXL, down + mid for SD1.5). The skip residuals are not part of f.

Use (per pair batch [chosen; rejected] of 2B images sharing t, eps and z per pair):
    errs = per_sample_errors(unet, scheduler, latents, noise, timesteps, (cond.encoder_hidden_states, added),
                             space="ncp", with_reference=True)
    preference_loss("dpo", *errs.policy.chunk(2), *errs.reference.chunk(2), beta=beta)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ncp.adapters import policy_reference_mode, reference_mode, unwrap_unet

Cond = tuple[Tensor, dict[str, Tensor] | None]
logger = logging.getLogger(__name__)
_WARNED: set[torch.dtype] = set()


@dataclass(frozen=True)
class Errors:
    """Per-sample errors, shape (B,): `policy` (with gradient) and `reference` (no gradient; None when not asked)."""

    policy: Tensor
    reference: Tensor | None = None


def _schedule(scheduler: Any, device: torch.device) -> Tensor:
    """The TRAINING schedule's alphabar_t as float64 on `device` (DDPM, DDIM, Euler, DPM-Solver all keep it)."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, Tensor):
        raise TypeError(
            f"{type(scheduler).__name__} has no `alphas_cumprod` training schedule; NCP needs a DDPM-type noise "
            "scheduler (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, ...)."
        )
    # A zero-terminal-SNR schedule has alphabar_T = 0; clamp as diffusers' Euler does so the step stays finite.
    return abar.to(device=device, dtype=torch.float64).clamp(min=2.0**-24)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _check_epsilon(scheduler: Any) -> None:
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if kind != "epsilon":
        raise ValueError(
            f"prediction_type={kind!r} is not supported: the objectives (METHOD.md) are written for eps-prediction "
            "models (SD1.5, SDXL); use a model with prediction_type='epsilon'."
        )


def noisy_latents(scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps (variance-preserving form; Euler's `add_noise` returns the
    sigma-scaled form instead, which the UNet does not take at training time)."""
    abar = _per_sample(_schedule(scheduler, latents.device)[timesteps], latents)
    return (abar.sqrt() * latents + (1 - abar).sqrt() * noise).to(latents.dtype)


def ddpm_step_to_prev(scheduler: Any, x_t: Tensor, eps_pred: Tensor, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """One reverse DDPM step from t to t' = t - 1 (clamped at 0) with eps prediction `eps_pred` and variance noise z.

    x_{t'} = (x_t - beta_t / sqrt(1 - alphabar_t) * eps) / sqrt(alpha_t) + sigma_t z       (paper eq. 12-14)
    with alpha_t = alphabar_t / alphabar_{t'} (equal to 1 - beta_t; derived from alphabar so any scheduler with a
    training schedule works) and the DDPM posterior std sigma_t^2 = (1 - alphabar_{t'}) / (1 - alphabar_t) * beta_t,
    zero at t = 0 (then x_{t'} is the x0 prediction). Coefficients are float64, the result has x_t's dtype.
    Returns (x_prev, t_prev).
    """
    t = t.to(device=x_t.device, dtype=torch.long)
    t_prev = (t - 1).clamp(min=0)
    abar = _schedule(scheduler, x_t.device)
    abar_t = abar[t]
    abar_prev = torch.where(t > 0, abar[t_prev], torch.ones_like(abar_t))
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    sigma_t = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=0).sqrt()
    c_eps = _per_sample(beta_t / (1 - abar_t).sqrt(), x_t).to(x_t.dtype)
    c_scale = _per_sample(alpha_t.rsqrt(), x_t).to(x_t.dtype)
    sigma = _per_sample(sigma_t, x_t).to(x_t.dtype)
    x_prev = (x_t - c_eps * eps_pred.to(x_t.dtype)) * c_scale + sigma * z.to(x_t.dtype)
    return x_prev, t_prev


def encoder_features(
    unet: nn.Module,
    sample: Tensor,
    timestep: Tensor,
    encoder_hidden_states: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    *,
    include_mid: bool = False,
) -> Tensor:
    """f(x, c, t): the UNet's own forward up to the end of the encoder, features (B, N).

    Runs exactly the pieces of `UNet2DConditionModel.forward` in its order (time embedding, SDXL added conditioning,
    encoder_hidden_states processing, conv_in, every down block) and returns the hidden state after the last down
    block, or after the mid block with `include_mid`, flattened. It uses whatever adapters are active: wrap it in
    `reference_mode` for the reference encoder of NCP. tests/test_perception.py checks it against forward hooks on
    the real forward so a diffusers upgrade cannot silently change it.
    """
    unet = unwrap_unet(unet)
    config = unet.config
    if getattr(config, "class_embed_type", None) is not None or getattr(config, "num_class_embeds", None):
        raise ValueError("UNets with class embeddings are not supported by the NCP encoder (SD1.5/SDXL have none).")
    if config.addition_embed_type not in (None, "text", "text_time"):
        raise ValueError(f"addition_embed_type={config.addition_embed_type!r} is not supported (SD1.5/SDXL only).")
    weight_dtype = unet.conv_in.weight.dtype
    if not torch.is_autocast_enabled(sample.device.type) and sample.dtype != weight_dtype:
        # A half-precision UNet outside autocast (accelerate autocasts only the wrapped forward): match its weights.
        sample, encoder_hidden_states = sample.to(weight_dtype), encoder_hidden_states.to(weight_dtype)
    if config.center_input_sample:
        sample = 2 * sample - 1.0
    # 1. time (+ SDXL text_time micro-conditioning)
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    # 2. conv_in, 3. down blocks (cross-attention to c): (B, C_k, H/2^k, W/2^k)
    hidden = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
    # 4. optionally the mid block (the released SD1.5 runs use down + mid)
    if include_mid and unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = unet.mid_block(hidden, emb)
    return hidden.flatten(1)


@contextlib.contextmanager
def _no_inner_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Turn off the blocks' own gradient checkpointing for the duration (restored after)."""
    flags = [(m, m.gradient_checkpointing) for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
    try:
        for m, _ in flags:
            m.gradient_checkpointing = False
        yield
    finally:
        for m, flag in flags:
            m.gradient_checkpointing = flag


def _reference_features(
    unet: nn.Module,
    x: Tensor,
    t: Tensor,
    ehs: Tensor,
    added: dict | None,
    mid: bool,
    fp32: bool,
    encoder: nn.Module | None = None,
) -> Tensor:
    """The reference encoder (adapters off, no inner checkpointing), or `encoder`'s (a frozen UNet without adapters);
    `fp32`: autocast off and float32 inputs."""
    precision = torch.autocast(x.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    if encoder is not None:
        unet, mode = encoder, contextlib.nullcontext()
    else:
        mode = reference_mode(unet)
    with mode, _no_inner_checkpointing(unet), precision:
        if fp32:
            x, ehs = x.float(), ehs.float()
            added = None if added is None else {k: v.float() for k, v in added.items()}
        return encoder_features(unet, x, t, ehs, added, include_mid=mid)


def _policy_features(
    unet: nn.Module,
    x: Tensor,
    t: Tensor,
    ehs: Tensor,
    added: dict | None,
    mid: bool,
    fp32: bool,
    encoder: nn.Module | None = None,
) -> Tensor:
    """Reference-encoder features of the policy's x_theta, with gradient to x_theta.

    With gradient checkpointing on, the blocks would recompute their forward during backward, AFTER reference_mode
    has re-enabled the adapters, and so differentiate a different function. Instead the whole encoder is checkpointed
    as one function that enters reference_mode itself, so the recomputation sees the reference weights too.
    """
    base = unwrap_unet(unet)
    if getattr(base, "is_gradient_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(_reference_features, unet, x, t, ehs, added, mid, fp32, encoder, use_reentrant=False)
    return _reference_features(unet, x, t, ehs, added, mid, fp32, encoder)


def random_encoder(unet: nn.Module, seed: int) -> nn.Module:
    """A random-initialised copy of the UNet's architecture (diffusers' own init, seeded), frozen, in eval mode, on the
    UNet's device: the NCP encoder's control, a fixed feature map that learned nothing (METHOD.md "Reading results")."""
    base = unwrap_unet(unet)
    param = base.conv_in.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        copy = type(base).from_config(base.config)
    return copy.to(device=param.device).eval().requires_grad_(False)


def _encoder_in_fp32(unet: nn.Module, requested: bool) -> bool:
    if not requested:
        return False
    dtype = unwrap_unet(unet).conv_in.weight.dtype
    if dtype != torch.float32 and not _WARNED:
        _WARNED.add(dtype)
        logger.warning(
            "encoder_fp32 was asked but the UNet weights are %s: the NCP encoder runs in %s, where PL differences of "
            "policy and reference (about c_t^2 = 1e-5..1e-3 of the features) drown in rounding. Keep the base UNet in "
            "float32 (autocast still speeds up the UNet passes) for meaningful NCP errors.",
            dtype,
            dtype,
        )
    return dtype == torch.float32


def _cat_cond(added: dict[str, Tensor] | None, times: int) -> dict[str, Tensor] | None:
    return None if added is None else {k: torch.cat([v] * times) for k, v in added.items()}


def _mean_sq(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def _predict(model: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, guidance: float, uncond: Cond | None) -> Tensor:
    """eps of `model` at (x_t, t): conditional, or guided eps_u + g (eps_c - eps_u) in one batched pass."""
    ehs, added = cond
    if guidance == 1.0:
        return model(x_t, t, ehs, added_cond_kwargs=added).sample
    u_ehs, u_added = uncond
    both = None if added is None else {k: torch.cat([v, u_added[k]]) for k, v in added.items()}
    eps_c, eps_u = model(
        torch.cat([x_t, x_t]), t.repeat(2), torch.cat([ehs, u_ehs]), added_cond_kwargs=both
    ).sample.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def per_sample_errors(
    unet: nn.Module,
    scheduler: Any,
    latents: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    cond: Cond,
    *,
    space: Literal["latent", "ncp"],
    with_reference: bool,
    include_mid: bool = False,
    normalize: bool = False,
    variance_noise: Tensor | None = None,
    encoder_fp32: bool = True,
    encoder: nn.Module | None = None,
    guidance: float = 1.0,
    uncond: Cond | None = None,
) -> Errors:
    """Per-sample policy (and reference) errors of a batch, shape (B,), float32.

    latents x0, noise eps: (B, C, H, W); timesteps: (B,) in [0, T); cond: (encoder_hidden_states (B, S, D),
    added_cond_kwargs or None) as built by `Conditioning`. `unet` carries a LoRA adapter when a reference is needed
    (reference = adapters disabled) or for space="ncp" (the encoder uses the reference weights).
    space="latent": mean_{CHW}(eps_theta - eps)^2. space="ncp": PL of eq. 17 on the encoder features; `normalize`
    divides it by mean(f(x_target)^2) (portable beta across backbones); `include_mid` adds the mid block to f;
    variance_noise z of the reverse step (drawn with torch.randn_like when None) is shared by the three branches.
    encoder_fp32: run the reverse steps and the encoder in float32 even under autocast (needs float32 UNet weights;
    off only to measure the cost: in bfloat16 the PL differences are rounding noise).
    encoder: a frozen UNet without adapters whose encoder is f instead of the reference's (`random_encoder`).
    guidance g != 1: eps_theta and eps_ref are the classifier-free-guided predictions eps_u + g (eps_c - eps_u), with
    `uncond` the empty prompt's conditioning in `cond`'s layout: the errors of the prediction the sampler follows.
    """
    if space not in ("latent", "ncp"):
        raise ValueError(f"Unknown space {space!r}; allowed: 'latent', 'ncp'.")
    if latents.ndim != 4 or noise.shape != latents.shape:
        raise ValueError(
            f"latents and noise must both be (B, C, H, W); got {tuple(latents.shape)}, {tuple(noise.shape)}."
        )
    if timesteps.shape != (latents.shape[0],):
        raise ValueError(f"timesteps must be (B,) = ({latents.shape[0]},), got {tuple(timesteps.shape)}.")
    if variance_noise is not None and variance_noise.shape != latents.shape:
        raise ValueError(f"variance_noise must have the latents' shape {tuple(latents.shape)}.")
    _check_epsilon(scheduler)
    ehs, added = cond
    timesteps = timesteps.to(device=latents.device, dtype=torch.long)
    x_t = noisy_latents(scheduler, latents, noise, timesteps)

    # Policy prediction, with gradient (the full UNet, adapters on). Called through the (possibly DDP) wrapper.
    if guidance != 1.0 and uncond is None:
        raise ValueError("guidance != 1 needs `uncond`, the empty prompt's conditioning.")
    eps_theta = _predict(unet, x_t, timesteps, cond, guidance, uncond)
    eps_ref = None
    if with_reference:  # the unwrapped UNet: no DDP bookkeeping for a no-grad pass
        with torch.no_grad(), policy_reference_mode(unet):  # the base, or the frozen reference adapter
            eps_ref = _predict(unwrap_unet(unet), x_t, timesteps, cond, guidance, uncond)

    if space == "latent":  # paper eq. 8
        ref = None if eps_ref is None else _mean_sq(eps_ref, noise)
        return Errors(_mean_sq(eps_theta, noise), ref)

    # NCP: one reverse step t -> t-1 for the three branches with the same z (eq. 12-14). The steps and the encoder
    # run in float32 when asked: x_theta - x_target is only c_t (eps_theta - eps), about 1e-3 of x, which bfloat16
    # (8 mantissa bits) cannot represent; measured on the tiny SDXL, bf16 PL differences were pure rounding noise.
    fp32 = _encoder_in_fp32(unet, encoder_fp32)
    x_s = noisy_latents(scheduler, latents.float(), noise.float(), timesteps) if fp32 else x_t
    z = torch.randn_like(x_s) if variance_noise is None else variance_noise.to(x_s.dtype)
    x_theta, t_prev = ddpm_step_to_prev(scheduler, x_s, eps_theta, timesteps, z)
    with torch.no_grad():
        x_target, _ = ddpm_step_to_prev(scheduler, x_s, noise, timesteps, z)
        batch = (
            [x_target] if eps_ref is None else [x_target, ddpm_step_to_prev(scheduler, x_s, eps_ref, timesteps, z)[0]]
        )
        n = len(batch)
        # Target and reference through the frozen encoder in one batched no-grad pass (METHOD.md "Cost per step").
        feats = _reference_features(
            unet,
            torch.cat(batch),
            t_prev.repeat(n),
            torch.cat([ehs] * n),
            _cat_cond(added, n),
            include_mid,
            fp32,
            encoder,
        )
        f_target, f_ref = feats[: len(x_t)], (feats[len(x_t) :] if n == 2 else None)
    # eq. 15: the policy branch keeps its graph, so the gradient flows through the frozen encoder into eps_theta.
    f_theta = _policy_features(unet, x_theta, t_prev, ehs, added, include_mid, fp32, encoder)
    scale = f_target.float().pow(2).mean(dim=1).clamp(min=1e-12) if normalize else None
    policy = _mean_sq(f_theta, f_target)
    reference = None if f_ref is None else _mean_sq(f_ref, f_target)
    if scale is not None:
        policy = policy / scale
        reference = None if reference is None else reference / scale
    return Errors(policy, reference)


__all__ = ["Errors", "ddpm_step_to_prev", "encoder_features", "noisy_latents", "per_sample_errors", "random_encoder"]
