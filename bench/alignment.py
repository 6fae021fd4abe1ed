"""NCP against latent-space DPO, CPO and SFT in the shapes world (issue 7): the six methods (dpo|cpo|sft x latent|ncp)
on the same on-policy pairs, step budget and batch, tuned on a validation split, several seeds, judged on fixed probes.

    python bench/alignment.py --smoke      # ~40 s: every phase on a tiny budget, into a temp dir (not docs/)
    python bench/alignment.py --quick      # ~9 min on one free core: 1 lr x 1 beta per method, 1 seed, no ablations
    python bench/alignment.py              # full: ~85 min on one free core; resumable: rerun the same command
    python bench/alignment.py --model runs/shapes-pretrain/latest --threads 2 --fresh

It prints a calibrated estimate (measured s/image and s/step on this machine) before it starts. `--threads 2` only on
an otherwise idle machine: beside another busy torch process two threads run 5-30x SLOWER (STACK_NOTES.md).
Budgets (MODES): full = 448 training prompts (~430 pairs after ties) + a 160-prompt pool, 120 steps of 8 pairs,
3 checkpoints, a 2 lr x 2 beta grid (sft: 2 lr), 3 seeds, 48 test + 32 held-out probes, 24 validation prompts, the
ablations with 1 seed; quick = 160 prompts, 60 steps, 2 checkpoints, 24 test + 16 held-out probes.
The code: this file (modes, grids, the phases), `alignment_engine.py` (data, training, evaluation, resumable state),
`alignment_report.py` (statistics, plots, the markdown and its generated conclusion).

Method (in-process, reusing the library). The model folder is copied into `--work` first (a pretraining checkpoint
changes under you). Data: held-in prompts (grammar.probe_prompts, seed DATA_SEED, 30% two-object, never the test
prompts) split into validation and training prompts; two base-model images per training prompt, labelled by the
judge (`judge_preference`, differences <= TIE_MARGIN are ties and dropped), written as Pick-a-Pic v2 Parquet and read
back with `ncp.data.load_pairs`. A third image for the first `pool_prompts` prompts gives the pool of the data ablation
(all 3 pairs per prompt vs the paper's "absolute winners", `load_pairs(absolute_winners=True)`). Training: LoRA with
the deployment's settings (rank 8, alpha 8, attention targets), AdamW (weight decay 1e-2, grad clip 1), the trainer's
own `pair_loss` (shared t, eps, z per pair; METHOD.md) and `batch_indices`; cpo uses lambda = CPO_LAMBDA (paper eq.
9-11); NCP uses the down-block encoder (the deployment's default). Each method's lr x beta grid runs with seed 0 and is
ranked by the judge on the validation prompts at the last step; the best setting runs with more seeds (seed 0 reused).
Evaluation: the test probes (probe_prompts(seed=ncp.evaluate.PROBE_SEED), image seed s*100003+i as in
`ncp.evaluate.judge_probe`) at every checkpoint, the held-out colour-shape combinations at the last one; judge overall
score, per-attribute accuracy, win rate vs the base image of the same probe (ties 0.5), mean pixel change vs base.
Time: wall and CPU seconds of the training steps only (no evaluation); memory: RSS growth during the first step after
malloc_trim (CUDA: peak allocated). Ablations at the best settings: data pool all vs absolute winners (ncp-dpo),
encoder down vs down+mid (ncp-dpo), LoRA attention vs attention + resnet convs (latent and ncp dpo).

Output: `alignment.json` (settings, raw runs and evaluations, summary), `alignment_steps.png`, `alignment_time.png` and
the `alignment` section of BENCHMARKS.md: docs/benchmarks/, docs/ and docs/BENCHMARKS.md, or the work dir for --smoke.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.alignment_engine import METHODS, NOMINAL, Bench, Budget, RunSpec  # noqa: E402
from bench.alignment_report import markdown, plots, summarize  # noqa: E402
from bench.docs import write_section  # noqa: E402
from ncp.checkpoints import finite_json  # noqa: E402


def _grid(lrs: tuple[float, ...], betas: tuple[float | None, ...]) -> list[tuple[float, float | None]]:
    return [(lr, b) for lr in lrs for b in betas]


# Full grid: NCP betas are larger (PL differences are ~c_t^2 x the latent ones, METHOD.md).
FULL_BETAS = {("dpo", "latent"): (1e3, 5e3), ("cpo", "latent"): (1e2, 1e3), ("sft", "latent"): (None,),
              ("dpo", "ncp"): (5e5, 5e6), ("cpo", "ncp"): (1e5, 1e6), ("sft", "ncp"): (None,)}  # fmt: skip
GRIDS = {
    # lr: 2e-4 barely moved the LoRA in 120 steps (val judge within 0.02 of base, pixel change < 0.01) and 1e-2
    # destroyed the model (latent dpo: val judge 0.69 -> 0.40 by step 80), so the grid spans 1e-3..3e-3.
    "full": {m: _grid((1e-3, 3e-3), FULL_BETAS[m]) for m in METHODS},
    "quick": {m: [(1e-3, NOMINAL[m])] for m in METHODS},
    "smoke": {m: [(1e-3, NOMINAL[m])] + ([(1e-3, 5e6)] if m == ("dpo", "ncp") else []) for m in METHODS},
}


MODES = {
    "smoke": Budget(6, 3, 2, 3, 2, 1, steps=2, checkpoints=2, batch=2, seeds=1, ablation_seeds=1, sample_steps=2),
    "quick": Budget(160, 0, 0, 24, 16, 1, steps=60, checkpoints=2, batch=8, seeds=1, ablation_seeds=0),
    "full": Budget(448, 160, 24, 48, 32, 1, steps=120, checkpoints=3, batch=8, seeds=3, ablation_seeds=1),
}


def _copy_model(source: Path, dest: Path) -> None:
    """Copy a pipeline folder; retried while a pretraining run rewrites it (its step.txt changes under the copy)."""
    for _ in range(5):
        step = (source / "step.txt").read_text() if (source / "step.txt").exists() else None
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
        if step == ((source / "step.txt").read_text() if (source / "step.txt").exists() else None):
            return
        time.sleep(5)
    raise RuntimeError(f"{source} kept changing while it was copied; pass a finished model folder with --model.")


def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    budget = MODES[mode]
    work = args.work or (
        Path(tempfile.mkdtemp(prefix="ncp-align-smoke-")) if mode == "smoke" else ROOT / "runs" / f"alignment-{mode}"
    )
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    default = ROOT / "models" / "shapes-base"
    source = args.model or (
        default if (default / "model_index.json").exists() else ROOT / "runs" / "shapes-pretrain" / "latest"
    )
    if not (source / "model_index.json").is_file():
        raise SystemExit(
            f"No diffusers pipeline at {source}; pretrain one (`python -m ncp.shapes.pretrain`) or pass --model."
        )
    settings = {"mode": mode, "budget": dataclasses.asdict(budget), "source": str(source), "device": args.device,
                "grid": {f"{s}-{o}": g for (o, s), g in GRIDS[mode].items()}}  # fmt: skip
    state_file = work / "state.json"
    if state_file.exists() and json.loads(state_file.read_text()).get("settings") != json.loads(json.dumps(settings)):
        raise SystemExit(f"{work} holds a run with other settings; pass --fresh to restart it or another --work.")
    if not (work / "model" / "model_index.json").exists():
        _copy_model(source, work / "model")
    torch.set_num_threads(args.threads)
    bench = Bench(mode, budget, GRIDS[mode], work, work / "model", args.device)
    step_file = work / "model" / "step.txt"
    bench.state.setdefault("settings", settings)
    bench.state.setdefault("model_step", int(step_file.read_text()) if step_file.exists() else None)
    bench.state.setdefault("runs", {})
    bench.state.setdefault("evals", {})
    cal, plan = bench.state.get("calibration") or bench.calibrate(), bench.plan()  # a resumed run reuses it
    estimate = (
        plan["images"] * cal["image_s"] + plan["latent"] * cal["latent_step_s"] + plan["ncp"] * cal["ncp_step_s"]
    )
    print(f"[alignment] mode={mode} work={work} model={source} (step {bench.state['model_step']}); calibration: "
          f"{cal['image_s']:.2f} s/image, latent {cal['latent_step_s']:.2f} s/step, "
          f"ncp {cal['ncp_step_s']:.2f} s/step; "
          f"remaining about {plan['images']:.0f} images + {plan['latent'] + plan['ncp']:.0f} steps = "
          f"{estimate / 60:.1f} min (upper bound)", flush=True)  # fmt: skip
    bench.state["calibration"] = cal
    # Phase wall times add up over resumes (a resumed phase adds only the time it spent now), so the total is the
    # benchmark's own wall time, the figure the 90-minute budget is about.
    phases = bench.state.setdefault("phase_s", {})
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        bench.state["wall_s"] = round(sum(phases.values()), 1)
        bench.save()

    bench.make_data()
    lap("data")
    for name in ("val", "test", "heldout"):
        if bench.sets[name]:
            bench.base_eval(name)
    lap("base_eval")
    # Methods interleaved (grid point-major, then seed-major) so a change in machine load hits all of them alike.
    width = max(len(g) for g in bench.grid.values())
    grid = [RunSpec(*m, *bench.grid[m][i], seed=0) for i in range(width) for m in METHODS if i < len(bench.grid[m])]
    for spec in tqdm(grid, desc="grid runs"):
        bench.train(spec)
    best = {m: bench.best(m) for m in METHODS}
    lap("grid_and_selection")
    finals = [RunSpec(*m, *best[m], seed=s) for s in range(budget.seeds) for m in METHODS]
    for spec in tqdm(finals, desc="final runs"):
        bench.train(spec)
        for step in bench.checkpoints:
            bench.evaluate(spec, step, "test")
        bench.evaluate(spec, budget.steps, "heldout")
    lap("final_runs")
    ablations = bench.ablations(best)
    for row in tqdm(ablations, desc="ablations"):
        for spec in (row["variant"], row["baseline"]):
            bench.train(spec)
            bench.evaluate(spec, budget.steps, "test")
    lap("ablations")
    bench.state["loadavg_at_end"] = list(os.getloadavg())
    bench.state["threads"] = args.threads
    summary = summarize(bench.state, finals, best, ablations, [0, *bench.checkpoints])
    bench.state["summary"] = summary
    bench.save()
    out_dir = work if mode == "smoke" else None
    json_path = (out_dir or ROOT / "docs" / "benchmarks") / "alignment.json"
    png_dir = out_dir or ROOT / "docs"
    md_path = (out_dir or ROOT / "docs") / "BENCHMARKS.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(finite_json(bench.state), indent=1) + "\n")
    plots(summary, png_dir / "alignment_steps.png", png_dir / "alignment_time.png")
    write_section(md_path, "alignment", markdown(bench.state, summary))
    print(f"[alignment] wrote {json_path}, {png_dir}/alignment_*.png and the alignment section of {md_path}")
    return bench.state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = p.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true", help="tiny budget into a temp dir (seconds)")
    group.add_argument("--quick", action="store_true", help="< 10 min on 2 cores: no tuning, 1 seed, no ablations")
    p.add_argument(
        "--model", type=Path, help="pipeline folder (default models/shapes-base, else the pretraining's latest)"
    )
    p.add_argument(
        "--work", type=Path, help="work dir: model copy, data, checkpoints, state (default runs/alignment-MODE)"
    )
    p.add_argument("--fresh", action="store_true", help="delete the work dir first (otherwise a rerun resumes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 2 only on an otherwise idle 2-core machine")
    p.add_argument("--device", default="cpu", help="torch device (cpu; cuda works too, timings then differ)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    run(args)


if __name__ == "__main__":
    main()
