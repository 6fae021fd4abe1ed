"""The alignment loop's settings: one frozen dataclass, every field with a default (the app's entry point and
`python -m jobs.round` map environment variables and options onto it; docs/CONFIG.md lists them).

It lives apart from the loop so that what reads the settings (the schedule, the runtime, the benchmarks) does not
import the loop's machinery, and the loop and its gate import it without a cycle.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

# Each round space's DPO beta: NCP-DPO's tuned 5e5, latent Diffusion-DPO's reference 5000 (METHOD.md). They differ
# about 100x because the NCP error PL is ~c_t^2 x the latent error L; a latent round at NCP's beta would be a far
# stronger KL anchor, not the same method in another space.
SPACE_BETA = {"ncp": 5e5, "latent": 5000.0}


@dataclass(frozen=True)
class LoopConfig:
    """Settings of the alignment loop (every field has a default; the app's entry point maps env vars onto them)."""

    model: str = "models/shapes-base"  # the base pipeline the trainer and evaluator load
    train_every_s: float = 300.0  # schedule interval
    min_new_votes: int = 32  # trainable votes since the last round needed to start one
    min_pairs: int = 16  # strict-preference pairs needed in the snapshot
    quarantine_s: float = 0.0  # votes younger than this wait for the next round (time to flag abuse)
    max_rater_share: float = 0.34  # at most this share of a round's pairs from one rater (poisoning bound)
    time_limit_s: float = 300.0  # wall-clock limit of the training subprocess
    eval_time_limit_s: float = 240.0
    objective: str = "dpo"
    space: str = "ncp"
    beta: float = SPACE_BETA["ncp"]  # a round in latent space takes SPACE_BETA["latent"]
    # The best ncp-dpo grid point on the shapes validation prompts (docs/research/ncp-vs-latent-dpo.md, 120 steps of
    # 8 pairs): at 2e-4 the LoRA barely moves in a round, 3e-3 overshoots.
    lr: float = 1e-3
    max_steps: int = 120
    # ...and at most this many passes over the round's pairs: the first round of the shapes world's default base, 150
    # steps on its first 160 pairs (7.5 passes), collapsed to empty canvases (judge 0.60 -> 0.43); 40 steps on the same
    # pairs did not (docs/research/loop-plateau.md).
    max_epochs: float = 2.0
    # ...and, when > 0, at most this many passes over the round's DISTINCT image pairs (a row is one vote, and several
    # raters vote on each pair): NCP-DPO rounds gain up to ~1.5 passes over the same image pairs and then turn down,
    # while latent DPO keeps gaining (docs/research/round-space.md). 0: no cap (the measured default so far).
    max_pair_passes: float = 0.0
    batch_size: int = 8
    lora_rank: int = 8  # fixed for the life of a deployment (hot-swap needs the same rank and targets)
    lora_alpha: int = 8
    # Lowest training timestep as a fraction of the schedule (ncp.train --timestep-low): 0 is the paper's uniform t;
    # the shapes world trains on t >= 0.3 T, where its preferences are decided (ncp.shapes.model.DEFAULT_TIMESTEP_LOW).
    timestep_low: float = 0.0
    # DPO reference of a round that continues an adapter (ncp.train --reference): "base" (the paper: every round's KL
    # is measured from the base; at DPO's optimum, rounds would converge to one tilt of it, though a round's 100 steps
    # stop far short of it: docs/research/round-transfer.md) or "init" (iterative DPO: the version the round
    # continues is the reference, so each round is one more step of a bounded size beyond the last).
    reference: str = "base"
    # Which votes a round trains on: "all" (the whole snapshot) or "serving" (only pairs the serving version drew both
    # images of: on-policy data, what iterative DPO with reference "init" assumes; with it, every round starts from
    # the serving version, since a rejected candidate has no pairs of its own, and a round waits (skipped, no run
    # recorded) until the serving version has `min_pairs` of them: raise min_pairs for this window).
    train_window: str = "all"
    extra_train_args: tuple[str, ...] = ()
    launcher: tuple[str, ...] = (sys.executable, "-m", "ncp.train")  # or ("accelerate", "launch", "-m", "ncp.train")
    evaluator: tuple[str, ...] = (sys.executable, "-m", "ncp.evaluate")
    threads: int = 1  # torch threads of the subprocesses (the app keeps generating beside them)
    shapes_probes: int = 0  # shapes world: judge probe prompts for the gate (0: no judge)
    probe_seeds: int = 2
    probe_steps: int = 20  # sampler of the probe images (the shapes world uses the model's shipped sampler)
    probe_guidance: float = 3.0
    gate_min_acc_delta: float = -0.02  # promote if candidate implicit acc >= serving's + this (held-out pairs)
    # ...unless the drop is within noise: the criterion rejects only when delta + z x its paired standard error is
    # still below the margin (1.96: the 95% interval of the drop lies wholly below it; 0: the point estimate).
    gate_acc_z: float = 1.96
    gate_min_eval_pairs: int = 8  # fewer held-out pairs than this: the accuracy criterion is not used
    # The evaluator scores only the newest this many held-out pairs (0: all). The held-out split grows with every
    # vote, and scoring all of it made a round's evaluation grow with the arena's age (ncp.evaluate --max-pairs).
    eval_max_pairs: int = 256
    # Share of prompts whose votes are held out from training for the gate (by a hash of the prompt: stable, and
    # prompt-disjoint). At 0.1 the gate's window on the shapes world held 13-28 prompts and rejected rounds that drew
    # +0.12-0.15 better on its probes for want of evidence (docs/research/votes-vs-pairs.md). Raising it later moves
    # some trained prompts into the held-out split, so choose it once per deployment.
    eval_fraction: float = 0.25
    gate_min_judge_delta: float = 0.0  # shapes: promote only if judge(candidate) - judge(serving) >= this
    # Evidence rule (jobs.gate): promote only a candidate whose held-out accuracy beats the base's (chance) by more
    # than gate_gain_z of its standard errors (and is no worse than the serving version's); a round waits (skipped,
    # no run recorded) until the held-out split has gate_min_eval_pairs strict pairs. The shapes world turns it on:
    # there a judge-only gate promoted coin-flip rounds (docs/research/loop-null.md).
    gate_require_acc_gain: bool = False
    gate_gain_z: float = 1.96
    # Null arm (bench.loop --null): every rater label the loop reads, the training pairs and the gate's held-out pairs
    # alike, replaced by a coin flip, so nothing the votes say reaches the served model.
    coin_flip_labels: bool = False
    keep_versions: int = 5
    # A rejected candidate seeds the next round (more steps on more votes) up to this many rounds in a row before the
    # line restarts from the serving version; 0 = every round starts from the serving version. The offline sweeps
    # peak a few hundred steps in (docs/research/preference-training-reach.md), more than one round trains; the gate
    # still guards what is served.
    continue_rejected: int = 3
    # ...unless its probe judge fell more than this below the version it was compared with: a collapsed candidate
    # seeded the next round of the same run, which then also fell short (-0.046 where a fresh start gained +0.075).
    continue_max_drop: float = 0.02

    def round_steps(self, pairs: int, distinct_pairs: int | None = None) -> int:
        """Optimizer steps of a round on `pairs` rows: max_steps, or fewer when that would pass over them more than
        max_epochs times, or (with max_pair_passes > 0) over its `distinct_pairs` image pairs more than
        max_pair_passes times; at least one step."""
        steps = min(self.max_steps, math.ceil(self.max_epochs * pairs / self.batch_size))
        if self.max_pair_passes > 0 and distinct_pairs is not None:
            steps = min(steps, math.ceil(self.max_pair_passes * distinct_pairs / self.batch_size))
        return max(1, steps)

    def __post_init__(self) -> None:
        if self.objective not in ("dpo", "cpo", "sft") or self.space not in ("latent", "ncp"):
            raise ValueError(f"objective must be dpo|cpo|sft and space latent|ncp, got {self.objective}/{self.space}.")
        if self.reference not in ("base", "init"):
            raise ValueError(f"reference must be base|init, got {self.reference!r}.")
        if self.train_window not in ("all", "serving"):
            raise ValueError(f"train_window must be all|serving, got {self.train_window!r}.")
        if not 0 <= self.timestep_low < 1:
            raise ValueError(f"timestep_low is a fraction of the schedule in [0, 1), got {self.timestep_low}.")
        if self.gate_acc_z < 0:
            raise ValueError(f"gate_acc_z must be >= 0 (0: the point estimate), got {self.gate_acc_z}.")
        if self.gate_gain_z < 0:
            raise ValueError(f"gate_gain_z must be >= 0 (0: any gain of the point estimate), got {self.gate_gain_z}.")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction is a share of prompts in (0, 1), got {self.eval_fraction}.")
        if self.eval_max_pairs < 0:
            raise ValueError(f"eval_max_pairs must be >= 0 (0: all held-out pairs), got {self.eval_max_pairs}.")
        if not self.max_epochs > 0:
            raise ValueError(f"max_epochs must be > 0 passes over a round's pairs, got {self.max_epochs}.")
        if not self.max_pair_passes >= 0:
            raise ValueError(
                f"max_pair_passes must be >= 0 passes over a round's image pairs (0: no cap), got {self.max_pair_passes}."
            )
        if self.continue_rejected < 0:
            raise ValueError(f"continue_rejected must be >= 0 rounds, got {self.continue_rejected}.")
        if not 0 < self.max_rater_share <= 1:
            raise ValueError(f"max_rater_share must be in (0, 1], got {self.max_rater_share}.")
        if self.time_limit_s <= 0 or self.train_every_s <= 0:
            raise ValueError("time_limit_s and train_every_s must be positive.")
