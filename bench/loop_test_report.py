"""The out-of-the-box loop's report (`python -m bench.loop` with its defaults): every served version measured on the
test probes (prompts and seeds nothing selected on), as gain vs votes and vs minutes, the share of the base-to-ceiling
gap closed, per-attribute shares, round times, and the null arm (coin-flip labels) beside it.

    python -m bench.loop --render docs/benchmarks/loop_default.json    # rewrite section `loop-default` and its plot
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.loop_report import LEGACY_CONFIG, gate_text, rerun_flags  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GAIN_GOAL, GAIN_VOTES, GAIN_S = 0.10, 2000, 1800.0  # +0.10 on the test probes within 2,000 votes and 30 min
GAP_GOAL, GAP_VOTES = 0.5, 6000  # half the base-to-ceiling gap within 6,000 votes
ROUND_GOAL_S, NULL_BAND = 300.0, 0.02  # every round <= 5 min; the null arm's gain within +-0.02


def served_curve(result: dict) -> list[dict]:
    """The served version after each promotion, with its test-probe gain: [{version, votes, minutes, gain, lo, hi}],
    starting with the base at 0 votes. A version's gain is measured once, on the test probes, after the run."""
    test = result["test"]
    points = [{"version": "base", "votes": 0, "minutes": 0.0, "gain": 0.0, "lo": 0.0, "hi": 0.0}]
    for r in result["rounds"]:
        row = test["versions"].get(r["version"] or "")
        if r["status"] == "promoted" and row is not None:
            lo, hi = row["judge_gain_boot95"]
            points.append({"version": r["version"], "votes": r["votes"], "minutes": r["finished_at_s"] / 60,
                           "gain": row["judge_gain_vs_base"], "lo": lo, "hi": hi})  # fmt: skip
    return points


def served_at(result: dict, votes: float, seconds: float = float("inf")) -> dict:
    """The version served when the arena had `votes` votes (and no later than `seconds`)."""
    return [p for p in served_curve(result) if p["votes"] <= votes and p["minutes"] * 60 <= seconds][-1]


def gap(result: dict) -> float | None:
    t = result["test"]
    return None if t.get("ceiling") is None else t["ceiling"] - t["base_judge"]


def goal_lines(result: dict, null: dict | None) -> list[str]:
    times = [r["round_s"] for r in result["rounds"] if r.get("round_s")]
    early, late, g = served_at(result, GAIN_VOTES, GAIN_S), served_at(result, GAP_VOTES), gap(result)
    met_gain = early["gain"] >= GAIN_GOAL and early["lo"] > 0
    lines = [
        "**Goals (generated, on the test probes).**",
        f"- Gain >= {GAIN_GOAL:+.2f} (bootstrap 95% lower bound > 0) within {GAIN_VOTES} votes and "
        f"{GAIN_S / 60:.0f} min: {'met' if met_gain else 'not met'} ({early['version']}: {early['gain']:+.3f}, "
        f"95% {early['lo']:+.3f}..{early['hi']:+.3f}).",
    ]
    if g:
        share = late["gain"] / g
        lines.append(f"- At least {GAP_GOAL:.0%} of the base-to-ceiling gap ({g:.3f}) closed within {GAP_VOTES} votes: "
                     f"{'met' if share >= GAP_GOAL else 'not met'} ({late['version']} closes {share:.0%}).")  # fmt: skip
    lines.append(f"- Every round <= {ROUND_GOAL_S / 60:.0f} min: "
                 + ("met" if times and max(times) <= ROUND_GOAL_S else "not met")
                 + (f" (longest {max(times):.0f} s, {len(times)} rounds)." if times else "."))  # fmt: skip
    if null is not None and not same_base(result, null):
        lines.append(f"- Null arm (coin-flip labels) within ±{NULL_BAND}: not yet run on this base (the last null run "
                     f"measured a base scoring {null['test']['base_judge']:.3f} on the test probes).")  # fmt: skip
    elif null is not None and gate_of(null) != gate_of(result):
        lines.append(f"- Null arm (coin-flip labels) within ±{NULL_BAND}: not yet run with this gate (the last null "
                     f"run, gate `{gate_of(null)}`, served {served_curve(null)[-1]['gain']:+.3f}).")  # fmt: skip
    elif null is not None:
        n = served_curve(null)[-1]
        ok = abs(n["gain"]) <= NULL_BAND
        lines.append(f"- Null arm (coin-flip labels) within ±{NULL_BAND}: {'met' if ok else 'not met'} "
                     f"(served {n['version']}: {n['gain']:+.3f}, 95% {n['lo']:+.3f}..{n['hi']:+.3f}; "
                     f"{null['raters'].get('votes', 0)} votes in {null['wall_s'] / 60:.0f} min, "
                     f"{sum(r['status'] == 'promoted' for r in null['rounds'])} of {len(null['rounds'])} rounds "
                     "promoted by the gate on noise).")  # fmt: skip
    return lines


def gate_of(result: dict) -> str:
    """The promotion rule a run used (bench.loop --gate; runs before the flag promoted on the judge)."""
    return (LEGACY_CONFIG | result["config"])["gate"]


def same_base(a: dict, b: dict) -> bool:
    """Two runs on the same base: its score on the fixed test probes and seeds is deterministic, so it names the base
    where a path cannot (a rebuilt default base keeps its folder name)."""
    return abs(a["test"]["base_judge"] - b["test"]["base_judge"]) < 1e-4  # CPU kernels differ in the last digits


def attribute_line(result: dict) -> str:
    t = result["test"]
    last = served_curve(result)[-1]
    after = t["versions"].get(last["version"], {}).get("attributes") or t.get("base_attributes") or {}
    before, top = t.get("base_attributes") or {}, t.get("ceiling_attributes") or {}
    cells = [f"{a} {before[a]:.2f} -> {after.get(a, float('nan')):.2f}" + (f" (ceiling {top[a]:.2f})" if a in top else "")
             for a in before]  # fmt: skip
    return (
        f"- Per attribute, share of test images the judge decides right, base -> {last['version']}: "
        + ", ".join(cells)
        + "."
    )


def space_name(config: dict) -> str:
    """The method a run's rounds trained with, in words (runs before `--space` existed trained NCP-DPO)."""
    return "latent DPO" if config.get("space", "ncp") == "latent" else "NCP-DPO"


def run_row(name: str, result: dict) -> str:
    """One run of the command: what it served at 2,000 votes / 30 min and at 6,000 votes, rounds, the longest."""
    early, late, g = served_at(result, GAIN_VOTES, GAIN_S), served_at(result, GAP_VOTES), gap(result)
    times = [r["round_s"] for r in result["rounds"] if r.get("round_s")]
    return (
        f"| {name} | {result['raters'].get('votes', 0)} in {result['wall_s'] / 60:.0f} min | {early['version']} "
        f"{early['gain']:+.3f} ({early['lo']:+.3f}..{early['hi']:+.3f}) | {late['version']} {late['gain']:+.3f}"
        + (f" ({late['gain'] / g:.0%})" if g else "")
        + f" | {sum(r['status'] == 'promoted' for r in result['rounds'])} of {len(result['rounds'])} | "
        + (f"{max(times):.0f} s |" if times else " |")
    )


def runs_lines(result: dict, others: list[tuple[str, dict]]) -> list[str]:
    """Every run of the same command on the same base, the one shown first, with the goals counted over all."""
    same = [(n, r) for n, r in others if same_base(result, r) and gate_of(r) == gate_of(result)]
    if not same:
        return []
    runs = [("shown above", result), *same]
    met = sum((e := served_at(r, GAIN_VOTES, GAIN_S))["gain"] >= GAIN_GOAL and e["lo"] > 0 for _, r in runs)
    return [
        "",
        f"**Every run of this command ({len(runs)}).** Served gain on the test probes at {GAIN_VOTES} votes / "
        f"{GAIN_S / 60:.0f} min and at {GAP_VOTES} votes (share of the gap); +{GAIN_GOAL:.2f} with its lower bound "
        f"above 0 within {GAIN_VOTES} votes in {met} of {len(runs)} runs.",
        "",
        f"| run | votes | served at {GAIN_VOTES} votes (95% CI) | served at {GAP_VOTES} votes | promoted rounds "
        "| longest round |",
        "|---|---|---|---|---|---|",
        *[run_row(n, r) for n, r in runs],
    ]


def markdown(
    result: dict, null: dict | None = None, stem: str = "loop_default", others: list[tuple[str, dict]] = ()
) -> str:
    t, c = result["test"], result["config"]
    method = space_name(c)
    model = Path(c["model"])
    model = model.relative_to(ROOT) if model.is_absolute() and model.is_relative_to(ROOT) else model
    model = Path("models") / model.name if model.is_absolute() and model.parent.name == "models" else model
    lines = [
        "## The out-of-the-box loop (`python -m bench.loop`)"
        + ("" if method == "NCP-DPO" else f": the latent DPO arm (`--space latent`, beta {c['beta']:g})"),
        "",
        f"The app on the default base (`{model}`), {c['raters']} simulated raters over HTTP, "
        f"{result['raters'].get('votes', 0)} votes in {result['wall_s'] / 60:.1f} min on this 2-core CPU; rounds of "
        f"{c['max_steps']} {method} steps every {c['train_every']:g} s once {c['min_new_votes']} new votes are in. "
        f"Every promoted version is measured after the run on the **test probes**: {t['probes']} prompts x "
        f"{t['seeds']} seeds (from {t['seed_offset']}) that the gate, the raters and training never saw, so nothing "
        "below was selected on. Intervals: 95% bootstrap over prompts (a prompt's images are one cluster). The gate's "
        "own probe score is a running maximum and is not the result."
        + gate_text(LEGACY_CONFIG | c)
        + data_text(result)
        + (
            f" Ran with settings since changed; rerun: `python -m bench.loop{flags}`."
            if (flags := rerun_flags(c))
            else ""
        ),
        "",
        f"Base {t['base_judge']:.3f}"
        + (f", ceiling {t['ceiling']:.3f} (gap {gap(result):.3f})" if gap(result) else "")
        + " on the test probes.",
        "",
        "| served version | promoted at (min) | votes | test gain (95% CI) | gap closed |",
        "|---|---|---|---|---|",
    ]
    for p in served_curve(result)[1:]:
        share = f"{p['gain'] / gap(result):.0%}" if gap(result) else ""
        lines.append(f"| {p['version']} | {p['minutes']:.1f} | {p['votes']} | {p['gain']:+.3f} "
                     f"({p['lo']:+.3f}..{p['hi']:+.3f}) | {share} |")  # fmt: skip
    times = [r["round_s"] for r in result["rounds"] if r.get("round_s")]
    if times:
        lines += ["", f"Rounds: {len(times)}, {sum(r['status'] == 'promoted' for r in result['rounds'])} promoted, "
                      f"{min(times):.0f}-{max(times):.0f} s each."]  # fmt: skip
    lines += ["", f"![loop-default]({stem}.png)", "", *goal_lines(result, null), attribute_line(result)]
    lines += runs_lines(result, list(others))
    return "\n".join(lines)


def data_text(result: dict) -> str:
    """What the votes held: a pair shown to several raters is several votes but one comparison (the raters share one
    judge, so their ratings of a pair agree), docs/research/votes-vs-pairs.md."""
    overflow = (LEGACY_CONFIG | result["config"])["overflow"]
    text = (" A pair went to up to 6 raters (the arena's overflow showings: the bots outpaced the generator)."
            if overflow else " Raters waited for fresh pairs: a pair went to at most 3 of them (`--no-overflow`).")  # fmt: skip
    marks = [b for b in result.get("data_budget", []) if b["votes"] in (GAIN_VOTES, GAP_VOTES)]
    if marks:
        text += (
            " The votes held "
            + ", ".join(
                f"{b['distinct_pairs']:,} distinct image pairs of {b['prompts']} prompts at {b['votes']:,}"
                for b in marks
            )
            + " votes."
        )
    return text


def step_xy(res: dict, key: str = "votes") -> tuple[list[dict], list[float], list[float]]:
    """A run's served-gain staircase against votes or minutes, held to the run's end: (points, xs, ys)."""
    pts = served_curve(res)
    end = {"votes": res["raters"].get("votes", pts[-1]["votes"]), "minutes": res["wall_s"] / 60}
    return pts, [p[key] for p in pts] + [max(end[key], pts[-1][key])], [p["gain"] for p in pts] + [pts[-1]["gain"]]


def plot(result: dict, null: dict | None, path: Path, others: list[dict] = ()) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for res, name, color in (
        (result, f"{space_name(result['config'])} loop", "C0"),
        *[(r, "other runs of the command" if i == 0 else None, "C2") for i, r in enumerate(others)],
        (null, "null arm (coin-flip labels)", "C3"),
    ):
        if res is None:
            continue
        for ax, key in zip(axes, ("votes", "minutes"), strict=True):
            pts, xs, ys = step_xy(res, key)
            ax.step(xs, ys, where="post", color=color, label=name)
            ax.fill_between(xs, [p["lo"] for p in pts] + [pts[-1]["lo"]], [p["hi"] for p in pts] + [pts[-1]["hi"]],
                            step="post", color=color, alpha=0.15)  # fmt: skip
    g = gap(result)
    for ax, key, label in zip(axes, ("votes", "minutes"), ("votes cast", "wall time (min)"), strict=True):
        ax.axhline(0, color="gray", lw=0.8)
        ax.axhline(GAIN_GOAL, color="gray", ls=":", label=f"goal {GAIN_GOAL:+.2f}")
        if g:
            ax.axhline(g, color="k", ls="--", label="ceiling (clean captions)")
        ax.set(xlabel=label, ylabel="served gain vs base, test probes", title=f"Gain vs {key}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(result: dict, stem: str = "loop_default") -> None:
    from bench.docs import write_section

    null_path = ROOT / "docs" / "benchmarks" / f"{stem}_null.json"
    null = json.loads(null_path.read_text()) if null_path.exists() else None
    others = [(p.stem.rsplit("_", 1)[-1], json.loads(p.read_text()))
              for p in sorted((ROOT / "docs" / "benchmarks").glob(f"{stem}_replicate*.json"))]  # fmt: skip
    plot(result, null if null is not None and same_base(result, null) else None, ROOT / "docs" / f"{stem}.png",
         [r for _, r in others if same_base(result, r)])  # fmt: skip
    write_section(ROOT / "docs" / "BENCHMARKS.md", stem.replace("_", "-"), markdown(result, null, stem, others))
