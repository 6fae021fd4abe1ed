"""ncp.perception: encoder features against forward hooks on the real UNet forward, the reverse DDPM step against
diffusers' DDPMScheduler, and the NCP errors against a hand computation with a LoRA-free copy of the UNet as the
reference (so the encoder and the target branch provably use the reference weights); gradients reach the LoRA
parameters through the policy branch, also with gradient checkpointing."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ncp.adapters import LoraSettings, add_lora, lora_parameters, reference_mode
from ncp.perception import ddpm_step_to_prev, encoder_features, noisy_latents, per_sample_errors
from ncp.pipelines import build_tiny_sd15, build_tiny_sdxl, encode_prompts, is_sdxl, sdxl_time_ids

BUILDS = pytest.mark.parametrize("build", [build_tiny_sdxl, build_tiny_sd15], ids=["sdxl", "sd15"])
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _setup(build, lora_scale: float = 0.3):
    """(pipe with a non-zero LoRA, LoRA-free copy of its UNet, batch)."""
    pipe = build(seed=2)
    base = copy.deepcopy(pipe.unet)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=g) * lora_scale)
    cond = encode_prompts(pipe, ["a red circle", "a blue square", "a green star"])
    added = cond.added_cond_kwargs(sdxl_time_ids((64, 64), (0, 0), (64, 64), 3) if is_sdxl(pipe) else None)
    batch = dict(
        latents=torch.randn(3, 4, 16, 16, generator=g),
        noise=torch.randn(3, 4, 16, 16, generator=g),
        timesteps=torch.tensor([0, 420, 999]),
        cond=(cond.encoder_hidden_states, added),
        z=torch.randn(3, 4, 16, 16, generator=g),
    )
    return pipe, base, batch


@BUILDS
@pytest.mark.parametrize("include_mid", [False, True], ids=["down", "down+mid"])
def test_encoder_features_equal_hooks_on_the_real_forward(build, include_mid: bool) -> None:
    pipe, _, b = _setup(build)
    x, t = b["latents"], b["timesteps"]
    block = pipe.unet.mid_block if include_mid else pipe.unet.down_blocks[-1]
    captured = []
    handle = block.register_forward_hook(lambda m, i, o: captured.append(o if include_mid else o[0]))
    try:
        with torch.no_grad():
            pipe.unet(x, t, b["cond"][0], added_cond_kwargs=b["cond"][1])  # LoRA active: both follow it
            features = encoder_features(pipe.unet, x, t, *b["cond"], include_mid=include_mid)
    finally:
        handle.remove()
    channels = pipe.unet.config.block_out_channels[-1]
    assert features.shape == (3, channels * 8 * 8)
    assert torch.equal(features, captured[0].flatten(1))


def test_ddpm_step_matches_diffusers_ddpm_scheduler() -> None:
    ddpm = DDPMScheduler(**SCHEDULE, clip_sample=False, variance_type="fixed_small")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in (0, 1, 500, 999):
        z = randn_tensor(x.shape, generator=torch.Generator().manual_seed(t), dtype=x.dtype)
        expected = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample  # steps t -> t-1
        for scheduler in (ddpm, DDIMScheduler(**SCHEDULE), EulerDiscreteScheduler(**SCHEDULE)):
            got, t_prev = ddpm_step_to_prev(scheduler, x, eps, torch.tensor([t]), z)
            assert t_prev.item() == max(t - 1, 0)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_noisy_latents_match_ddpm_add_noise_for_any_scheduler() -> None:
    g = torch.Generator().manual_seed(1)
    x0, eps, t = (
        torch.randn(4, 4, 8, 8, generator=g),
        torch.randn(4, 4, 8, 8, generator=g),
        torch.tensor([0, 9, 500, 999]),
    )
    expected = DDPMScheduler(**SCHEDULE).add_noise(x0, eps, t)
    torch.testing.assert_close(noisy_latents(EulerDiscreteScheduler(**SCHEDULE), x0, eps, t), expected)


@BUILDS
def test_ncp_errors_use_the_reference_encoder_and_target(build) -> None:
    pipe, base, b = _setup(build)
    ehs, added = b["cond"]
    x_t = noisy_latents(pipe.scheduler, b["latents"], b["noise"], b["timesteps"])
    errs = per_sample_errors(
        pipe.unet, pipe.scheduler, b["latents"], b["noise"], b["timesteps"], b["cond"],
        space="ncp", with_reference=True, variance_noise=b["z"],
    )  # fmt: skip
    # By hand: eps_theta from the LoRA UNet; eps_ref, and the encoder for all three branches, from the LoRA-free copy.
    with torch.no_grad():
        eps_theta = pipe.unet(x_t, b["timesteps"], ehs, added_cond_kwargs=added).sample
        eps_ref = base(x_t, b["timesteps"], ehs, added_cond_kwargs=added).sample
        feats = {}
        for name, eps in (("theta", eps_theta), ("ref", eps_ref), ("target", b["noise"])):
            x_prev, t_prev = ddpm_step_to_prev(pipe.scheduler, x_t, eps, b["timesteps"], b["z"])
            feats[name] = encoder_features(base, x_prev, t_prev, ehs, added)
        lora_feats = encoder_features(pipe.unet, x_prev, t_prev, ehs, added)  # adapters ON, target branch
    assert not torch.allclose(lora_feats, feats["target"], atol=1e-4)  # the LoRA does act inside the encoder ...
    with torch.no_grad(), reference_mode(pipe.unet):  # ... and reference_mode removes it exactly
        assert torch.equal(encoder_features(pipe.unet, x_prev, t_prev, ehs, added), feats["target"])
    policy = (feats["theta"] - feats["target"]).pow(2).mean(dim=1)
    reference = (feats["ref"] - feats["target"]).pow(2).mean(dim=1)
    torch.testing.assert_close(errs.policy.detach(), policy, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(errs.reference, reference, rtol=1e-4, atol=1e-12)
    assert errs.reference.requires_grad is False and errs.policy.requires_grad
    assert not torch.allclose(errs.policy, errs.reference)


@BUILDS
def test_gradients_reach_lora_through_the_ncp_policy_branch(build) -> None:
    pipe, _, b = _setup(build)
    params = lora_parameters(pipe.unet)
    errs = per_sample_errors(
        pipe.unet, pipe.scheduler, b["latents"], b["noise"], b["timesteps"], b["cond"],
        space="ncp", with_reference=False, variance_noise=b["z"],
    )  # fmt: skip
    assert errs.reference is None
    errs.policy.sum().backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # every LoRA layer, in the decoder too, gets gradient: the only path to PL is x_theta -> the frozen encoder
    assert sum(bool(g.abs().sum() > 0) for g in grads) == len(grads)
    assert all(p.requires_grad for p in params)


def test_gradient_checkpointing_gives_the_same_errors_and_gradients() -> None:
    pipe, _, b = _setup(build_tiny_sdxl)
    params = lora_parameters(pipe.unet)

    def run():
        pipe.unet.zero_grad()
        errs = per_sample_errors(
            pipe.unet, pipe.scheduler, b["latents"], b["noise"], b["timesteps"], b["cond"],
            space="ncp", with_reference=True, include_mid=True, variance_noise=b["z"],
        )  # fmt: skip
        errs.policy.sum().backward()
        return errs, [p.grad.clone() for p in params]

    plain, plain_grads = run()
    pipe.unet.enable_gradient_checkpointing()
    pipe.unet.train()
    ckpt, ckpt_grads = run()
    torch.testing.assert_close(ckpt.policy, plain.policy, rtol=1e-6, atol=0)
    for a, c in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-12)


@BUILDS
def test_latent_errors_and_normalized_ncp(build) -> None:
    pipe, base, b = _setup(build)
    ehs, added = b["cond"]
    args = (pipe.unet, pipe.scheduler, b["latents"], b["noise"], b["timesteps"], b["cond"])
    latent = per_sample_errors(*args, space="latent", with_reference=True)
    x_t = noisy_latents(pipe.scheduler, b["latents"], b["noise"], b["timesteps"])
    with torch.no_grad():
        eps_theta = pipe.unet(x_t, b["timesteps"], ehs, added_cond_kwargs=added).sample
        eps_ref = base(x_t, b["timesteps"], ehs, added_cond_kwargs=added).sample
    torch.testing.assert_close(latent.policy.detach(), (eps_theta - b["noise"]).pow(2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(latent.reference, (eps_ref - b["noise"]).pow(2).mean(dim=(1, 2, 3)))

    kw = dict(space="ncp", with_reference=True, variance_noise=b["z"])
    raw = per_sample_errors(*args, **kw)
    normed = per_sample_errors(*args, normalize=True, **kw)
    with torch.no_grad():
        x_target, t_prev = ddpm_step_to_prev(pipe.scheduler, x_t, b["noise"], b["timesteps"], b["z"])
        scale = encoder_features(base, x_target, t_prev, ehs, added).pow(2).mean(dim=1)
    torch.testing.assert_close(normed.policy.detach(), raw.policy.detach() / scale, rtol=1e-4, atol=0)
    torch.testing.assert_close(normed.reference, raw.reference / scale, rtol=1e-4, atol=0)
    # the same z gives the same errors; a fresh z (None: drawn inside) gives different ones at t > 0
    again = per_sample_errors(*args, **kw)
    assert torch.equal(again.policy, raw.policy)
    torch.manual_seed(0)
    fresh = per_sample_errors(*args, space="ncp", with_reference=False)
    assert not torch.allclose(fresh.policy[1:], raw.policy[1:])


def test_bad_inputs_raise_clear_errors() -> None:
    pipe, _, b = _setup(build_tiny_sd15)
    args = (b["latents"], b["noise"], b["timesteps"], b["cond"])
    with pytest.raises(ValueError, match="Unknown space"):
        per_sample_errors(pipe.unet, pipe.scheduler, *args, space="pixel", with_reference=False)
    with pytest.raises(ValueError, match="timesteps must be"):
        per_sample_errors(
            pipe.unet, pipe.scheduler, *args[:2], torch.tensor([1, 2]), args[3], space="ncp", with_reference=False
        )
    with pytest.raises(TypeError, match="alphas_cumprod"):
        per_sample_errors(pipe.unet, object(), *args, space="ncp", with_reference=False)
    v_pred = DDPMScheduler(**SCHEDULE, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="v_prediction"):
        per_sample_errors(pipe.unet, v_pred, *args, space="latent", with_reference=False)
    plain = build_tiny_sd15()
    with pytest.raises(ValueError, match="add_lora first"):
        per_sample_errors(plain.unet, plain.scheduler, *args, space="ncp", with_reference=False)


def test_encoder_runs_in_float32_under_bfloat16_autocast() -> None:
    # x_theta - x_target is ~1e-3 of x: in bfloat16 the encoder's PL is mostly rounding; the float32 encoder keeps it.
    pipe, _, b = _setup(build_tiny_sdxl, lora_scale=0.05)
    args = (pipe.unet, pipe.scheduler, b["latents"], b["noise"], torch.tensor([100, 420, 800]), b["cond"])
    kw = dict(space="ncp", with_reference=False, variance_noise=b["z"])
    exact = per_sample_errors(*args, **kw).policy.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = per_sample_errors(*args, **kw).policy.detach()
        rounded = per_sample_errors(*args, encoder_fp32=False, **kw).policy.detach()
    assert kept.dtype == torch.float32
    assert ((kept - exact).abs() / exact).max() < 0.05
    assert ((rounded - exact).abs() / exact).max() > 0.5


@BUILDS
def test_guided_errors_are_those_of_the_sampled_prediction(build) -> None:
    """train_guidance g: policy and reference errors of eps_u + g (eps_c - eps_u), the prediction the sampler follows
    (docs/research/loop-plateau.md: a tilt learned on eps_c alone is amplified g times at sampling)."""
    pipe, base, b = _setup(build)
    ehs, added = b["cond"]
    u = encode_prompts(pipe, [""]).repeat(3)
    u_added = u.added_cond_kwargs(sdxl_time_ids((64, 64), (0, 0), (64, 64), 3) if is_sdxl(pipe) else None)
    args = (pipe.unet, pipe.scheduler, b["latents"], b["noise"], b["timesteps"], b["cond"])
    guided = per_sample_errors(*args, space="latent", with_reference=True, guidance=4.0,
                               uncond=(u.encoder_hidden_states, u_added))  # fmt: skip
    x_t = noisy_latents(pipe.scheduler, b["latents"], b["noise"], b["timesteps"])
    with torch.no_grad():
        for model, got in ((pipe.unet, guided.policy.detach()), (base, guided.reference)):
            c = model(x_t, b["timesteps"], ehs, added_cond_kwargs=added).sample
            e = model(x_t, b["timesteps"], u.encoder_hidden_states, added_cond_kwargs=u_added).sample
            want = (e + 4.0 * (c - e) - b["noise"]).pow(2).mean(dim=(1, 2, 3))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    plain = per_sample_errors(*args, space="latent", with_reference=True)
    assert not torch.allclose(plain.policy, guided.policy)  # the guided errors are not the conditional ones
    same = per_sample_errors(
        *args, space="latent", with_reference=True, guidance=1.0, uncond=(u.encoder_hidden_states, u_added)
    )
    torch.testing.assert_close(same.policy, plain.policy)
    with pytest.raises(ValueError, match="needs `uncond`"):
        per_sample_errors(*args, space="ncp", with_reference=True, guidance=4.0)
