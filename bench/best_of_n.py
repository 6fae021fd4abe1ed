"""How much judge score do a model's own samples hold? Best-of-n and the KL-regularised optimum on the loop's probes.

    python bench/best_of_n.py                                            # models/shapes-base, 48 probes x 32 seeds
    python bench/best_of_n.py --model models/shapes-base --model runs/shapes-headroom --out r.json
    python bench/best_of_n.py --render r.json                            # rewrite the doc section from the JSON

Preference optimisation learns from pairs of the model's own samples. DPO's objective (Rafailov et al. 2023, eq. 3) is
the KL-regularised reward maximisation whose optimum is the reference reweighted by the reward,
`pi*(x|c) = pi_ref(x|c) exp(r(x, c) / beta) / Z(c)` (their eq. 4; Diffusion-DPO eq. 7 carries it over to diffusion).
So on the samples a model already makes, this script measures the most any such method can gain for a given distance
from the base, with the pixel judge as the reward r:

- best-of-k: the expected judge score of the best of k samples (unbiased from n >= k samples per prompt, order
  statistics), a policy whose KL from the base is at most `log k - (k - 1) / k` nats (Beirami et al. 2024,
  arXiv 2401.01879);
- the exponential tilt `w_i ~ exp(s_i / tau)` over each prompt's n samples: its mean score and KL
  `sum_i w_i log(n w_i)`, for tau from flat to greedy; the empirical reward-KL frontier of eq. 4 (capped at log n);
- per attribute: accuracy, the pair signal (chance that two samples of one prompt differ in that attribute's hard
  decision: only such pairs can teach it) and the share of prompts where none of the n samples gets it right.

Samples use the loop's probe prompts (`ncp.evaluate.PROBE_SEED`, 30% two-object) and the shipped sampler; image i of
seed s uses the generator seed `s * 100003 + i`, as the loop's judge gate does, so k = 1 is the loop's base score.
Writes docs/benchmarks/best_of_n.json, docs/best_of_n.png and the `best-of-n` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

from bench.docs import repo_path, write_section  # noqa: E402
from ncp.shapes.judge import ATTRIBUTE_WEIGHT  # noqa: E402 - overall = 0.8 * mean attribute score + 0.2 * cleanliness

GOAL = 0.10  # the live loop's goal (judge gain over the base on the probe set)
KS = (1, 2, 4, 8, 16, 32, 64)
TAUS = tuple(float(t) for t in np.geomspace(1.0, 0.002, 24))


def sample_scores(model: str, prompts: int, n: int, batch: int) -> dict:
    """Judge every (probe prompt, seed) image of `model`: overall scores (P, n) and hard decisions (P, n, attributes)."""
    import torch

    from bench.shapes_base import generate
    from ncp.evaluate import PROBE_SEED
    from ncp.pipelines import load_pipeline
    from ncp.shapes.grammar import probe_prompts
    from ncp.shapes.judge import ATTRIBUTES, score
    from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    torch.set_num_threads(1)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    probes = probe_prompts(prompts, seed=PROBE_SEED, two_object_prob=0.3)
    overall = np.zeros((prompts, n))
    correct = np.zeros((prompts, n, len(ATTRIBUTES)), dtype=bool)
    graded = np.zeros((prompts, n, len(ATTRIBUTES)))
    t0 = time.perf_counter()
    for seed in range(n):
        images = generate(pipe, probes, seed, batch, DEFAULT_STEPS, DEFAULT_GUIDANCE)
        for i, (img, p) in enumerate(zip(images, probes, strict=True)):
            s = score(img, p)
            overall[i, seed] = s.overall
            correct[i, seed] = [s.attributes_correct[a] for a in ATTRIBUTES]
            graded[i, seed] = [getattr(s, a) for a in ATTRIBUTES]
        print(f"{model}: seed {seed + 1}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {
        "model": model,
        "prompts": probes,
        "attributes": list(ATTRIBUTES),
        "overall": overall.tolist(),
        "correct": correct.astype(int).tolist(),
        "graded": graded.round(5).tolist(),
        "sampler": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE},
        "seconds": time.perf_counter() - t0,
    }


def best_of_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Per prompt, E[max of k samples drawn without replacement from the n observed]: sum_i C(i-1, k-1)/C(n, k) s_(i)."""
    n = scores.shape[1]
    s = np.sort(scores, axis=1)  # ascending
    w = np.array([math.comb(i - 1, k - 1) for i in range(1, n + 1)], dtype=float) / math.comb(n, k)
    return s @ w


def tilt_weights(reward: np.ndarray, tau: float) -> np.ndarray:
    """Per prompt, the weights exp(reward / tau) / Z over its n samples (rows sum to 1)."""
    w = np.exp((reward - reward.max(axis=1, keepdims=True)) / tau)
    return w / w.sum(axis=1, keepdims=True)


def tilt(scores: np.ndarray, tau: float, reward: np.ndarray | None = None) -> tuple[float, float]:
    """Mean judge score and mean KL (nats) from the base of the exponential tilt exp(reward / tau) of each prompt's
    samples (reward = the judge score unless given)."""
    w = tilt_weights(scores if reward is None else reward, tau)
    n = scores.shape[1]
    kl = np.sum(np.where(w > 0, w * np.log(np.maximum(w * n, 1e-300)), 0.0), axis=1)
    return float(np.mean(np.sum(w * scores, axis=1))), float(np.mean(kl))


def frontier_of(scores: np.ndarray, reward: np.ndarray | None = None) -> list[dict]:
    base = float(scores.mean())
    out = [dict(zip(("judge", "kl"), tilt(scores, t, reward), strict=True), tau=t) for t in TAUS]
    return [f | {"gain": f["judge"] - base} for f in out]


def ci95(x: np.ndarray) -> float:
    return float(1.96 * np.std(x, ddof=1) / math.sqrt(len(x)))


def analyse(raw: dict) -> dict:
    scores = np.asarray(raw["overall"])
    correct = np.asarray(raw["correct"], dtype=float)  # (P, n, A)
    p, n = scores.shape
    base = scores.mean(axis=1)
    bon = []
    for k in (k for k in KS if k <= n):
        gain = best_of_k(scores, k) - base
        bon.append({"k": k, "judge": float(base.mean() + gain.mean()), "gain": float(gain.mean()),
                    "ci": ci95(gain), "kl_bound": math.log(k) - (k - 1) / k})  # fmt: skip
    frontier = frontier_of(scores)
    reach = next((f for f in frontier if f["gain"] >= GOAL), None)
    at_goal = tilt_weights(scores, reach["tau"] if reach else TAUS[-1])  # (P, n): the tilt that reaches the goal
    q = correct.mean(axis=1)  # (P, A): share of a prompt's samples right on each attribute
    attributes = {
        a: {
            "accuracy": float(q[:, j].mean()),
            "pair_signal": float(np.mean(2 * q[:, j] * (1 - q[:, j]) * n / (n - 1))),
            "never_right": float(np.mean(q[:, j] == 0)),
            "best_of_n_accuracy": float(np.mean(q[:, j] > 0)),
            "accuracy_at_goal": float(np.mean(np.sum(at_goal * correct[:, :, j], axis=1))),
        }
        for j, a in enumerate(raw["attributes"])
    }
    blind = None
    if "graded" in raw and "position" in raw["attributes"]:
        # The same tilt with a reward that ignores position (the judge minus its position term), scored by the full
        # judge: what the samples hold for a model that never learns position (pretraining does not teach it either).
        position = np.asarray(raw["graded"])[:, :, raw["attributes"].index("position")]
        blind = frontier_of(scores, scores - ATTRIBUTE_WEIGHT / len(raw["attributes"]) * position)
    blind_reach = None if blind is None else next((f for f in blind if f["gain"] >= GOAL), None)
    return {
        "model": raw["model"], "prompts": p, "n": n, "base": float(base.mean()), "base_ci": ci95(base),
        "best_of_k": bon, "frontier": frontier, "attributes": attributes,
        "goal_kl": None if reach is None else reach["kl"], "seconds": raw["seconds"],
        "position_blind_frontier": blind, "position_blind_goal_kl": None if blind_reach is None else blind_reach["kl"],
    }  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        label = Path(r["model"]).name
        ks = [b["k"] for b in r["best_of_k"]]
        ax1.errorbar(ks, [b["gain"] for b in r["best_of_k"]], yerr=[b["ci"] for b in r["best_of_k"]],
                     marker="o", capsize=3, label=label)  # fmt: skip
        line = ax2.plot([f["kl"] for f in r["frontier"]], [f["gain"] for f in r["frontier"]], marker=".", label=label)
        if r.get("position_blind_frontier"):
            blind = r["position_blind_frontier"]
            ax2.plot([f["kl"] for f in blind], [f["gain"] for f in blind], ls=":", color=line[0].get_color(),
                     label=f"{label}, reward without position")  # fmt: skip
    for ax in (ax1, ax2):
        ax.axhline(GOAL, color="red", ls="--", lw=1, label="loop goal +0.10")
        ax.set_ylabel("judge gain over the base")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("k (best of k own samples)")
    ax1.set_title("best-of-k")
    ax2.set_xlabel("KL from the base (nats), exponential tilt of n samples")
    ax2.set_title("reward-KL frontier (DPO optimum, eq. 4)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_best(docs: Path, model: str) -> float | None:
    """The best validation gain an alignment sweep published in docs/benchmarks measured on this model, if any."""

    def key(path: str) -> tuple[str, ...]:  # "models/shapes-base" wherever the checkout that ran the sweep lay
        return Path(repo_path(path)).parts[-2:]

    for f in sorted((docs / "benchmarks").glob("alignment_sweep*.json")):
        d = json.loads(f.read_text())
        if key(d["settings"]["model"]) == key(model) and d["runs"]:
            return max(judge for r in d["runs"].values() for _, judge in r["curve"]) - d["base_val"]["judge"]
    return None


def kl_for_gain(result: dict, gain: float) -> float:
    """KL (nats) at which the tilt frontier reaches `gain` (linear interpolation; the frontier rises with KL)."""
    gains = [0.0] + [f["gain"] for f in result["frontier"]]
    return float(np.interp(gain, gains, [0.0] + [f["kl"] for f in result["frontier"]]))


def recipe_position(docs: Path) -> str | None:
    """Position accuracy range over the pretraining recipes of bench/shapes_recipe.py (direct supervision)."""
    f = docs / "benchmarks" / "shapes_recipe.json"
    if not f.is_file():
        return None
    acc = [
        j["held_in"]["position"] for v in json.loads(f.read_text())["variants"].values() for j in v["judge"].values()
    ]
    return f"{min(acc):.2f}-{max(acc):.2f}" if acc else None


def conclusion(r: dict, docs: Path) -> str:
    """One generated bullet per model: what its samples hold, what needs position, what training captured."""
    top, pos = r["best_of_k"][-1], r["attributes"].get("position")
    out = [f"- `{r['model']}`: the best of {top['k']} own samples is {top['gain']:+.3f} above the base, and the "
           + ("reweighting never reaches +0.10." if r["goal_kl"] is None
              else f"reweighting reaches +0.10 at {r['goal_kl']:.2f} nats from the base.")]  # fmt: skip
    if pos is not None:
        out.append(f"Position is its weakest attribute (accuracy {pos['accuracy']:.2f}, {pos['accuracy_at_goal']:.2f} "
                   f"under that tilt); two samples differ in it in {pos['pair_signal']:.0%} of pairs, so the pairs "
                   "carry the signal.")  # fmt: skip
        recipe = recipe_position(docs)
        if recipe:
            out.append(f"But no pretraining recipe taught position from renders either ({recipe} in "
                       "the recipe ablation): the UNet's attention has no positional encoding, only what its convolutions' "
                       "padding conveys.")  # fmt: skip
    if r.get("position_blind_frontier") is not None:
        kl, top_blind = r["position_blind_goal_kl"], max(f["gain"] for f in r["position_blind_frontier"])
        out.append(
            f"With a reward that ignores position, the reweighting tops out at {top_blind:+.3f} (greedy over "
            f"{r['n']} samples)" + ("." if kl is None else f" and reaches +0.10 at {kl:.2f} nats.")
        )
    sweep = sweep_best(docs, r["model"])
    if sweep is not None:
        out.append(
            f"The best gain the alignment sweep measured on this model, {sweep:+.3f} (validation prompts), is "
            f"what the optimal reweighting gains within {kl_for_gain(r, sweep):.2f} nats of the base."
        )
    return " ".join(out)


def gap_lines(results: list[dict], goal: float = 0.10) -> list[str]:
    """For each model below another on the same probes: is the loop's goal more than that whole gap?"""
    top = max(results, key=lambda r: r["base"])
    out = []
    for r in results:
        gap = top["base"] - r["base"]
        if r is top or gap <= 0:
            continue
        verdict = (
            f"so a gain of +{goal:.2f} on it asks preference training to surpass `{top['model']}`, not only to "
            "close the gap"
            if gap < goal
            else f"so closing that gap alone would reach +{goal:.2f}"
        )
        out.append(f"- `{r['model']}` scores {gap:.3f} below `{top['model']}` on the same probe images, {verdict}.")
    return out


def markdown(results: list[dict], command: str, docs: Path) -> str:
    lines = [
        "## How much judge score do the model's own samples hold? (`bench/best_of_n.py`)",
        "",
        f"The loop's {results[0]['prompts']} probe prompts x {results[0]['n']} seeds per model, shipped sampler; "
        "judge = pixel judge overall score. DPO's optimum is the base reweighted by exp(reward / beta) (Rafailov et "
        "al. 2023, eq. 4), so on its own samples a preference method gains at most what this reweighting gains at "
        "the KL it moves. Best-of-k bounds that KL by log k - (k-1)/k nats. Rerun: "
        f"`{command}` ({max(r['seconds'] for r in results) / 60:.1f} min of sampling, one process per model, on "
        "this 2-core CPU); raw numbers in `docs/benchmarks/best_of_n.json`.",
        "",
        "| model | base judge | "
        + " | ".join(f"best of {b['k']}" for b in results[0]["best_of_k"])
        + " | KL for +0.10 (tilt) |",
        "|---|---|" + "---|" * len(results[0]["best_of_k"]) + "---|",
    ]
    for r in results:
        cells = [f"{b['gain']:+.3f} ± {b['ci']:.3f}" for b in r["best_of_k"]]
        kl = "not within the samples" if r["goal_kl"] is None else f"{r['goal_kl']:.2f} nats"
        lines.append(f"| `{r['model']}` | {r['base']:.3f} ± {r['base_ci']:.3f} | " + " | ".join(cells) + f" | {kl} |")
    lines += ["", "KL bound of best-of-k (nats): " + ", ".join(
        f"k={b['k']}: {b['kl_bound']:.2f}" for b in results[0]["best_of_k"]) + ".", ""]  # fmt: skip
    lines += ["Per attribute: accuracy / pair signal (share of same-prompt pairs whose hard decisions differ) / share "
              "of prompts where no sample is right / accuracy under the tilt that reaches +0.10 (or the greedy one):",
              "",
              "| model | " + " | ".join(results[0]["attributes"]) + " |",
              "|---|" + "---|" * len(results[0]["attributes"])]  # fmt: skip
    for r in results:
        cells = [f"{v['accuracy']:.2f} / {v['pair_signal']:.2f} / {v['never_right']:.2f} / {v['accuracy_at_goal']:.2f}"
                 for v in r["attributes"].values()]  # fmt: skip
        lines.append(f"| `{r['model']}` | " + " | ".join(cells) + " |")
    lines += ["", "![best of n](best_of_n.png)", "", "**What it shows (generated).**"]
    lines += [conclusion(r, docs) for r in results]
    lines += gap_lines(results)
    return "\n".join(lines)


def render(path: Path, docs: Path = ROOT / "docs") -> None:
    d = json.loads(path.read_text())
    results = [analyse(raw) for raw in d["raw"]]
    (docs / "benchmarks").mkdir(parents=True, exist_ok=True)
    if path.resolve() != (docs / "benchmarks" / "best_of_n.json").resolve():
        (docs / "benchmarks" / "best_of_n.json").write_text(json.dumps(d))
    plot(results, docs / "best_of_n.png")
    write_section(docs / "BENCHMARKS.md", "best-of-n", markdown(results, d["command"], docs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model folder (repeatable; default models/shapes-base)")
    p.add_argument("--prompts", type=int, default=48, help="probe prompts (the loop's probe set uses 48)")
    p.add_argument("--n", type=int, default=32, help="seeds per prompt")
    p.add_argument("--batch", type=int, default=48, help="images per pipeline call")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "best_of_n.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    p.add_argument("--render", type=Path, help="only rewrite the doc section, plot and JSON from this result file")
    args = p.parse_args()
    if args.render:
        render(args.render, args.docs)
        return
    models = args.model or [str(ROOT / "models" / "shapes-base")]
    if args.n < 2:
        p.error("--n must be at least 2 (pairs need two samples per prompt)")
    paths = [Path(m).resolve() for m in models]
    models = [repo_path(m) for m in paths]
    command = "python bench/best_of_n.py " + " ".join(f"--model {m}" for m in models)
    command += f" --prompts {args.prompts} --n {args.n}"
    with ProcessPoolExecutor(max_workers=len(models), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(sample_scores, str(m), args.prompts, args.n, args.batch) for m in paths]
        raw = [f.result() for f in futures]
    for r, m in zip(raw, models, strict=True):
        r["model"] = m
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "raw": raw}))
    render(args.out, args.docs)
    print(f"wrote {args.out} and the best-of-n section of {args.docs / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
