"""The promotion rule of a round: may the candidate replace the serving version? (issue: evaluate and gate)

Two criteria, on the evaluator's output (`ncp.evaluate`):
- held-out implicit reward accuracy (prompt-disjoint votes), measured in the space the candidate was trained in (the
  evaluator's `space`: an NCP candidate by its perceptual errors, a latent one by its eps errors), no worse than the serving version's by the configured
  margin, beyond noise: the drop is compared with its PAIRED standard error, both versions scored on the same pairs
  and (t, eps) draws, and rejects only when `delta + z SE` is still below the margin;
- in the shapes world, the judge score on the fixed probe set at least the serving version's plus a delta.

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
) -> tuple[bool, str]:
    """(promote?, the reason in words) for an evaluation of `candidate` (and `serving`, absent when the base serves).

    min_eval_pairs: fewer held-out pairs than this and the accuracy criterion is not used;
    acc_z, min_acc_delta: reject when the accuracy change + acc_z x its standard error is below min_acc_delta;
    min_judge_delta: shapes world, reject when the judge score change is below it.
    """
    cand = ev["versions"]["candidate"]
    serving = ev["versions"].get("serving")
    notes = []
    if ev.get("eval_pairs", 0) >= min_eval_pairs:
        ref_acc = serving["implicit_acc"] if serving else 0.5  # the base's margins are all 0
        delta = cand["implicit_acc"] - ref_acc
        if serving:
            se = ev.get("paired", {}).get("candidate-serving", {}).get("acc_delta_se")
        else:
            se = cand.get("implicit_acc_se")
        se = se if se is not None and math.isfinite(se) else 0.0  # an evaluator without it: the point estimate
        space = ev.get("space", "latent")  # an evaluator that predates the field measured latent space
        notes.append(f"implicit acc ({space}) {cand['implicit_acc']:.3f} vs {ref_acc:.3f} (SE {se:.3f})")
        if delta + acc_z * se < min_acc_delta:
            why = f" (delta {delta:+.3f} + {acc_z:g} SE < {min_acc_delta:+.3f})"
            return False, "; ".join(notes) + why
    else:
        notes.append(f"only {ev.get('eval_pairs', 0)} held-out pairs: accuracy criterion not used")
    if "judge" in cand:
        ref = serving["judge"] if serving else ev["base_judge"]
        delta = cand["judge"] - ref
        notes.append(f"judge {cand['judge']:.3f} vs {ref:.3f}")
        if delta < min_judge_delta:
            return False, "; ".join(notes) + f" (delta {delta:+.3f} < {min_judge_delta:+.3f})"
    return True, "; ".join(notes)
