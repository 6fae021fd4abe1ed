"""Chained training rounds on one fixed set of pairs: does the DPO reference have to stay at the base?

    python -m bench.round_chain --model runs/shapes-headroom --pairs-file D/rounds/<last>/train.parquet
    python -m bench.round_chain --render docs/benchmarks/round_chain.json

The live loop trains in rounds: each one a fresh `python -m ncp.train` (fresh AdamW) that continues the last
adapter. This replays that chain offline, side by side in one run, for each reference: `base` (the paper; every
round's KL is measured from the base, so the chain converges to one tilt of it) and `init` (iterative DPO; each
round's reference is the adapter it continues, so the tilts compound). Round 1 starts from the base, where the two
are the same run, so it is trained once and shared. After every round the adapter is judged on the live loop's probe
set (`ncp.evaluate --shapes-probes`, the gate's prompts and seeds). Pairs: any snapshot's `train.parquet`, e.g. the
last round's of `python -m bench.loop --data-dir D`. Writes docs/benchmarks/round_chain.json, docs/round_chain.png
and the `round-chain` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.curves import plot_gain_curves
from bench.docs import repo_path, write_section
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_TIMESTEP_LOW

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("base", "init")


def train_round(args: argparse.Namespace, out: Path, init: Path | None, reference: str, seed: int) -> None:
    cmd = [sys.executable, "-m", "ncp.train", "--model", args.model, "--data", str(args.pairs_file), "--out", str(out),
           "--beta", str(args.beta), "--lr", str(args.lr), "--timestep-low", str(args.timestep_low),
           "--max-steps", str(args.steps), "--batch-size", "8", "--lora-rank", "8", "--lora-alpha", "8",
           "--threads", "1", "--no-progress-bar", "--seed", str(seed)]  # fmt: skip
    if init is not None:
        cmd += ["--init-adapter", str(init), "--reference", reference]
    subprocess.run(cmd, check=True, capture_output=True)


def judge(args: argparse.Namespace, adapter: Path, cache: Path) -> dict:
    out = adapter.with_suffix(".eval.json")
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", args.model, "--out", str(out), "--threads", "1",
           "--version", f"c={adapter}", "--shapes-probes", str(args.probes), "--probe-seeds", str(args.probe_seeds),
           "--steps", str(DEFAULT_STEPS), "--guidance", str(DEFAULT_GUIDANCE), "--probe-cache", str(cache)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    ev = json.loads(out.read_text())
    row = ev["versions"]["c"]
    return {"judge": row["judge"], "base_judge": ev["base_judge"], "gain": row["judge_gain_vs_base"],
            "ci": row["judge_gain_ci"]}  # fmt: skip


def arm(args: argparse.Namespace, work: Path, reference: str, first: Path) -> list[dict]:
    """Rounds 2..N of one arm, continuing the shared round 1."""
    rows, init = [], first
    for r in range(2, args.rounds + 1):
        out = work / reference / f"round{r}"
        t0 = time.perf_counter()
        train_round(args, out, init, reference, seed=r)
        rows.append({"round": r, "steps": r * args.steps, "train_s": time.perf_counter() - t0,
                     **judge(args, out, work / f"cache-{reference}.json")})  # fmt: skip
        print(f"[round-chain] {reference} round {r}: {rows[-1]['gain']:+.3f} ± {rows[-1]['ci']:.3f}", flush=True)
        init = out
    return rows


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ncp-round-chain-"))
    t0 = time.perf_counter()
    first = work / "round1"
    train_round(args, first, None, "base", seed=1)
    shared = {"round": 1, "steps": args.steps, **judge(args, first, work / "cache-round1.json")}
    with ThreadPoolExecutor(len(ARMS)) as pool:  # one process chain per arm: two cores, two arms
        chains = dict(zip(ARMS, pool.map(lambda ref: arm(args, work, ref, first), ARMS), strict=True))
    settings = {k: (repo_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "docs", "render")}  # fmt: skip
    return {"settings": settings, "arms": {ref: [shared, *rows] for ref, rows in chains.items()},
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "## Chained rounds: the DPO reference at the base or at the last round (`python -m bench.round_chain`)",
        "",
        f"Rounds of {s['steps']} NCP-DPO steps (lr {s['lr']}, beta {s['beta']:g}, t >= {s['timestep_low']:g} T, "
        f"fresh AdamW each, as the live loop's rounds) on `{s['model']}`, all on one fixed snapshot of the live loop "
        f"(`{s['pairs_file']}`), judged after every round on the loop's probe set ({s['probes']} prompts x "
        f"{s['probe_seeds']} seeds). Round 1 is shared. {res['wall_s'] / 60:.1f} min on this 2-core CPU. Rerun: "
        f"`python -m bench.round_chain --model {s['model']} --pairs-file <a snapshot's train.parquet> "
        f"--rounds {s['rounds']} --steps {s['steps']}` (this run's file: the last round's `train.parquet` of the "
        "`loop-headroom` run, `python -m bench.loop ... --data-dir D`).",
        "",
        "| round | steps | " + " | ".join(f"reference `{a}`: gain vs base (95% CI)" for a in res["arms"]) + " |",
        "|---|---|" + "---|" * len(res["arms"]),
    ]
    rounds = max(len(rows) for rows in res["arms"].values())
    for i in range(rounds):
        cells = [
            f"{rows[i]['gain']:+.3f} ± {rows[i]['ci']:.3f}" if i < len(rows) else "" for rows in res["arms"].values()
        ]
        steps = next(rows[i]["steps"] for rows in res["arms"].values() if i < len(rows))
        lines.append(f"| {i + 1} | {steps} | " + " | ".join(cells) + " |")
    lines += ["", "![round chain](round_chain.png)", "", *findings(res)]
    return "\n".join(lines)


def findings(res: dict) -> list[str]:
    """Generated from the rows, so a rerun cannot leave a stale verdict."""
    out = ["**What it shows (generated).**"]
    for ref, rows in res["arms"].items():
        later = rows[1:] or rows
        mean = sum(r["gain"] for r in later) / len(later)
        best = max(rows, key=lambda r: r["gain"])
        out.append(f"- Reference `{ref}`: mean gain over rounds 2-{len(rows)} {mean:+.3f}; best {best['gain']:+.3f} "
                   f"after round {best['round']}; last {rows[-1]['gain']:+.3f}.")  # fmt: skip
    return out


def publish(res: dict, docs: Path = ROOT / "docs") -> None:
    arms = {f"reference: {ref}": rows for ref, rows in res["arms"].items()}
    plot_gain_curves(arms, docs / "round_chain.png", title="Chained rounds on one snapshot",
                     xlabel="training steps (rounds chained)")  # fmt: skip
    write_section(docs / "BENCHMARKS.md", "round-chain", markdown(res))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/shapes-headroom")
    p.add_argument("--pairs-file", type=Path, help="a snapshot's train.parquet")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=400, help="steps per round")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=5e5)
    p.add_argument("--timestep-low", type=float, default=DEFAULT_TIMESTEP_LOW)
    p.add_argument("--probes", type=int, default=48)
    p.add_argument("--probe-seeds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "round_chain.json")
    p.add_argument("--render", type=Path, help="only rewrite the plot and the doc section from this result file")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="where BENCHMARKS.md and the plot go")
    args = p.parse_args(argv)
    if args.render:
        publish(json.loads(args.render.read_text()), args.docs)
        return
    if args.pairs_file is None or not args.pairs_file.is_file():
        p.error(f"--pairs-file must be a snapshot's train.parquet, got {args.pairs_file}")
    if args.rounds < 2 or args.steps < 1:
        p.error("--rounds must be >= 2 (round 1 is shared) and --steps >= 1")
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    publish(res, args.docs)


if __name__ == "__main__":
    main()
