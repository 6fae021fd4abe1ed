"""The live loop's two arms side by side: every run of the default command (`python -m bench.loop`, NCP-DPO rounds) and
of its latent arm (`python -m bench.loop --space latent`, latent Diffusion-DPO rounds, everything else identical), on
one gain-vs-votes plot, with the verdict a reviewer can quote. Written as section `loop-arms` of docs/BENCHMARKS.md
whenever either arm publishes, once both have runs on the same base:

    python -m bench.loop --render docs/benchmarks/loop_default_latent.json    # rewrite this section and its plot

A run's gains are its served versions on the test probes (prompts and seeds nothing selected on). The spread that
matters between arms is the one between runs of the same command (a round's gain moves by about 0.09 between draws of
its votes, docs/research/loop-plateau.md), so the arms are compared over runs, not over probe prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.loop_report import replicates  # noqa: E402
from bench.loop_test_report import GAIN_VOTES, GAP_VOTES, gap, gate_of, same_base, served_at, step_xy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"NCP-DPO": "loop_default", "latent DPO": "loop_default_latent"}
# two-sided 95% Student t quantiles by degrees of freedom (Welch's df, rounded down: the wider interval)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def runs_of(stem: str, bench_dir: Path) -> list[dict]:
    """The shown run of a stem and its replicates (STEM.json, STEM_replicateN.json), on the shown run's base and gate."""
    main = bench_dir / f"{stem}.json"
    if not main.exists():
        return []
    shown = json.loads(main.read_text())
    others = [r for _, r in replicates(stem, bench_dir)]
    return [shown, *[r for r in others if same_base(shown, r) and gate_of(r) == gate_of(shown)]]


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its 95% Welch interval over runs -> (delta, low, high); nan bounds with < 2 runs a side."""
    d = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return d, math.nan, math.nan
    va, vb = (sum((x - sum(v) / len(v)) ** 2 for x in v) / (len(v) - 1) / len(v) for v in (a, b))
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = T975.get(max(1, math.floor(df)), 1.96 if df > 30 else 2.1)  # df 11-30: 2.2-2.04, 2.1 errs wide
    return d, d - t * se, d + t * se


def arm_row(name: str, runs: list[dict]) -> dict:
    """Per arm: served gain at 2,000 and 6,000 votes in each run, per 1k votes and per minute of the run."""
    early = [served_at(r, GAIN_VOTES)["gain"] for r in runs]
    late = [served_at(r, GAP_VOTES)["gain"] for r in runs]
    minutes = [r["wall_s"] / 60 for r in runs]
    times = [x["round_s"] for r in runs for x in r["rounds"] if x.get("round_s")]
    return {
        "arm": name, "runs": len(runs), "early": early, "late": late,
        "per_kvote": sum(g / (GAP_VOTES / 1000) for g in late) / len(runs),
        "per_min": sum(g / m for g, m in zip(late, minutes, strict=True)) / len(runs),
        "promoted": sum(x["status"] == "promoted" for r in runs for x in r["rounds"]),
        "rounds": sum(len(r["rounds"]) for r in runs), "round_s": sum(times) / len(times) if times else math.nan,
    }  # fmt: skip


def attribute_closed(runs: list[dict]) -> dict[str, float]:
    """Mean over runs of the share of each attribute's base-to-ceiling gap that the version served at 6,000 votes
    closed (attributes the ceiling beats the base on by less than 0.10 are left out: too small a gap to share)."""
    shares: dict[str, list[float]] = {}
    for r in runs:
        t = r["test"]
        base, top = t.get("base_attributes") or {}, t.get("ceiling_attributes") or {}
        served = t["versions"].get(served_at(r, GAP_VOTES)["version"], {}).get("attributes") or base
        for a in base:
            if a in top and top[a] - base[a] >= 0.10:
                shares.setdefault(a, []).append((served.get(a, base[a]) - base[a]) / (top[a] - base[a]))
    return {a: sum(v) / len(v) for a, v in shares.items()}


def _cells(values: list[float]) -> str:
    return f"{sum(values) / len(values):+.3f} ({', '.join(f'{v:+.3f}' for v in values)})"


def verdict(rows: list[dict], gap_: float | None) -> str:
    """One sentence: which arm's loop served more at 6,000 votes, by how much, with its interval over runs."""
    (a, b) = rows
    d, lo, hi = welch(a["late"], b["late"])
    if math.isnan(lo):
        sure = "too few runs for an interval"
    elif lo > 0 or hi < 0:
        sure = "beyond the spread between runs"
    else:
        sure = "within the spread between runs: no reliable difference"
    lead, other = (a, b) if d >= 0 else (b, a)
    ncp, lat = (a, b) if a["arm"] == "NCP-DPO" else (b, a)
    cost = ncp["round_s"] / lat["round_s"]
    if not math.isnan(lo) and (lo > 0 or hi < 0):
        meaning = (f"NCP's perceptual space {'helps' if lead is ncp else 'hurts'} the live loop here, at {cost:.1f}x "
                   "the round time")  # fmt: skip
    else:
        meaning = (f"NCP's perceptual space gives the live loop no measurable edge here, at {cost:.1f}x the round "
                   "time, so the paper's better-model-for-less-compute claim is not seen in this world's loop")  # fmt: skip
    share = f", {abs(d) / gap_:.0%} of the base-to-ceiling gap" if gap_ else ""
    return (
        f"**Verdict:** in the live loop, {lead['arm']} served {abs(d):.3f} more than {other['arm']} at {GAP_VOTES} "
        f"votes (mean of {a['runs']} and {b['runs']} runs; {a['arm']} minus {b['arm']} {d:+.3f}, 95% Welch interval "
        f"over runs {lo:+.3f}..{hi:+.3f}{share}), {sure}; per 1,000 votes {a['per_kvote']:+.3f} vs "
        f"{b['per_kvote']:+.3f}, per minute of the run {a['per_min']:+.4f} vs {b['per_min']:+.4f}: {meaning}."
    )


def markdown(arms: dict[str, list[dict]]) -> str:
    rows = [arm_row(name, runs) for name, runs in arms.items()]
    first = next(iter(arms.values()))[0]
    return "\n".join([
        "## The live loop's two arms: NCP-DPO vs latent DPO rounds (`python -m bench.loop [--space latent]`)",
        "",
        "Every run of the default command and of its latent arm (everything but the rounds' space and its beta "
        f"identical), on the default base (test probes: base {first['test']['base_judge']:.3f}"
        + (f", gap to the ceiling {gap(first):.3f}" if gap(first) else "")
        + "). Gains are the served version's on the test probes at that many votes; the arms are compared over "
        "runs, whose spread is larger than any one run's interval over prompts. Rerun each arm's runs with "
        "`python -m bench.loop [--space latent] [--replicate N]`.",
        "",
        f"| arm | runs | served at {GAIN_VOTES} votes: mean (each run) | served at {GAP_VOTES} votes: mean (each run) "
        "| promoted rounds | mean round |",
        "|---|---|---|---|---|---|",
        *[f"| {r['arm']} | {r['runs']} | {_cells(r['early'])} | {_cells(r['late'])} | {r['promoted']} of "
          f"{r['rounds']} | {r['round_s']:.0f} s |" for r in rows],  # fmt: skip
        "",
        *attribute_lines(arms),
        "",
        "![loop-arms](loop_arms.png)",
        "",
        verdict(rows, gap(first)),
    ])  # fmt: skip


def attribute_lines(arms: dict[str, list[dict]]) -> list[str]:
    """Which words the rounds teach: per arm, the mean share of each attribute's gap closed at 6,000 votes, with the
    base's and the ceiling's accuracy (an attribute the base half-follows against one it ignores)."""
    closed = {name: attribute_closed(runs) for name, runs in arms.items()}
    names = list(dict.fromkeys(a for c in closed.values() for a in c))
    if not names:
        return []
    t = next(iter(arms.values()))[0]["test"]
    head = [f"{a} ({t['base_attributes'][a]:.2f} -> {t['ceiling_attributes'][a]:.2f})" for a in names]
    return [
        f"Share of each attribute's base-to-ceiling gap closed by the version served at {GAP_VOTES} votes (mean over "
        "runs; the heading gives the base's and the ceiling's share of test images right):",
        "",
        "| arm | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(names),
        *[
            f"| {arm} | " + " | ".join(f"{c[a]:.0%}" if a in c else "" for a in names) + " |"
            for arm, c in closed.items()
        ],
    ]


def plot(arms: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(arms.items(), ("C0", "C1"), strict=True):
        for i, res in enumerate(runs):
            _, xs, ys = step_xy(res)
            ax.step(xs, ys, where="post", color=color, alpha=0.9 if i == 0 else 0.55, label=name if i == 0 else None)
    g = gap(next(iter(arms.values()))[0])
    ax.axhline(0, color="gray", lw=0.8)
    if g:
        ax.axhline(g, color="k", ls="--", label="ceiling (clean captions)")
    ax.set(xlabel="votes cast", ylabel="served gain vs base, test probes", title="Live loop: gain vs votes, every run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(bench_dir: Path = ROOT / "docs" / "benchmarks", docs: Path = ROOT / "docs") -> bool:
    """Rewrite section `loop-arms` and docs/loop_arms.png once both arms have runs on the same base. -> written?"""
    from bench.docs import write_section

    arms = {name: runs_of(stem, bench_dir) for name, stem in ARMS.items()}
    if not all(arms.values()) or not same_base(arms["NCP-DPO"][0], arms["latent DPO"][0]):
        return False
    plot(arms, docs / "loop_arms.png")
    write_section(docs / "BENCHMARKS.md", "loop-arms", markdown(arms))
    return True
