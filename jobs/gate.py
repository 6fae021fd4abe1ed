"""The promotion rule of a round: may the candidate replace the serving version? (issue: evaluate and gate)

Two criteria, on the evaluator's output (`ncp.evaluate`):
- held-out implicit reward accuracy (prompt-disjoint votes) no worse than the serving version's by the configured
  margin, beyond noise: the drop is compared with its PAIRED standard error, both versions scored on the same pairs
  and (t, eps) draws, and rejects only when `delta + z SE` is still below the margin;
- in the shapes world, the judge score on the fixed probe set at least the serving version's plus a delta.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.loop import LoopConfig


def promotion_gate(ev: dict, cfg: LoopConfig) -> tuple[bool, str]:
    """(promote?, the reason in words) for an evaluation of `candidate` (and `serving`, absent when the base serves)."""
    cand = ev["versions"]["candidate"]
    serving = ev["versions"].get("serving")
    notes = []
    if ev.get("eval_pairs", 0) >= cfg.gate_min_eval_pairs:
        ref_acc = serving["implicit_acc"] if serving else 0.5  # the base's margins are all 0
        delta = cand["implicit_acc"] - ref_acc
        if serving:
            se = ev.get("paired", {}).get("candidate-serving", {}).get("acc_delta_se")
        else:
            se = cand.get("implicit_acc_se")
        se = se if se is not None and math.isfinite(se) else 0.0  # an evaluator without it: the point estimate
        notes.append(f"implicit acc {cand['implicit_acc']:.3f} vs {ref_acc:.3f} (SE {se:.3f})")
        if delta + cfg.gate_acc_z * se < cfg.gate_min_acc_delta:
            why = f" (delta {delta:+.3f} + {cfg.gate_acc_z:g} SE < {cfg.gate_min_acc_delta:+.3f})"
            return False, "; ".join(notes) + why
    else:
        notes.append(f"only {ev.get('eval_pairs', 0)} held-out pairs: accuracy criterion not used")
    if "judge" in cand:
        ref = serving["judge"] if serving else ev["base_judge"]
        delta = cand["judge"] - ref
        notes.append(f"judge {cand['judge']:.3f} vs {ref:.3f}")
        if delta < cfg.gate_min_judge_delta:
            return False, "; ".join(notes) + f" (delta {delta:+.3f} < {cfg.gate_min_judge_delta:+.3f})"
    return True, "; ".join(notes)
