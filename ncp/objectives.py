"""Preference objectives as pure functions of per-sample errors (METHOD.md "The objectives").

The space the errors were measured in (`latent`: eps-prediction MSE, paper eq. 8; `ncp`: perceptual error PL of the
UNet encoder, eq. 12-17) is decided by `ncp.perception.per_sample_errors`; this module only turns two (or four) vectors
of per-sample errors into a loss, so the six methods are `OBJECTIVES x SPACES`:

    dpo  (Diffusion-DPO, Wallace et al. eq. 14 / paper eq. 8; ncp-dpo eq. 18)
         loss = mean_pairs -logsigmoid(-0.5 * beta * ((Lc - Lrc) - (Lr - Lrr) + anchor * relu(Lc - Lrc)))
         anchor > 0 is DPO-Positive (Pal et al. 2024, "Smaug", eq. 3): DPO alone can lower its loss by making BOTH
         images less likely (both errors rise, samples degrade); the hinge charges any rise of the chosen image's
         error above the reference's. anchor = 0 (default) is plain DPO.
    cpo  (Diffusion-CPO, paper eq. 9-11; ncp-cpo eq. 19)
         loss = mean_pairs -logsigmoid(-beta * (Lc - Lr)) + sft_weight * mean(Lc)
    sft  loss = mean(Lc)

Use:
    from ncp.objectives import preference_loss
    out = preference_loss("dpo", chosen_err, rejected_err, ref_chosen_err, ref_rejected_err, beta=5000.0)
    out.loss.backward(); log(out.metrics)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

OBJECTIVES: tuple[str, ...] = ("dpo", "cpo", "sft")
SPACES: tuple[str, ...] = ("latent", "ncp")
Objective = Literal["dpo", "cpo", "sft"]
Space = Literal["latent", "ncp"]
LN2 = math.log(2.0)  # the dpo loss when policy == reference (at initialisation, LoRA B = 0)


@dataclass(frozen=True)
class PreferenceLoss:
    """The loss to backpropagate and the metrics every objective reports (all plain floats, for logging).

    metrics: `loss`; `implicit_acc` (fraction of pairs whose implicit reward prefers the chosen image, ties count
    0.5); `reward_margin` (mean of `(Lrc - Lc) - (Lrr - Lr)` for dpo, `Lr - Lc` without a reference);
    `chosen_err` / `rejected_err` (mean policy errors).
    """

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def _check_errors(name: str, err: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(err, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of per-sample errors with shape (B,), got {type(err)!r}.")
    if err.ndim != 1 or err.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (B,) with B >= 1 (one error per pair), got {tuple(err.shape)}; "
            "reduce the per-element error with a mean over (C, H, W) first."
        )
    if like is not None and err.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(err.shape)} but chosen_err has {tuple(like.shape)}; pass one per pair."
        )


def _implicit_accuracy(logits: Tensor) -> float:
    """Share of pairs with a positive implicit reward logit; ties (logit exactly 0) count as half right."""
    logits = logits.detach()
    return ((logits > 0).float() + 0.5 * (logits == 0).float()).mean().item()


def preference_loss(
    objective: Objective,
    chosen_err: Tensor,
    rejected_err: Tensor | None,
    ref_chosen_err: Tensor | None = None,
    ref_rejected_err: Tensor | None = None,
    *,
    beta: float,
    sft_weight: float = 0.0,
    anchor: float = 0.0,
) -> PreferenceLoss:
    """Loss and metrics of `objective` from per-sample errors of shape (B,), one entry per preference pair.

    chosen_err / rejected_err: policy errors (L_theta or PL_theta) of the chosen / rejected image of each pair.
    ref_chosen_err / ref_rejected_err: the same for the reference (adapters disabled); required by `dpo` only and
    expected without gradient. rejected_err may be None for `sft` only (its preference metrics are then NaN).
    beta: strength of the implicit KL constraint (> 0; ignored by `sft`). sft_weight: the paper's lambda, the weight of
    the chosen-image error added to `cpo` (>= 0). anchor: `dpo` only, the DPO-Positive weight lambda of the hinge on
    the chosen image's error rising above the reference's (>= 0; 0 = plain DPO).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}.")
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r} (METHOD.md: 5000 for latent DPO).")
    if not (isinstance(sft_weight, int | float) and math.isfinite(sft_weight) and sft_weight >= 0):
        raise ValueError(f"sft_weight must be a finite number >= 0, got {sft_weight!r}.")
    if not (isinstance(anchor, int | float) and math.isfinite(anchor) and anchor >= 0):
        raise ValueError(
            f"anchor must be a finite number >= 0 (DPO-Positive's lambda; 0 = plain DPO), got {anchor!r}."
        )
    if anchor and objective != "dpo":
        raise ValueError(
            f"anchor (DPO-Positive) only applies to objective 'dpo', got {objective!r} with anchor={anchor}."
        )
    _check_errors("chosen_err", chosen_err)
    if rejected_err is None and objective != "sft":
        raise ValueError(f"objective {objective!r} compares two images: pass rejected_err (only 'sft' may omit it).")
    if rejected_err is not None:
        _check_errors("rejected_err", rejected_err, chosen_err)

    if objective == "dpo":
        if ref_chosen_err is None or ref_rejected_err is None:
            raise ValueError(
                "objective 'dpo' needs the reference errors ref_chosen_err and ref_rejected_err "
                "(compute them with per_sample_errors(..., with_reference=True)); 'cpo' and 'sft' need none."
            )
        _check_errors("ref_chosen_err", ref_chosen_err, chosen_err)
        _check_errors("ref_rejected_err", ref_rejected_err, chosen_err)
        # Paper eq. 8 / Wallace et al. eq. 14, per pair, then the mean over pairs (a mean inside the logsigmoid is a
        # known bug of early public ports).
        model_diff = chosen_err - rejected_err
        ref_diff = ref_chosen_err - ref_rejected_err
        # DPO-Positive (Pal et al. 2024, eq. 3 with log pi ~ -L): the hinge is zero while the chosen image is at least
        # as likely as under the reference, so it leaves plain DPO's gradient alone until the chosen image degrades.
        hinge = F.relu(chosen_err - ref_chosen_err) if anchor else 0.0
        logits = -0.5 * beta * (model_diff - ref_diff + anchor * hinge)
        loss = -F.logsigmoid(logits).mean()
        margin = (ref_diff - model_diff).detach().mean().item()
        logits = ref_diff - model_diff  # implicit accuracy ranks by the reward alone, never by the hinge
    elif objective == "cpo":
        # Paper eq. 9-11: no reference model; the SFT term keeps the chosen error itself going down.
        logits = -beta * (chosen_err - rejected_err)
        loss = -F.logsigmoid(logits).mean() + sft_weight * chosen_err.mean()
        margin = (rejected_err - chosen_err).detach().mean().item()
    else:  # sft
        loss = chosen_err.mean()
        logits = None if rejected_err is None else rejected_err - chosen_err
        margin = math.nan if logits is None else logits.detach().mean().item()

    metrics = {
        "loss": loss.detach().item(),
        "implicit_acc": math.nan if logits is None else _implicit_accuracy(logits),
        "reward_margin": margin,
        "chosen_err": chosen_err.detach().mean().item(),
        "rejected_err": math.nan if rejected_err is None else rejected_err.detach().mean().item(),
    }
    return PreferenceLoss(loss=loss, metrics=metrics)
