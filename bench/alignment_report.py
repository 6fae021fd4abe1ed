"""Summary, learning-curve plots and the BENCHMARKS.md section of `bench/alignment.py` (issue 7), computed from its
resumable state only, so a finished run can be re-reported without training:

    python bench/alignment_report.py runs/alignment-full/state.json     # prints the markdown section

Statistics. Final judge score, win rate and held-out score: mean over training seeds with a 95% Student-t interval
(n = seeds; none with one seed). Steps and wall time to reach latent DPO's final score: the first crossing of the
seed-mean test curve, linearly interpolated between checkpoints; wall time is the seed mean of steps x the run's median
wall seconds per training step (steps only, no evaluation; the median makes it robust to pauses of the shared
machine). The NCP-vs-latent difference also gets a paired interval over the test probes (each probe's seed-mean
score), which shows how much of the gap the probe set can resolve.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}
ORDER = ("latent-dpo", "ncp-dpo", "latent-cpo", "ncp-cpo", "latent-sft", "ncp-sft")
WALL_BUDGET_MIN = 90  # the whole full run must fit in 90 minutes of the 2-core CPU (issue 7)
ROOT = Path(__file__).resolve().parents[1]


def t_ci(values: Any) -> tuple[float, float]:
    """Mean and 95% Student-t half-width of the finite values (NaN half-width below two values)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size < 2:
        return (float(x.mean()) if x.size else math.nan), math.nan
    return float(x.mean()), float(T975.get(x.size - 1, 1.96) * x.std(ddof=1) / math.sqrt(x.size))


def _crossing(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """First point where the curve reaches `target`, interpolated in steps and seconds; None if never."""
    for i, point in enumerate(curve):
        if math.isfinite(point["judge"]) and point["judge"] >= target:
            if i == 0:
                return {"step": 0.0, "seconds": 0.0}
            prev = curve[i - 1]
            frac = (target - prev["judge"]) / max(point["judge"] - prev["judge"], 1e-12)
            return {k: prev[k] + frac * (point[k] - prev[k]) for k in ("step", "seconds")}
    return None


def summarize(
    state: dict[str, Any], finals: list[Any], best: dict[Any, Any], ablations: list[dict], steps: list[int]
) -> dict[str, Any]:
    """Per-method curves and final numbers, the goal check and the ablations (JSON-ready)."""
    evals, runs, last = state["evals"], state["runs"], steps[-1]

    def ev(spec: Any, step: int, name: str = "test") -> dict[str, Any]:
        return evals.get(f"base@0@{name}" if step == 0 else f"{spec.key}@{step}@{name}", {"judge": math.nan})

    methods: dict[str, dict[str, Any]] = {}
    for (objective, space), (lr, beta) in best.items():
        name = f"{space}-{objective}"
        specs = [s for s in finals if s.method == name]
        recs = [runs[s.key] for s in specs]
        curve = []
        for step in steps:
            judge, ci = t_ci([ev(s, step)["judge"] for s in specs])
            # Steady-pace wall time: steps x the run's median step time, so a pause or a burst of load on the shared
            # machine during one step does not move a whole curve (the summed per-step times are in the raw JSON).
            secs = [step * r.get("step_s", math.nan) if str(step) in r["checkpoints"] or step == 0 else math.nan
                    for r in recs]  # fmt: skip
            curve.append({"step": float(step), "judge": judge, "ci": ci, "seconds": t_ci(secs)[0]})
        finals_ev = [ev(s, last) for s in specs]
        accuracy = {a: t_ci([e.get("accuracy", {}).get(a, math.nan) for e in finals_ev])[0]
                    for a in ev(None, 0).get("accuracy", {})}  # fmt: skip
        methods[name] = {
            "lr": lr, "beta": beta, "seeds": len(specs), "curve": curve,
            "judge": t_ci([e["judge"] for e in finals_ev]),
            "win_rate": t_ci([e.get("win_rate", math.nan) for e in finals_ev]),
            "heldout": t_ci([ev(s, last, "heldout")["judge"] for s in specs]),
            "heldout_win_rate": t_ci([ev(s, last, "heldout").get("win_rate", math.nan) for s in specs]),
            "pixel_change": t_ci([e.get("pixel_change", math.nan) for e in finals_ev])[0],
            "accuracy": accuracy, "all_correct": t_ci([e.get("all_correct", math.nan) for e in finals_ev])[0],
            "step_s": t_ci([r.get("step_s", math.nan) for r in recs])[0],
            "step_cpu_s": t_ci([r.get("step_cpu_s", math.nan) for r in recs])[0],
            "peak_mem_mb": t_ci([r.get("peak_mem_mb", math.nan) for r in recs])[0],
            "train_s": curve[-1]["seconds"], "diverged": sum("diverged_at" in r for r in recs),
            "probe_means": np.mean([e["overall"] for e in finals_ev], axis=0).tolist()
            if finals_ev and all("overall" in e for e in finals_ev) else [],
            "selection": state.get("selection", {}).get(name),
        }  # fmt: skip
    base_overall = np.asarray(evals.get("base@0@test", {}).get("overall", []))
    for m in methods.values():  # paired over the test probes: each probe's seed-mean score minus the base image's
        d = np.asarray(m["probe_means"]) - base_overall if len(m["probe_means"]) == base_overall.size else np.zeros(0)
        half = 1.96 * d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else math.nan
        m["gain_vs_base"] = (float(d.mean()) if d.size else math.nan, float(half))
    lat, ncp = methods["latent-dpo"], methods["ncp-dpo"]
    target = lat["judge"][0]
    for m in methods.values():
        m["reach_latent_dpo"] = _crossing(m["curve"], target)
    reach = ncp["reach_latent_dpo"]
    diff = ncp["judge"][0] - lat["judge"][0]
    diff_ci = math.hypot(ncp["judge"][1], lat["judge"][1])
    same = len(ncp["probe_means"]) == len(lat["probe_means"])
    probe_d = np.asarray(ncp["probe_means"]) - np.asarray(lat["probe_means"]) if same else np.zeros(0)
    goal = {
        "target": target, "diff": diff, "diff_ci_seeds": diff_ci,
        "diff_ci_probes": float(1.96 * probe_d.std(ddof=1) / math.sqrt(probe_d.size)) if probe_d.size > 1 else None,
        "time_ratio": None if reach is None else reach["seconds"] / max(lat["train_s"], 1e-9),
        "step_cost_ratio": ncp["step_s"] / lat["step_s"],
    }  # fmt: skip
    # Reaching latent DPO's final score only means something when that score is above the base model's.
    goal["target_above_base"] = bool(target > evals.get("base@0@test", {}).get("judge", math.inf))
    goal["half_time"] = goal["target_above_base"] and goal["time_ratio"] is not None and goal["time_ratio"] <= 0.5
    goal["ends_higher"] = bool(diff > 0)
    goal["met"] = goal["half_time"] and goal["ends_higher"]
    rows: dict[str, dict[str, list]] = {}
    for row in ablations:
        r = rows.setdefault(row["name"], {"variant": [], "baseline": [], "variant_win": [], "variant_pix": [],
                                          "baseline_pix": [], "pairs": []})  # fmt: skip
        v, b = ev(row["variant"], last), ev(row["baseline"], last)
        r["variant"].append(v["judge"])
        r["baseline"].append(b["judge"])
        r["variant_win"].append(v.get("win_rate", math.nan))
        r["variant_pix"].append(v.get("pixel_change", math.nan))
        r["baseline_pix"].append(b.get("pixel_change", math.nan))
        r["pairs"].append(
            [state["data"].get(f"loaded:{s.data}", {}).get("kept") for s in (row["variant"], row["baseline"])]
        )
    abl = [{"name": n, **{k: t_ci(v)[0] for k, v in r.items() if k != "pairs"}, "pairs": r["pairs"][0],
            "seeds": len(r["variant"])} for n, r in rows.items()]  # fmt: skip
    base = evals.get("base@0@test", {})
    held = evals.get("base@0@heldout", {}).get("judge")
    return {"methods": methods, "goal": goal, "ablations": abl, "base": base.get("judge"),
            "base_accuracy": base.get("accuracy", {}), "base_heldout": held}  # fmt: skip


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _ci(pair: tuple[float, float] | list[float]) -> str:
    return _f(pair[0]) + ("" if not math.isfinite(pair[1]) else f" ± {_f(pair[1])}")


def conclusion(summary: dict[str, Any]) -> list[str]:
    """Sentences that state what the numbers show, whichever way they go."""
    m, g = summary["methods"], summary["goal"]
    lat, ncp = m["latent-dpo"], m["ncp-dpo"]
    best = max(m, key=lambda k: -math.inf if not math.isfinite(m[k]["judge"][0]) else m[k]["judge"][0])
    gain = {k: v["gain_vs_base"] for k, v in m.items() if math.isfinite(v["gain_vs_base"][1])}
    above = [f"{k} ({_f(g[0], '+.3f')} ± {_f(g[1])})" for k, g in gain.items() if g[0] > g[1]]
    below = [k for k, g in gain.items() if g[0] < -g[1]]
    sig = math.isfinite(g["diff_ci_seeds"]) and abs(g["diff"]) > g["diff_ci_seeds"]
    side = "higher" if g["diff"] > 0 else "lower"
    lines = [
        f"- Base model: judge {_f(summary['base'])} on the test probes. Best final judge: **{best}** "
        f"({_ci(m[best]['judge'])}). Judge gain over the base image of the same probe, beyond its 95% CI over "
        f"probes: {', '.join(above) or 'no method'}" + (f"; below base: {', '.join(below)}." if below else "."),
        f"- NCP-DPO ends {side} than latent DPO: {_f(ncp['judge'][0])} vs {_f(lat['judge'][0])}, difference "
        f"{_f(g['diff'], '+.3f')} (95% CI over seeds ± {_f(g['diff_ci_seeds'])}, "
        f"over probes ± {_f(g['diff_ci_probes'])}); "
        + ("the seed interval excludes zero." if sig else "not distinguishable at this number of seeds."),
    ]
    if not g["target_above_base"]:
        lines.append(
            f"- Latent DPO's final score ({_f(g['target'])}) is not above the base model's, so the time to reach it "
            "is not a measure of progress; the time criterion counts as not met."
        )
    elif g["time_ratio"] is None:
        lines.append(f"- NCP-DPO did not reach latent DPO's final score ({_f(g['target'])}) within the step budget.")
    else:
        lines.append(
            f"- NCP-DPO reached latent DPO's final score after {_f(ncp['reach_latent_dpo']['seconds'], '.0f')} s of "
            f"training, {_f(100 * g['time_ratio'], '.0f')}% of latent DPO's {_f(lat['train_s'], '.0f')} s."
        )
    lines.append(
        f"- One NCP-DPO step costs {_f(g['step_cost_ratio'], '.2f')}x a latent-DPO step here "
        f"({_f(ncp['step_s'], '.2f')} s vs {_f(lat['step_s'], '.2f')} s wall)."
    )
    verdict = "**met**" if g["met"] else "**not met**"
    lines.append(
        f"- Project goal (NCP-DPO reaches latent DPO's final score in at most half its wall time, and ends higher): "
        f"{verdict} (half time: {'yes' if g['half_time'] else 'no'}; "
        f"ends higher: {'yes' if g['ends_higher'] else 'no'}"
        f"{'' if sig or not g['ends_higher'] else ', within noise'})."
    )
    for a in summary["ablations"]:
        d = a["variant"] - a["baseline"]
        lines.append(
            f"- Ablation {a['name']}: {_f(a['variant'])} vs {_f(a['baseline'])} "
            f"({_f(d, '+.3f')}, {a['seeds']} seed(s)); "
            f"mean pixel change vs base {_f(a['variant_pix'])} vs {_f(a['baseline_pix'])}"
            + (f"; pairs {a['pairs'][0]} vs {a['pairs'][1]}" if a["pairs"][0] != a["pairs"][1] else "")
            + "."
        )
    return lines


def _model_name(source: str) -> str:
    """The model folder relative to the repository when it is inside it (no machine-specific absolute path)."""
    path = Path(source)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else source


def _step_note(step: int | None) -> str:
    return "" if step is None else f" (pretraining step {step})"


def _wall_line(state: dict[str, Any]) -> str:
    """The run's own wall time (all phases, summed over resumes) against the 90-minute budget of issue 7."""
    phases = state.get("phase_s") or {}
    if not phases:
        return ""
    total = sum(phases.values()) / 60
    parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in phases.items())
    verdict = "within" if total <= WALL_BUDGET_MIN else "OVER"
    return f"Whole benchmark: **{total:.1f} min** of wall time ({parts} min), {verdict} the {WALL_BUDGET_MIN}-minute budget."


def markdown(state: dict[str, Any], summary: dict[str, Any]) -> str:
    s, b, m = state["settings"], state["settings"]["budget"], summary["methods"]
    data = state.get("data", {})
    lines = [
        "## Alignment: NCP vs latent-space DPO, CPO and SFT (`bench/alignment.py`)",
        "",
        f"Mode **{s['mode']}**; model `{_model_name(s['source'])}`{_step_note(state.get('model_step'))}; "
        f"{data.get('loaded:all', {}).get('kept', '?')} training pairs (on-policy, judge-labelled, ties dropped) from "
        f"{b['train_prompts']} held-in prompts; LoRA rank 8 / alpha 8 on attention; batch {b['batch']} pairs, "
        f"{b['steps']} steps, {b['seeds']} seed(s) at the best setting; lr x beta grid ranked on {b['val_prompts']} "
        f"validation prompts. Test: {b['test_prompts']} probe prompts x {b['probe_seeds']} seed(s) "
        f"(PROBE_SEED, disjoint from training); held-out: {b['heldout_prompts']} prompts with held-out colour-shape "
        f"combinations. {state.get('threads')} torch thread(s), load average at the end "
        f"{_f((state.get('loadavg_at_end') or [math.nan])[0], '.1f')}. {_wall_line(state)} Rerun: `python bench/alignment.py"
        f"{'' if s['mode'] == 'full' else ' --' + s['mode']}`; raw numbers in `docs/benchmarks/alignment.json`.",
        "",
        "| method | lr | beta | final judge (95% CI) | win vs base | held-out judge | step s wall / cpu | peak MB "
        "| steps to latent-DPO final | wall s to latent-DPO final |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| base | | | {_f(summary['base'])} | 0.5 | {_f(summary['base_heldout'])} | | | | |",
    ]
    for name in ORDER:
        v = m[name]
        r = v["reach_latent_dpo"]
        lines.append(
            f"| {name} | {v['lr']:g} | {'-' if v['beta'] is None else format(v['beta'], 'g')} | {_ci(v['judge'])} | "
            f"{_ci(v['win_rate'])} | {_ci(v['heldout'])} | {_f(v['step_s'], '.2f')} / {_f(v['step_cpu_s'], '.2f')} | "
            f"{_f(v['peak_mem_mb'], '.0f')} | "
            f"{'-' if r is None else _f(r['step'], '.0f')} | {'-' if r is None else _f(r['seconds'], '.0f')} |"
        )
    attrs = list(summary["base_accuracy"])
    lines += ["", "Per-attribute accuracy at the last step (share of test images whose hard decision is right):", "",
              "| method | " + " | ".join(attrs) + " | all |", "|---" * (len(attrs) + 2) + "|",
              "| base | " + " | ".join(_f(summary["base_accuracy"][a], ".2f") for a in attrs) + " | |"]  # fmt: skip
    for name in ORDER:
        acc = m[name]["accuracy"]
        lines.append(
            f"| {name} | "
            + " | ".join(_f(acc.get(a), ".2f") for a in attrs)
            + f" | {_f(m[name]['all_correct'], '.2f')} |"
        )
    lines += ["", "![judge vs steps](alignment_steps.png) ![judge vs wall time](alignment_time.png)", "",
              "**Conclusion (generated from the numbers above).**", "", *conclusion(summary)]  # fmt: skip
    return "\n".join(lines)


def plots(summary: dict[str, Any], steps_png: Path, time_png: Path) -> None:
    """Judge score (seed mean, 95% band) against training steps and against training wall time, every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path, x_key, label in (
        (steps_png, "step", "optimizer steps"),
        (time_png, "seconds", "training wall time (s)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in ORDER:  # colour = objective, line style = space
            colour = {"dpo": "tab:blue", "cpo": "tab:green", "sft": "tab:purple"}[name.split("-")[1]]
            curve = summary["methods"][name]["curve"]
            x = np.array([p[x_key] for p in curve])
            y = np.array([p["judge"] for p in curve])
            ci = np.nan_to_num(np.array([p["ci"] for p in curve]))
            style = "-" if name.startswith("ncp") else "--"
            ax.plot(x, y, style, color=colour, marker="o", ms=3, label=name)
            ax.fill_between(x, y - ci, y + ci, color=colour, alpha=0.1)
        ax.axhline(summary["goal"]["target"], color="gray", lw=0.8, ls=":", label="latent-dpo final")
        ax.set_xlabel(label)
        ax.set_ylabel("judge overall (test probes)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    state = json.loads(Path(sys.argv[1]).read_text())
    print(markdown(state, state["summary"]))
