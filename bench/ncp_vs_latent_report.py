"""Statistics and the docs section of bench/ncp_vs_latent.py: gains on the test probes pooled over training seeds with a
bootstrap interval over prompts (ncp.evaluate.cluster_ci; METHOD.md "Reading results"), each arm paired against latent
DPO on the same (prompt, seed) images, steps / seconds / votes to reach latent DPO's final gain, and one generated
sentence a reviewer can quote."""

from __future__ import annotations

import numpy as np

from ncp.evaluate import cluster_ci

LABEL = {"latent": "latent DPO", "ncp": "NCP-DPO", "latent-w": "latent DPO, PL/L-weighted t",
         "ncp-rand": "NCP-DPO, random encoder"}  # fmt: skip
FULL_COMMAND = "python -m bench.ncp_vs_latent --threads 1"
QUICK_COMMAND = "python -m bench.ncp_vs_latent --quick"


def _gains(res: dict, arm: str, regime: str, step: int) -> np.ndarray:
    """(prompts, seeds x training seeds) judge gains over the base image of the same (prompt, seed)."""
    base = np.asarray(res["base_test"])
    runs = [r for r in res["runs"] if r["arm"] == arm and r["regime"] == regime]
    return np.concatenate([np.asarray(r["test"][str(step)] if str(step) in r["test"] else r["test"][step]) - base
                           for r in runs], axis=1)  # fmt: skip


def summarize(res: dict) -> dict:
    steps = sorted(int(s) for s in res["runs"][0]["test"])
    last, batch = steps[-1], res["settings"]["batch"]
    step_s = res["timing"]["train_step_s"]
    ref = _gains(res, "latent", "tuned", last)
    target = cluster_ci(ref)[0]
    out: dict = {"steps": steps, "latent_final_gain": target, "arms": {}}
    for arm in LABEL:
        for regime in ("tuned", "nominal"):
            curve = [cluster_ci(_gains(res, arm, regime, s)) for s in steps]
            final = _gains(res, arm, regime, last)
            reach = next((s for s, c in zip(steps, curve, strict=True) if c[0] >= target), None)
            acc = [np.mean(r["acc"][-10:]) for r in res["runs"] if r["arm"] == arm and r["regime"] == regime]
            beta = next(r["beta"] for r in res["runs"] if r["arm"] == arm and r["regime"] == regime)
            gain = curve[-1][0]
            out["arms"][f"{arm}/{regime}"] = {
                "arm": arm, "regime": regime, "beta": beta, "gain": curve[-1], "curve": curve,
                "vs_latent": cluster_ci(final - ref) if (arm, regime) != ("latent", "tuned") else None,
                "steps_to_latent_final": reach,
                "seconds_to_latent_final": None if reach is None else reach * step_s[arm],
                "votes_to_latent_final": None if reach is None else reach * batch,
                "gain_per_1k_votes": 1000 * gain / (last * batch),
                "gain_per_cpu_min": 60 * gain / (last * step_s[arm]),
                "step_s": step_s[arm], "step_cost_vs_latent": step_s[arm] / step_s["latent"],
                "train_implicit_acc": float(np.mean(acc)),
            }  # fmt: skip
    return out


def _ci(c: tuple | list | None) -> str:
    return "" if c is None else f"{c[0]:+.3f} ({c[1]:+.3f}..{c[2]:+.3f})"


def _excludes_zero(c: tuple | list | None) -> bool:
    return c is not None and (c[1] > 0 or c[2] < 0)


def verdict(s: dict) -> str:
    """One quotable sentence, generated from the numbers: the winner among the tuned arms, its margin over latent DPO
    with CI, per vote and per CPU-minute, and what the three controls say about the paper's mechanism."""
    arms = {k.split("/")[0]: v for k, v in s["arms"].items() if k.endswith("/tuned")}
    win = max(arms, key=lambda a: arms[a]["gain"][0])
    w = arms[win]
    head = f"On the default base, {LABEL[win]} gains the most on the test probes ({_ci(w['gain'])} judge"
    head += f", {w['gain_per_1k_votes']:+.3f} per 1k votes, {w['gain_per_cpu_min']:+.3f} per CPU-minute)"
    if win != "latent":
        head += f", {_ci(w['vs_latent'])} over latent DPO" + (
            "" if _excludes_zero(w["vs_latent"]) else " (CI spans 0)"
        )
    ncp, lw, rnd = arms["ncp"]["vs_latent"], arms["latent-w"]["vs_latent"], arms["ncp-rand"]["vs_latent"]
    parts = []
    parts.append("NCP-DPO " + ("beats" if _excludes_zero(ncp) and ncp[0] > 0 else "loses to" if _excludes_zero(ncp)
                 else "is not distinguishable from") + " latent DPO")  # fmt: skip
    if _excludes_zero(lw) and (lw[0] > 0) == (ncp[0] > 0):
        parts.append("the PL/L timestep weighting alone moves latent DPO the same way, so the weighting explains it")
    else:
        parts.append("the PL/L timestep weighting alone does not reproduce it")
    near = abs(arms["ncp"]["gain"][0] - arms["ncp-rand"]["gain"][0]) < max(
        1e-9, arms["ncp"]["gain"][0] - arms["ncp"]["gain"][1]
    )
    rel = "as well as" if near else "worse than" if rnd is not None and rnd[0] < ncp[0] else "better than"
    parts.append(f"a random encoder does {rel} the pretrained one")
    return head + "; " + ", ".join(parts) + "."


def markdown(res: dict) -> str:
    s, quick = res["summary"], res["mode"] == "quick"
    r = res["ratios"]
    lines = ["## NCP-DPO vs latent DPO, taken apart (`bench/ncp_vs_latent.py`)", ""]
    if quick:
        lines += [f"**Full figures pending.** These are the `--quick` mode's (1 seed, {s['steps'][-1]} steps, "
                  f"{len(res['base_test'])} test prompts): a smoke test of every phase, not a result. The full run "
                  f"(5 seeds, tuned betas) is estimated at **{res['estimate_full_min']:.0f} min** on one free core of this "
                  f"CPU from the per-step and per-image CPU times measured here; run it with `{FULL_COMMAND}`.", ""]  # fmt: skip
    lines += [
        f"Mode **{res['mode']}**; model `{res['model'].split('/')[-1]}`; {res['data']['pairs']} judge-labelled on-policy "
        f"pairs from {res['data']['prompts']} training prompts (none a gate or test probe); DPO, LoRA rank 8, lr 2e-3, "
        f"batch {res['settings']['batch']}, t >= 0.3 T, fp32 in every arm; {res['settings']['seeds']} seed(s); test: "
        f"{len(res['base_test'])} test-probe prompts x {res['settings']['test_seeds']} seed(s) x seeds, gains over the "
        f"base image of the same probe, 95% bootstrap over prompts. Wall {res['wall_s'] / 60:.1f} min "
        f"({res['cpu_s'] / 60:.1f} CPU-min: step and image times are CPU seconds, the machine was shared), "
        f"{res['threads']} thread(s). Rerun: `{QUICK_COMMAND if quick else FULL_COMMAND}`; raw numbers in "
        "`docs/benchmarks/ncp_vs_latent.json`.", "",
        "| arm | beta | final gain (95% CI) | vs latent DPO (tuned) | steps / s / votes to latent's final | "
        "gain per 1k votes | per CPU-min | step s (x latent) | train acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for a in s["arms"].values():
        reach = (
            "-"
            if a["steps_to_latent_final"] is None
            else (f"{a['steps_to_latent_final']} / {a['seconds_to_latent_final']:.0f} / {a['votes_to_latent_final']}")
        )
        lines.append(f"| {LABEL[a['arm']]} ({a['regime']}) | {a['beta']:g} | {_ci(a['gain'])} | {_ci(a['vs_latent'])} | "
                     f"{reach} | {a['gain_per_1k_votes']:+.3f} | {a['gain_per_cpu_min']:+.3f} | "
                     f"{a['step_s']:.2f} ({a['step_cost_vs_latent']:.2f}x) | {a['train_implicit_acc']:.2f} |")  # fmt: skip
    lo = int(0.3 * r["bins"])
    lines += ["", f"Measured E[PL/L | t] on the base (pretrained encoder; {r['bins']} bins of the schedule, the "
              "latent-w arm's weights are these over their mean on t >= 0.3 T; a random encoder's PL is "
              f"{r['rand_scale']:.3g}x the pretrained one's):", "",
              "| t | " + " | ".join(f"{k * 1000 // r['bins']}" for k in range(lo, r["bins"], 2)) + " |",
              "|---|" + "---|" * len(range(lo, r["bins"], 2)),
              "| PL/L | " + " | ".join(f"{r['pl_over_l'][k]:.2g}" for k in range(lo, r["bins"], 2)) + " |",
              "| weight | " + " | ".join(f"{r['weights'][k]:.2f}" for k in range(lo, r["bins"], 2)) + " |", ""]  # fmt: skip
    lines.append(("**Verdict (quick mode, not a result):** " if quick else "**Verdict:** ") + verdict(s))
    return "\n".join(lines) + "\n"
