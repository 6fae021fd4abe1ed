"""Pretraining-recipe ablation of the shapes model: which changes fix the base model's weak attributes?

    python bench/shapes_recipe.py --device cuda --vae runs/centred/vae          # all variants in parallel
    python bench/shapes_recipe.py --device cpu --steps 40 --n 8 --variants old  # smoke

Each variant pretrains the UNet + text encoder from scratch with `python -m ncp.shapes.pretrain` (same data stream,
batch, learning rate and step budget) and differs in one recipe choice:

- the latents: the shipped VAE's uncentred latents, or the same VAE re-centred per channel (`center_vae`);
- the noise schedule: `squaredcos_cap_v2` (near-zero terminal SNR) or SD1.5's `scaled_linear`;
- offset noise (0.1) and min-SNR-5 loss weighting.

Every variant is then scored by the pixel judge on the fixed prompt sets of bench/shapes_base.py at 12, 16 and 20
Euler-ancestral steps, guidance 4. The step budget matches a CPU pretraining run (about 0.75 s per step on one core),
so the winner can be retrained on the CPU with the same command. Writes docs/benchmarks/shapes_recipe.json and the
`shapes_recipe` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.docs import write_section  # noqa: E402
from bench.shapes_base import SETS, generate, prompt_sets, summarize  # noqa: E402
from ncp.pipelines import load_pipeline  # noqa: E402

# name -> (latents, extra pretrain flags, step multiplier)
VARIANTS: dict[str, tuple[str, list[str], float]] = {
    "old": ("uncentred", ["--beta-schedule", "squaredcos_cap_v2", "--noise-offset", "0", "--snr-gamma", "0"], 1),
    "centred": ("centred", ["--beta-schedule", "squaredcos_cap_v2", "--noise-offset", "0", "--snr-gamma", "0"], 1),
    "centred+sl": ("centred", ["--beta-schedule", "scaled_linear", "--noise-offset", "0", "--snr-gamma", "0"], 1),
    "centred+cos+off+snr": ("centred", ["--beta-schedule", "squaredcos_cap_v2"], 1),
    "centred+sl+off+snr": ("centred", ["--beta-schedule", "scaled_linear"], 1),
    "centred+sl+off+snr x2": ("centred", ["--beta-schedule", "scaled_linear"], 2),
}
SAMPLER_STEPS = (12, 16, 20)


def launch(name: str, args: argparse.Namespace) -> tuple[subprocess.Popen, Path]:
    latents, flags, mult = VARIANTS[name]
    work = args.work / name.replace("+", "_").replace(" ", "_")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "vae").exists():
        shutil.copytree(args.vae if latents == "centred" else args.old_vae, work / "vae")
    steps = int(args.steps * mult)
    cmd = [sys.executable, "-m", "ncp.shapes.pretrain", "--work", str(work), "--out", str(work / "out")]
    cmd += ["--unet-steps", str(steps), "--ckpt-every", str(steps), "--device", args.device, "--threads", "2"]
    cmd += flags
    log = open(work / "stdout.txt", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), work


def evaluate(folder: Path, args: argparse.Namespace) -> dict:
    pipe = load_pipeline(str(folder), device=args.device)
    pipe.set_progress_bar_config(disable=True)
    sets = prompt_sets(args.n, seed=0)
    out: dict = {}
    for steps in SAMPLER_STEPS:
        res = {}
        for name in SETS:
            images = generate(pipe, sets[name], seed=0, batch=args.n, steps=steps, guidance=4.0)
            res[name], _ = summarize(sets[name], images)
        out[str(steps)] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3000, help="UNet steps per variant (x2 for the long variant)")
    p.add_argument("--n", type=int, default=100, help="prompts per judge set")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--vae", type=Path, default=ROOT / "runs/centred/vae", help="the re-centred VAE folder")
    p.add_argument("--old-vae", type=Path, default=ROOT / "models/shapes-tiny/vae", help="the uncentred VAE folder")
    p.add_argument("--work", type=Path, default=ROOT / "runs/recipe")
    p.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/shapes_recipe.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs/BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(4)
    t0 = time.time()
    procs = {name: launch(name, args) for name in args.variants}
    results: dict = {"device": args.device, "unet_steps": args.steps, "batch": 16, "variants": {}}
    for name, (proc, work) in procs.items():
        rc = proc.wait()
        wall = time.time() - t0
        print(f"[{wall:6.0f}s] {name}: pretrain exit {rc}", flush=True)
        if rc != 0:
            results["variants"][name] = {"error": (work / "stdout.txt").read_text()[-2000:]}
            continue
        log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in log if r.get("stage") == "unet" and "loss" in r]
        results["variants"][name] = {
            "latents": VARIANTS[name][0],
            "flags": VARIANTS[name][1],
            "unet_steps": int(args.steps * VARIANTS[name][2]),
            "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "judge": evaluate(work / "out", args),
        }
        j = results["variants"][name]["judge"]["20"]
        print(f"  {name}: " + ", ".join(f"{s} {j[s]['overall']:.3f}" for s in SETS), flush=True)
        results["wall_s"] = time.time() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # after each variant, so a cut-off run keeps the rest
        write_docs(results, args.docs)


def write_docs(results: dict, path: Path) -> None:
    lines = [
        f"UNet + text encoder pretrained from scratch for {results['unet_steps']} steps of 16 images per variant "
        f"(device: {results['device']}); judge overall (held-in / held-out / two-object) and held-in position and "
        "background accuracy, Euler ancestral, guidance 4. Rerun: `python bench/shapes_recipe.py --device cuda`.",
        "",
        "| variant | steps | sampler steps | held-in | held-out | two-object | position | background |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        if "error" in v:
            lines.append(f"| {name} | failed | | | | | | |")
            continue
        for s, j in v["judge"].items():
            hi = j["held_in"]
            lines.append(
                f"| {name} | {v['unet_steps']} | {s} | {hi['overall']:.3f} ± {hi['overall_ci95']:.3f} | "
                f"{j['held_out']['overall']:.3f} | {j['two_object']['overall']:.3f} | {hi['position']:.2f} | "
                f"{hi['background']:.2f} |"
            )
    done = {n: v for n, v in results["variants"].items() if "error" not in v}
    missing = [n for n in VARIANTS if n not in results["variants"]]
    if done:
        best = max(done, key=lambda n: done[n]["judge"]["20"]["held_in"]["overall"])
        lines += ["", f"Best held-in score at 20 sampler steps: **{best}**; the shipped model uses this recipe."]
    if missing:
        lines += ["", "Not finished within the run's time limit: " + ", ".join(missing) + "."]
    write_section(path, "shapes_recipe", "## Shapes model: pretraining recipe ablation\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
