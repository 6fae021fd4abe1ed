"""The promotion rule of a round: may the candidate replace the serving version? (issue: evaluate and gate)

On the evaluator's output (`ncp.evaluate`):
- held-out implicit reward accuracy (prompt-disjoint votes), measured in the space the candidate was trained in (the
  evaluator's `space`: an NCP candidate by its perceptual errors, a latent one by its eps errors). The change against
  the serving version (0.5 for the base, whose margins are all 0) is read with its PAIRED standard error, both versions
  scored on the same pairs and (t, eps) draws, with a prompt's rows as one cluster (every rating of a pair, every pair
  of a prompt: `acc_delta_se_prompts`). Two uses:
  * no-worse (the default): reject only when `delta + acc_z SE` is still below `min_acc_delta`;
  * evidence (`require_acc_gain`): promote only when the candidate's accuracy is above the base's 0.5 by more than
    `gain_z` of its own (clustered) SEs, i.e. it predicts votes it never trained on beyond chance: it learned the votes.
    Without it a round's label-independent step (a LoRA moved +-0.05 on the judge by 100 Adam steps on coin-flip
    labels, docs/research/loop-null.md) is promoted whenever it happens to land well: the gate becomes random search
    on its own score. The evidence is asked against the base, not the serving version: a round that continues the
    served version inherits its implicit reward, and ranking held-out votes better than it is not what makes a
    round draw better (rounds from v0001 drew +0.135 and +0.145 on the probes at accuracies 0.625 and 0.664 against
    v0001's 0.615 and 0.602, short of the evidence that rule asked for, docs/research/votes-vs-pairs.md); against the
    serving version the no-worse rule guards.
- in the shapes world, the judge score on the fixed probe set: the change must be at least `min_judge_delta` (with
  the evidence rule, a negative margin: the judge vetoes a regression, it does not choose what is promoted).

The thresholds come in as arguments (the loop passes its `LoopConfig.gate_*` fields), so the rule depends on
nothing but the evaluation it reads.
"""

from __future__ import annotations

import math


def promotion_gate(
    ev: dict,
    *,
    min_eval_pairs: int = 8,
    acc_z: float = 1.96,
    min_acc_delta: float = -0.02,
    min_judge_delta: float = 0.0,
    require_acc_gain: bool = False,
    gain_z: float = 1.96,
) -> tuple[bool, str]:
    """(promote?, the reason in words) for an evaluation of `candidate` (and `serving`, absent when the base serves).

    min_eval_pairs: fewer held-out pairs than this and the accuracy criterion is not used (with `require_acc_gain`:
    the candidate is rejected, it cannot show what it learned);
    acc_z, min_acc_delta: reject when the accuracy change + acc_z x its standard error is below min_acc_delta;
    require_acc_gain, gain_z: reject unless the candidate's accuracy above the base's 0.5, less gain_z x its own
    standard error, is above 0;
    min_judge_delta: shapes world, reject when the judge score change is below it.
    """
    cand = ev["versions"]["candidate"]
    serving = ev["versions"].get("serving")
    notes = []
    pairs = ev.get("eval_pairs", 0)
    if pairs >= min_eval_pairs:
        ref_acc = serving["implicit_acc"] if serving else 0.5  # the base's margins are all 0
        delta = cand["implicit_acc"] - ref_acc
        # The SE with a prompt's rows as one cluster: the held-out split is drawn by prompt and the arena shows a pair
        # to several raters, so rows are not independent (the row SE read 0.93-1.6x too small, loop-null.md).
        # An evaluator that predates it (or a split of one prompt): the row SE; without either, the point estimate.
        if serving:
            p = ev.get("paired", {}).get("candidate-serving", {})
            se = _finite(p.get("acc_delta_se_prompts"), p.get("acc_delta_se"))
        else:
            se = _finite(cand.get("implicit_acc_se_prompts"), cand.get("implicit_acc_se"))
        space = ev.get("space", "latent")  # an evaluator that predates the field measured latent space
        prompts = ev.get("eval_prompts")
        where = f"{pairs} pairs" + (f" of {prompts} prompts" if prompts else "")
        notes.append(f"implicit acc ({space}) {cand['implicit_acc']:.3f} vs {ref_acc:.3f} (SE {se:.3f}, {where})")
        if delta + acc_z * se < min_acc_delta:
            why = f" (delta {delta:+.3f} + {acc_z:g} SE < {min_acc_delta:+.3f})"
            return False, "; ".join(notes) + why
        if require_acc_gain:
            gain = cand["implicit_acc"] - 0.5  # against the base, whose margins are all 0
            own = _finite(cand.get("implicit_acc_se_prompts"), cand.get("implicit_acc_se"))
            if serving:
                notes.append(f"vs base {gain:+.3f} (SE {own:.3f})")
            if gain - gain_z * own <= 0:
                why = f" (no evidence it learned the votes: {gain:+.3f} over the base - {gain_z:g} SE <= 0)"
                return False, "; ".join(notes) + why
    elif require_acc_gain:
        return False, f"only {pairs} held-out pairs (need {min_eval_pairs}): no evidence yet that it learned the votes"
    else:
        notes.append(f"only {pairs} held-out pairs: accuracy criterion not used")
    if "judge" in cand:
        ref = serving["judge"] if serving else ev["base_judge"]
        delta = cand["judge"] - ref
        notes.append(f"judge {cand['judge']:.3f} vs {ref:.3f}")
        if delta < min_judge_delta:
            return False, "; ".join(notes) + f" (delta {delta:+.3f} < {min_judge_delta:+.3f})"
    return True, "; ".join(notes)


def _finite(*values: float | None) -> float:
    """The first of `values` that is a finite number (0.0 if none is)."""
    return next((float(v) for v in values if v is not None and math.isfinite(v)), 0.0)
