"""ncp.objectives: the loss math against an independent reference, signs and gradients per objective, then every
objective x space on tiny SDXL and SD1.5 pipelines (value at init, one optimizer step moves the right way, finite
gradients, LoRA weights change)."""

import math

import numpy as np
import pytest
import torch

from ncp.adapters import LoraSettings, add_lora, lora_parameters
from ncp.objectives import LN2, OBJECTIVES, SPACES, preference_loss
from ncp.perception import per_sample_errors
from ncp.pipelines import build_tiny_sd15, build_tiny_sdxl, encode_prompts, is_sdxl, sdxl_time_ids


def _rand(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def _reference_dpo(lw, ll, rw, rl, beta):
    """SalesforceAIResearch/DiffusionDPO train.py, re-derived in numpy: inside = -0.5 * beta * (model_diff - ref_diff),
    loss = mean(-log sigmoid(inside)) = mean(log(1 + exp(-inside)))."""
    lw, ll, rw, rl = (np.asarray(x, dtype=np.float64) for x in (lw, ll, rw, rl))
    inside = -0.5 * beta * ((lw - ll) - (rw - rl))
    loss = np.mean(np.logaddexp(0.0, -inside))
    acc = np.mean((inside > 0) + 0.5 * (inside == 0))
    return loss, acc, np.mean((rw - lw) - (rl - ll))


@pytest.mark.parametrize("seed", range(5))
def test_dpo_matches_reference_formula_in_float64(seed: int) -> None:
    lw, ll, rw, rl = _rand(64, seed)
    beta = 7.5 * (seed + 1)
    out = preference_loss("dpo", lw, ll, rw, rl, beta=beta)
    loss, acc, margin = _reference_dpo(lw, ll, rw, rl, beta)
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - loss) < 1e-10
    assert abs(out.metrics["implicit_acc"] - acc) < 1e-12
    assert abs(out.metrics["reward_margin"] - margin) < 1e-10
    assert out.metrics["chosen_err"] == pytest.approx(lw.mean().item(), abs=1e-12)
    assert out.metrics["rejected_err"] == pytest.approx(ll.mean().item(), abs=1e-12)


def test_dpo_is_ln2_when_policy_equals_reference() -> None:
    lw, ll, _, _ = _rand(16, 1)
    out = preference_loss("dpo", lw, ll, lw.clone(), ll.clone(), beta=5000.0)
    assert abs(out.loss.item() - LN2) < 1e-12
    assert out.metrics["implicit_acc"] == 0.5  # every pair is a tie
    assert out.metrics["reward_margin"] == 0.0


def test_dpo_is_a_mean_over_pairs_not_inside_the_logsigmoid() -> None:
    lw = torch.tensor([0.0, 0.0], dtype=torch.float64)
    ll = torch.tensor([1.0, -1.0], dtype=torch.float64)  # one pair right, one wrong, by the same margin
    out = preference_loss(
        "dpo", lw, ll, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), beta=2
    )
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() > LN2 + 0.1  # a mean inside the logsigmoid would give exactly ln 2


def test_dpo_sign_and_gradient() -> None:
    ref_w, ref_l = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    lw = torch.full((3,), 0.4, dtype=torch.float64, requires_grad=True)  # better than the reference on chosen
    ll = torch.full((3,), 0.6, dtype=torch.float64, requires_grad=True)  # worse on rejected
    out = preference_loss("dpo", lw, ll, ref_w, ref_l, beta=10.0)
    assert out.loss.item() < LN2
    assert out.metrics["implicit_acc"] == 1.0 and out.metrics["reward_margin"] == pytest.approx(0.2)
    out.loss.backward()
    assert (lw.grad > 0).all() and (ll.grad < 0).all()  # descent lowers chosen error, raises rejected error
    assert torch.allclose(lw.grad, -ll.grad)
    worse = preference_loss("dpo", ll.detach(), lw.detach(), ref_w, ref_l, beta=10.0)
    assert worse.loss.item() > LN2 and worse.metrics["implicit_acc"] == 0.0


def test_cpo_value_sign_and_sft_term() -> None:
    lw, ll, _, _ = _rand(8, 3)
    lw.requires_grad_(True)
    beta = 4.0
    out = preference_loss("cpo", lw, ll, beta=beta)
    expected = np.mean(np.logaddexp(0.0, beta * (lw.detach().numpy() - ll.numpy())))
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["reward_margin"] == pytest.approx((ll - lw).mean().item(), abs=1e-12)
    inside = -beta * (lw.detach() - ll)
    assert out.metrics["implicit_acc"] == pytest.approx(((inside > 0).double() + 0.5 * (inside == 0)).mean().item())
    out.loss.backward()
    assert (lw.grad > 0).all()
    with_sft = preference_loss("cpo", lw, ll, beta=beta, sft_weight=0.3)
    assert with_sft.loss.item() - out.loss.item() == pytest.approx(0.3 * lw.mean().item(), abs=1e-12)
    # cpo ignores a reference if given
    assert preference_loss("cpo", lw, ll, ll, lw, beta=beta).loss.item() == pytest.approx(out.loss.item(), abs=0)


def test_sft_is_the_chosen_error_and_ignores_rejected() -> None:
    lw, ll, _, _ = _rand(5, 4)
    lw.requires_grad_(True)
    ll.requires_grad_(True)
    out = preference_loss("sft", lw, ll, beta=1.0)
    assert out.loss.item() == pytest.approx(lw.mean().item(), abs=1e-15)
    out.loss.backward()
    assert torch.allclose(lw.grad, torch.full_like(lw, 1 / 5)) and ll.grad is None
    assert out.metrics["reward_margin"] == pytest.approx((ll - lw).mean().item())
    alone = preference_loss("sft", lw, None, beta=1.0)
    assert math.isnan(alone.metrics["implicit_acc"]) and math.isnan(alone.metrics["rejected_err"])


def test_ties_count_half_and_metrics_are_floats() -> None:
    e = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for objective in OBJECTIVES:
        out = preference_loss(objective, e, e.clone(), e.clone(), e.clone(), beta=3.0)
        assert set(out.metrics) == {"loss", "implicit_acc", "reward_margin", "chosen_err", "rejected_err"}
        assert all(isinstance(v, float) for v in out.metrics.values())
        assert out.metrics["implicit_acc"] == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(objective="ipo"), "Unknown objective"),
        (dict(objective="dpo", ref=False), "needs the reference errors"),
        (dict(objective="dpo", beta=0.0), "beta must be"),
        (dict(objective="cpo", sft_weight=-1.0), "sft_weight"),
        (dict(objective="cpo", rejected=None), "pass rejected_err"),
        (dict(objective="dpo", rejected=torch.zeros(3)), "shape"),
        (dict(objective="sft", chosen=torch.zeros(2, 2)), "shape \\(B,\\)"),
        (dict(objective="dpo", anchor=-1.0), "anchor must be"),
        (dict(objective="cpo", anchor=5.0), "only applies to objective 'dpo'"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs: dict, message: str) -> None:
    e = torch.zeros(2)
    chosen = kwargs.get("chosen", e)
    rejected = kwargs.get("rejected", e)
    refs = (e, e) if kwargs.get("ref", True) else (None, None)
    with pytest.raises(ValueError, match=message):
        preference_loss(
            kwargs["objective"],
            chosen,
            rejected,
            *refs,
            beta=kwargs.get("beta", 1.0),
            sft_weight=kwargs.get("sft_weight", 0.0),
            anchor=kwargs.get("anchor", 0.0),
        )


def test_dpo_positive_hinge_charges_only_a_chosen_image_that_got_worse_than_the_reference() -> None:
    ref_w, ref_l = torch.full((2,), 0.5, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    # Pair 0: both errors rose (the chosen by 0.1, the rejected by 0.3): plain DPO calls that progress.
    # Pair 1: the chosen error fell: the hinge is zero there.
    lw = torch.tensor([0.6, 0.4], dtype=torch.float64, requires_grad=True)
    ll = torch.tensor([0.8, 0.6], dtype=torch.float64, requires_grad=True)
    beta, lam = 10.0, 5.0
    plain = preference_loss("dpo", lw, ll, ref_w, ref_l, beta=beta)
    pos = preference_loss("dpo", lw, ll, ref_w, ref_l, beta=beta, anchor=lam)
    inside = -0.5 * beta * np.array([(0.6 - 0.8) + lam * 0.1, (0.4 - 0.6) + 0.0])  # Pal et al. 2024 eq. 3, log pi ~ -L
    assert pos.loss.item() == pytest.approx(np.mean(np.logaddexp(0.0, -inside)), abs=1e-12)
    assert pos.loss.item() > plain.loss.item()
    assert pos.metrics["implicit_acc"] == plain.metrics["implicit_acc"] == 1.0  # accuracy ranks by the reward only
    pos.loss.backward()
    assert lw.grad[0] > 0 and lw.grad[0] > -ll.grad[0]  # descent now lowers the degraded chosen error harder
    assert lw.grad[1].item() == pytest.approx(-ll.grad[1].item())  # untouched pair: plain DPO's symmetric gradient


# --- every objective x space on tiny SDXL and SD1.5 -----------------------------------------------------------------

BETA = {"latent": 5000.0, "ncp": 5e5}


def _toy_batch(pipe, pairs: int = 2):
    """pairs prompts; chosen and rejected latents [chosen; rejected] sharing t, eps and z per pair."""
    g = torch.Generator().manual_seed(123)
    cond = encode_prompts(pipe, ["a red circle", "a blue square", "a green star"][:pairs]).repeat(2)
    ids = sdxl_time_ids((64, 64), (0, 0), (64, 64), 2 * pairs) if is_sdxl(pipe) else None
    latents = torch.randn(2 * pairs, 4, 16, 16, generator=g)
    noise = torch.randn(pairs, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    z = torch.randn(pairs, 4, 16, 16, generator=g).repeat(2, 1, 1, 1)
    t = torch.tensor([300, 700][:pairs]).repeat(2)
    return latents, noise, t, (cond.encoder_hidden_states, cond.added_cond_kwargs(ids)), z


def _loss(pipe, batch, objective: str, space: str):
    latents, noise, t, cond, z = batch
    errs = per_sample_errors(
        pipe.unet,
        pipe.scheduler,
        latents,
        noise,
        t,
        cond,
        space=space,
        with_reference=objective == "dpo",
        variance_noise=z,
    )
    chosen, rejected = errs.policy.chunk(2)
    refs = errs.reference.chunk(2) if errs.reference is not None else (None, None)
    return preference_loss(objective, chosen, rejected, *refs, beta=BETA[space], sft_weight=0.5), chosen, rejected


@pytest.mark.parametrize("build", [build_tiny_sdxl, build_tiny_sd15], ids=["sdxl", "sd15"])
@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_trains_on_tiny_pipeline(objective: str, space: str, build) -> None:
    pipe = build(seed=1)
    add_lora(pipe.unet, LoraSettings(rank=4, alpha=4))
    params = lora_parameters(pipe.unet)
    before = [p.detach().clone() for p in params]
    batch = _toy_batch(pipe)
    optimizer = torch.optim.Adam(params, lr=1e-4)

    out, chosen, rejected = _loss(pipe, batch, objective, space)
    # Value at init: LoRA B = 0, so the policy is the reference.
    if objective == "dpo":
        # NCP's reference features come from a batched pass (target and reference together): float rounding of the
        # two batch layouts differs by ~1e-11 on some CPUs, which beta = 5e5 turns into ~1e-6 of loss.
        assert out.loss.item() == pytest.approx(LN2, abs=1e-6 if space == "latent" else 2e-5)
    elif objective == "cpo":
        inside = -BETA[space] * (chosen.detach() - rejected.detach())
        expected = torch.nn.functional.softplus(-inside).mean() + 0.5 * chosen.detach().mean()
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    else:
        assert out.loss.item() == pytest.approx(chosen.mean().item(), rel=1e-6)

    out.loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    optimizer.step()
    optimizer.zero_grad()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))

    with torch.no_grad():
        _, chosen_after, rejected_after = _loss(pipe, batch, objective, space)
    if objective == "sft":
        assert chosen_after.mean() < chosen.detach().mean()
    else:  # the preference moved the right way: chosen error fell relative to rejected
        assert (chosen_after - rejected_after).mean() < (chosen.detach() - rejected.detach()).mean()
