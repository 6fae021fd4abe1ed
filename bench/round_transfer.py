"""Does a round that learns the votes better also draw better? The loop's round against a 4x batch, labels real or coin
flips, scored on held-out votes and by the judge (docs/research/round-transfer.md).

    python -m bench.round_transfer                   # about 20 min on this 2-core CPU (pairs cached in --work)

Training pairs: 2,400 prompts x 2 base images labelled by the judge (ties dropped), the data of `bench.round_reach`'s
draw 0 (commit 3d9fbda), rebuilt here by the same code (`bench.ncp_vs_latent.Bench.make_data`, same prompts and image
seeds). Held-out votes: 400 other prompts, made the same way. Every arm is one NCP-DPO round from the default base with
the loop's settings (lr 2e-3, t >= 0.3 T, 100 steps, rank-8 attention LoRA) except the batch (8 pairs: the loop's; 32),
beta (5e5: the loop's; 5e6) and the labels (the judge's, or coin flips). Each arm is scored by: implicit reward accuracy
on the held-out votes (NCP space, what the gate reads; binomial SE) and the judge on the GATE's probes (96 prompts x 2
seeds; nothing here is a served result, so the test probes stay unused). Raw numbers: docs/benchmarks/round_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.docs import ROOT
from ncp.shapes.model import (
    DEFAULT_GUIDANCE,
    DEFAULT_ROUND_LR,
    DEFAULT_ROUND_STEPS,
    DEFAULT_STEPS,
    DEFAULT_TIMESTEP_LOW,
)

MODEL = "models/shapes-base"
TRAIN_PROMPTS, HELD_OUT_PROMPTS, DRAW = 2400, 400, 3400  # round_reach's draw 0 used the first 2,400 of 3,400 prompts
# (name, batch, seed, beta, coin-flip labels)
ARMS = [(f"b{b}{'c' if coin else 's'}{s}{'' if beta == 5e5 else 'B6'}", b, s, beta, coin)
        for beta, coins in ((5e5, (False, True)), (5e6, (False,))) for coin in coins for s in (0, 1) for b in (8, 32)]  # fmt: skip


def make_pairs(work: Path, prompts: list[str]) -> None:
    """Judge-labelled base pairs for `prompts` as work/train.parquet (kept when present: the build is deterministic)."""
    if (work / "train.parquet").exists():
        return
    from bench.ncp_vs_latent import Bench, Mode

    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(MODEL, Mode(len(prompts), 0, 1, 1, 1, (1,), 1, (1.0,), 1), work)
    bench.train_prompts = prompts
    print(bench.make_data(), flush=True)


def train(work: Path, name: str, batch: int, seed: int, beta: float, coin: bool, threads: int) -> None:
    out = work / "arms" / name
    if (out / "pytorch_lora_weights.safetensors").exists():
        return
    cmd = [sys.executable, "-m", "ncp.train", "--model", MODEL, "--data", str(work / "train" / "train.parquet"),
           "--out", str(out), "--objective", "dpo", "--space", "ncp", "--beta", str(beta), "--lr", str(DEFAULT_ROUND_LR),
           "--timestep-low", str(DEFAULT_TIMESTEP_LOW), "--max-steps", str(DEFAULT_ROUND_STEPS), "--batch-size",
           str(batch), "--lora-rank", "8", "--lora-alpha", "8", "--threads", str(threads), "--no-progress-bar",
           "--latent-cache-dir", str(work / "cache"), "--seed", str(seed)]  # fmt: skip
    if coin:
        cmd.append("--coin-flip-labels")
    with open(work / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"{name} trained", flush=True)


def evaluate(work: Path, threads: int) -> tuple[dict, dict]:
    versions = [f"--version={a[0]}={work / 'arms' / a[0]}" for a in ARMS]
    common = [sys.executable, "-m", "ncp.evaluate", "--model", MODEL, "--threads", str(threads), *versions]
    judge, held = work / "eval_judge.json", work / "eval_held_out.json"
    subprocess.run([*common, "--probe-set", "gate", "--shapes-probes", "96", "--probe-seeds", "2", "--steps",
                    str(DEFAULT_STEPS), "--guidance", str(DEFAULT_GUIDANCE), "--attributes", "--out", str(judge)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([*common, "--data", str(work / "heldout" / "train.parquet"), "--space", "ncp", "--timestep-low",
                    str(DEFAULT_TIMESTEP_LOW), "--out", str(held)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return json.loads(judge.read_text()), json.loads(held.read_text())


def step_facts(arm: Path) -> dict:
    """How far the round moved the weights (Frobenius norm of the LoRA's B @ A over all layers: under Adam about lr x
    steps whatever the labels) and its last ten steps' training loss and implicit accuracy (ln 2 = 0.693 at the start)."""
    from safetensors.torch import load_file

    sd = load_file(str(arm / "pytorch_lora_weights.safetensors"))
    sq = sum(
        (sd[k.replace("lora.down", "lora.up")].float() @ sd[k].float()).pow(2).sum().item()
        for k in sd
        if "lora.down" in k
    )
    last = json.loads((arm / "metrics.json").read_text())["mean_last_10"]
    return {"lora_delta_norm": round(sq**0.5, 3), "train_last10": {k: last[k] for k in ("loss", "implicit_acc")}}


def table(result: dict) -> str:
    lines = ["| arm | batch | beta | labels | seed | held-out acc (SE) | judge gain (95%) | colour | size | position "
             "| shape | background | count |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["arms"]:
        a = r["attributes"]
        lines.append(f"| {r['name']} | {r['batch']} | {r['beta']:g} | {'coin flips' if r['coin'] else 'judge'} | "
                     f"{r['seed']} | {r['held_out_acc']:.3f} ({r['held_out_se']:.3f}) | {r['judge_gain']:+.3f} "
                     f"(+-{r['judge_ci']:.3f}) | " + " | ".join(f"{a[k]:.2f}" for k in
                     ("color", "size", "position", "shape", "background", "count")) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "round-transfer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "round_transfer.json")
    args = p.parse_args(argv)
    t0 = time.time()
    from bench.ncp_vs_latent import training_prompts

    make_pairs(args.work / "train", training_prompts(DRAW)[:TRAIN_PROMPTS])
    make_pairs(args.work / "heldout", training_prompts(HELD_OUT_PROMPTS, skip=DRAW))
    for name, batch, seed, beta, coin in ARMS:
        train(args.work, name, batch, seed, beta, coin, args.threads)
    judge, held = evaluate(args.work, args.threads)
    result = {"model": MODEL, "held_out_pairs": held["eval_pairs"], "base_judge": judge["base_judge"],
              "base_attributes": judge["base_attributes"], "minutes": round((time.time() - t0) / 60, 1), "arms": []}  # fmt: skip
    for name, batch, seed, beta, coin in ARMS:
        j, h = judge["versions"][name], held["versions"][name]
        result["arms"].append({"name": name, "batch": batch, "seed": seed, "beta": beta, "coin": coin,
                               "held_out_acc": h["implicit_acc"], "held_out_se": h["implicit_acc_se"],
                               "judge_gain": j["judge_gain_vs_base"], "judge_ci": j["judge_gain_ci"],
                               "attributes": j["attributes"], **step_facts(args.work / "arms" / name)})  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
