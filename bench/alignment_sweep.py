"""How far preference training can move the shapes model: a longer, larger sweep than `bench/alignment.py`'s fixed
budget, to choose the live loop's settings (issue 6) and to bound what any method can reach on this model.

    python bench/alignment_sweep.py --device cuda --workers 4 --out /tmp/sweep.json   # ~6 min on one H100
    python bench/alignment_sweep.py --render /tmp/sweep.json    # JSON -> docs/benchmarks/, plot, BENCHMARKS.md
    python bench/alignment_sweep.py --smoke                     # CPU, ~1 min: every code path on a tiny budget
    python bench/alignment_sweep.py --model runs/shapes-headroom --pairs 800 --val 64 --steps 600 --checkpoints 4 \
        --workers 2 --configs 1,4 --out r.json && python bench/alignment_sweep.py --render r.json --name headroom
                                                                # CPU, ~25 min: the same bound on a base with headroom
    python bench/alignment_sweep.py --merge a.json b.json --out r.json    # configs run later on the same base and data
    python bench/alignment_sweep.py ... --labels rater           # pairs labelled by the loop's simulated rater
    python bench/alignment_sweep.py ... --pairs-file snap/train.parquet   # train on a live loop's snapshot instead

Same engine as `bench/alignment.py` (`bench.alignment_engine.Bench`: on-policy pairs from the shapes base model,
labelled by the judge, ties dropped; LoRA rank 8 on attention unless a config says attn+conv; the trainer's own
`pair_loss`), but `--pairs` training prompts (default 2,000), `--steps` optimizer steps of 8 pairs (default 600) and
each config judged every `--steps / --checkpoints` steps on the VALIDATION prompts only (64 prompts x 2 seeds; the
test probes of `bench/alignment.py` and of the loop stay unseen). Configs run in `--workers` processes (one GPU takes
several: this model is far too small to fill it). Wall times on a GPU say nothing about the CPU; the table converts
steps to CPU minutes with the CPU step times measured by `bench/alignment.py` (docs/benchmarks/alignment.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.alignment_sweep_findings import (  # noqa: E402, F401 - re-exported: the sweep's names stay where they were
    _attributes,
    _beta,
    _capacity,
    _findings,
    _headroom,
    _signal,
    _timesteps,
    _trainer_options,
    lora,
    method,
    options,
)

# (objective, space, lr, beta, targets[, LoRA rank = alpha, default 8[, options]]), in priority order: a budget cut drops
# the last ones. 12-15: wider LoRA (convs too, rank 32) for a base with headroom. 16-: options `anchor` (DPO-Positive's
# lambda: the chosen image may not get worse than under the reference, Pal et al. 2024) and `draws` ((t, eps) draws per
# pair per step): can a trainer move further from the base without the collapse wider LoRA showed? 26-31: `uncond`
# (holding the empty-prompt branch) and `seed`. 32-: `t`, the slice of the schedule the pairs are noised in: colour,
# size and background, this base's weak attributes, are decided at high noise, where a uniform t spends half its draws.
CONFIGS: list[tuple] = [
    ("dpo", "latent", 1e-3, 5e3, "attn"),
    ("dpo", "ncp", 1e-3, 5e5, "attn"),
    ("dpo", "latent", 3e-3, 5e3, "attn"),
    ("dpo", "ncp", 3e-3, 5e5, "attn"),
    ("dpo", "latent", 1e-3, 5e2, "attn"),
    ("dpo", "ncp", 1e-3, 5e4, "attn"),
    ("sft", "latent", 3e-4, None, "attn"),
    ("dpo", "ncp", 1e-3, 5e6, "attn"),
    ("dpo", "latent", 1e-3, 5e3, "attn+conv"),
    ("dpo", "ncp", 1e-3, 5e5, "attn+conv"),
    ("cpo", "latent", 1e-3, 1e2, "attn"),
    ("dpo", "latent", 3e-4, 5e3, "attn"),
    ("dpo", "latent", 1e-3, 5e2, "attn+conv"),
    ("dpo", "ncp", 1e-3, 5e5, "attn+conv", 32),
    ("dpo", "latent", 1e-3, 5e2, "attn+conv", 32),
    ("dpo", "ncp", 3e-3, 5e5, "attn+conv", 32),
    ("dpo", "ncp", 3e-3, 5e5, "attn", 8, {"anchor": 5}),
    ("dpo", "ncp", 3e-3, 5e5, "attn", 8, {"anchor": 50}),
    ("dpo", "ncp", 1e-3, 5e5, "attn+conv", 32, {"anchor": 50}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"draws": 4}),
    ("dpo", "ncp", 3e-3, 5e5, "attn", 8, {"anchor": 5, "draws": 4}),
    ("dpo", "latent", 3e-3, 5e2, "attn", 8, {"anchor": 5}),
    ("dpo", "ncp", 1e-3, 5e4, "attn", 8, {"anchor": 5}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"anchor": 5}),
    ("dpo", "latent", 1e-3, 5e2, "attn+conv", 32, {"anchor": 50}),
    ("dpo", "ncp", 3e-3, 5e5, "attn+conv", 32, {"anchor": 50}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"uncond": 1}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"uncond": 30}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"uncond": 1000}),
    ("dpo", "ncp", 3e-3, 5e5, "attn", 8, {"uncond": 30}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"seed": 1}),
    ("dpo", "latent", 1e-3, 5e2, "attn", 8, {"uncond": 30}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"t": (0.5, 1.0)}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"t": (0.7, 1.0)}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"t": (0.3, 1.0)}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"t": (0.0, 0.5)}),
    ("dpo", "latent", 1e-3, 5e2, "attn", 8, {"t": (0.5, 1.0)}),
    ("dpo", "ncp", 3e-3, 5e5, "attn", 8, {"anchor": 5, "t": (0.5, 1.0)}),
    ("sft", "latent", 3e-4, None, "attn", 8, {"t": (0.5, 1.0)}),
    ("sft", "ncp", 1e-3, None, "attn", 8, {"t": (0.5, 1.0)}),
    ("dpo", "ncp", 1e-3, 5e6, "attn", 8, {"t": (0.5, 1.0)}),
    ("dpo", "ncp", 1e-3, 5e4, "attn", 8, {"t": (0.5, 1.0)}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"t": (0.5, 1.0), "seed": 1}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"t": (0.7, 1.0), "seed": 1}),
    ("dpo", "ncp", 1e-3, 5e5, "attn", 8, {"t": (0.3, 1.0), "seed": 1}),
    ("dpo", "ncp", 2e-3, 5e5, "attn", 8, {"t": (0.5, 1.0)}),
]


def _bench(args: argparse.Namespace, work: Path):  # noqa: ANN202 - heavy imports stay out of --render
    import torch

    from bench.alignment_engine import Bench, Budget

    torch.set_num_threads(args.threads)
    budget = Budget(args.pairs, 0, args.val, 8, 8, 2, steps=args.steps, checkpoints=args.checkpoints, batch=8,
                    seeds=1, ablation_seeds=0, sample_steps=args.sample_steps)  # fmt: skip
    bench = Bench("sweep", budget, {}, work, args.model, args.device, labels=args.labels, pairs_file=args.pairs_file)
    for key in ("runs", "evals"):
        bench.state.setdefault(key, {})
    return bench


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The judge-labelled pairs and the base model's validation images, made once and copied to every worker."""
    bench = _bench(args, work)
    bench.make_data()
    bench.base_eval("val")


def worker(args: argparse.Namespace, work: Path, configs: list[int], result: Path) -> dict[str, Any]:
    """Train and judge `configs` in turn; `result` is rewritten after each one, so a cut-off sweep keeps its runs."""
    from bench.alignment_engine import LORA_RANK, RunSpec

    bench = _bench(args, work)
    bench.make_data()
    bench.base_eval("val")
    out: dict[str, Any] = {}
    for i in configs:
        o, s, lr, beta, targets, *rest = CONFIGS[i]
        opts = options(CONFIGS[i])
        spec = RunSpec(o, s, lr, beta, seed=opts.get("seed", 0), targets=targets, rank=rest[0] if rest else LORA_RANK,
                       anchor=opts.get("anchor", 0.0), draws=opts.get("draws", 1), uncond=opts.get("uncond", 0.0),
                       trange=tuple(opts.get("t", (0.0, 1.0))))  # fmt: skip
        t0 = time.perf_counter()
        run = bench.train(spec)
        curve = [[0, bench.state["evals"]["base@0@val"]["judge"]]]
        accuracy = {}
        for step in bench.checkpoints:
            rec = bench.evaluate(spec, step, "val")
            curve.append([step, rec["judge"]])
            accuracy = rec.get("accuracy", {})
        out[spec.key] = {"config": CONFIGS[i], "curve": curve, "accuracy_last": accuracy,
                         "step_s": run.get("step_s"), "diverged_at": run.get("diverged_at"),
                         "final_metrics": run.get("final_metrics"), "seconds": time.perf_counter() - t0}  # fmt: skip
        result.write_text(json.dumps(out))
        print(f"[sweep] {spec.key}: {' '.join(f'{s}:{j:.3f}' for s, j in curve)}", flush=True)
    return out


def run_all(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ncp-sweep-"))
    t0 = time.perf_counter()
    prepare(args, root / "base")
    base = json.loads((root / "base" / "state.json").read_text())
    procs = []
    for w in range(args.workers):
        work = root / f"w{w}"
        shutil.copytree(root / "base", work)
        chosen = [int(i) for i in args.configs.split(",")] if args.configs else list(range(len(CONFIGS)))
        share = [i for k, i in enumerate(chosen) if k % args.workers == w][: args.max_per_worker]
        cmd = [sys.executable, __file__, "--worker", ",".join(map(str, share)), "--work", str(work),
               "--result", str(out.with_name(f"{out.stem}-w{w}.json")), *args.passthrough]  # fmt: skip
        procs.append((out.with_name(f"{out.stem}-w{w}.json"), subprocess.Popen(cmd)))
    results: dict[str, Any] = {}
    for partial, proc in procs:
        proc.wait()
        if partial.exists():
            results |= json.loads(partial.read_text())
            partial.unlink()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "passthrough"}
    return {"settings": settings,
            "data": base.get("data"), "base_val": base["evals"]["base@0@val"], "runs": results,
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def _se(evaluation: dict[str, Any]) -> float:
    """Standard error of a probe set's mean judge score (per-image scores in `overall`)."""
    import numpy as np

    x = np.asarray(evaluation["overall"], dtype=float)
    return float(x.std(ddof=1) / np.sqrt(len(x)))


# How the detuned bases are built: the shipped model fine-tuned on captions whose colour, background and size name a
# random value with probability q, so it follows those words less. `headroom` (q = 0.7) follows them about half the
# time; the `deficit` bases (q = 0.9, and 1.0: the captions carry no colour, background or size at all) ask whether a
# larger gap to the shipped model lets preference training gain more.
BASES: dict[str, str] = {"headroom": "0.7", "deficit0.9": "0.9", "deficit1.0": "1.0"}


def base_recipe(name: str) -> str | None:
    """The command that builds the base of sweep `name` (`headroom`, `headroom-options`, `deficit1.0`, ...), if any."""
    key = next((k for k in BASES if name == k or name.startswith(f"{k}-")), None)
    if key is None:
        return None
    q, folder = BASES[key], "headroom" if key == "headroom" else key
    return (f"python -m ncp.shapes.pretrain --init-model models/shapes-base --unet-steps 800 --batch 32 --lr 3e-4 "
            f"--caption-noise color={q},background={q},size={q} --out runs/shapes-{folder} --work runs/{folder}-work")  # fmt: skip


HEADROOM_RECIPE = base_recipe("headroom")


def render(path: Path, name: str = "", docs: Path = ROOT / "docs") -> None:
    """The sweep's JSON -> docs/benchmarks/alignment_sweep[_NAME].json, docs/alignment_sweep[_NAME].png and the
    BENCHMARKS.md section `alignment-sweep[-NAME]` (a name keeps a sweep on another base model next to the shipped
    model's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.docs import write_section

    res = json.loads(path.read_text())
    cpu = json.loads((ROOT / "docs" / "benchmarks" / "alignment.json").read_text())["summary"]["methods"]
    base = res["base_val"]["judge"]
    stem = "alignment_sweep" + (f"_{name}" if name else "")
    (docs / "benchmarks").mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks" / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = []
    for key, r in sorted(res["runs"].items(), key=lambda kv: -max(j for _, j in kv[1]["curve"])):
        steps, judge = zip(*r["curve"], strict=True)
        ax.plot(steps, judge, marker=".", label=key.split("|seed")[0].replace("|", " ") + f" {lora(r['config'])}")
        best = max(range(len(judge)), key=judge.__getitem__)
        draws = options(r["config"]).get("draws", 1)  # K draws cost about K plain steps on the CPU
        cpu_step = (cpu.get(f"{r['config'][1]}-{r['config'][0]}", {}).get("step_s") or float("nan")) * draws
        rows.append(
            f"| {method(r['config'])} | {r['config'][2]:g} | {'-' if r['config'][3] is None else format(r['config'][3], 'g')} "
            f"| {lora(r['config'])} | {judge[-1]:.3f} ({judge[-1] - base:+.3f}) | {judge[best]:.3f} at {steps[best]} "
            f"({judge[best] - base:+.3f}) | {steps[best] * cpu_step / 60:.0f} | "
            f"{(r.get('final_metrics') or {}).get('implicit_acc', float('nan')):.2f} |"
        )
    ax.axhline(base, color="k", ls="--", lw=1, label="base")
    ax.set(
        xlabel="optimizer steps (8 pairs each)",
        ylabel="validation judge score",
        title=f"alignment sweep {name}".strip(),
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(docs / f"{stem}.png", dpi=110)
    plt.close(fig)
    s, d = res["settings"], res.get("data") or {}
    rel, shipped, rerun = _provenance(s, name)
    md = [
        f"## Alignment sweep{f' `{name}`' if name else ''}: how far can preference training move "
        f"{'the shipped model' if shipped else f'`{rel}`'}? "
        "(`bench/alignment_sweep.py`)",
        "",
        *([] if shipped or not base_recipe(name) else [f"Base built by `{base_recipe(name)}`.", ""]),
        f"{d.get('loaded:all', {}).get('kept', '?')} {_source(s)}, {s['steps']} steps of 8 pairs, judged every {s['steps'] // s['checkpoints']} steps on "
        f"{s['val']} validation prompts x 2 seeds (never the test probes; one score's standard error is about "
        f"{_se(res['base_val']):.3f}). Base: **{base:.3f}**. Ran on "
        f"`{s['device']}` {_wall(res)}; the last column "
        "converts the best step to minutes of one CPU core with the CPU step time that `bench/alignment.py` measured "
        "for the method. Rerun: " + rerun + ".",
        "",
        "| method | lr | beta | LoRA | last judge (vs base) | best judge at step (vs base) | CPU min to best "
        "| train implicit acc |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"![validation judge vs steps]({stem}.png)",
        "",
        *_findings(res, base, s["steps"]),
    ]
    section = stem.replace("_", "-")
    write_section(docs / "BENCHMARKS.md", section, "\n".join(md))
    print(f"[sweep] wrote docs/benchmarks/{stem}.json, docs/{stem}.png, BENCHMARKS.md section {section}")


def _source(settings: dict[str, Any]) -> str:
    """Where the training pairs came from: sampled and labelled here, or a given Parquet (`--pairs-file`)."""
    if settings.get("pairs_file"):
        return (f"strict-preference pairs (ties dropped) read from `{settings['pairs_file']}` (`--pairs-file`: e.g. a "
                "live loop's snapshot, rater votes on the served model's pairs)")  # fmt: skip
    return f"{_labelled(settings)} on-policy pairs from {settings['pairs']} held-in prompts"


def _labelled(settings: dict[str, Any]) -> str:
    """Who labelled the pairs (`--labels`; sweeps from before the flag were judge-labelled)."""
    if settings.get("labels", "judge") == "judge":
        return "judge-labelled"
    return ("rater-labelled (the loop benchmark's simulated rater: logistic choice at temperature 0.05, both_bad "
            "under 0.3, dropped like ties)")  # fmt: skip


def _wall(res: dict[str, Any]) -> str:
    """How long the sweep ran: one run, or each of the merged runs (`--merge`) with its configs."""
    parts = res.get("merged_from")
    if not parts:
        return f"in {res['wall_s'] / 60:.1f} min with {res['settings']['workers']} worker processes"
    each = "; ".join(f"configs {p['configs']}: {p['wall_s'] / 60:.1f} min, {p['workers']} worker(s)" for p in parts)
    return f"in {len(parts)} runs on the same pairs and validation images ({each})"


def _index(config: list) -> int | str:
    return next((i for i, c in enumerate(CONFIGS) if list(c) == list(config)), "?")


def merge(paths: list[Path]) -> dict[str, Any]:
    """One sweep result from several runs of the same base, pairs and validation set (e.g. configs added later)."""
    results = [json.loads(p.read_text()) for p in paths]
    first = results[0]
    same = ("model", "device", "pairs", "val", "steps", "checkpoints", "sample_steps", "labels")
    for r in results[1:]:
        diff = [k for k in same if str(r["settings"].get(k)) != str(first["settings"].get(k))]
        if diff or r["data"] != first["data"] or r["base_val"]["judge"] != first["base_val"]["judge"]:
            raise ValueError(f"Cannot merge sweeps that differ in {diff or ['data or base score']}; rerun them alike.")
    out = copy.deepcopy(first)
    # The configs each run finished (a run cut short lists fewer than it was given), as indices into CONFIGS.
    done = [",".join(str(_index(r["config"])) for r in res["runs"].values()) for res in results]
    out["merged_from"] = [
        {"configs": c, "wall_s": r["wall_s"], "workers": r["settings"]["workers"]}
        for c, r in zip(done, results, strict=True)
    ]
    for r in results[1:]:
        out["runs"] |= r["runs"]
    out["settings"]["configs"] = ",".join(p["configs"] for p in out["merged_from"])
    out["wall_s"] = sum(r["wall_s"] for r in results)
    return out


def _provenance(s: dict[str, Any], name: str) -> tuple[str, bool, str]:
    """The model folder relative to the repo, whether it is the shipped model, and the command that reruns the sweep."""
    model = Path(s["model"]).resolve()
    from bench.docs import repo_path

    rel = repo_path(model)
    flags = (f"--device {s['device']} --model {rel} --pairs {s['pairs']} --val {s['val']} --steps {s['steps']} "
             f"--checkpoints {s['checkpoints']} --workers {s['workers']}")  # fmt: skip
    flags += f" --configs {s['configs']}" if s.get("configs") else ""
    flags += f" --labels {s['labels']}" if s.get("labels", "judge") != "judge" else ""
    flags += f" --pairs-file {s['pairs_file']}" if s.get("pairs_file") else ""
    rerun = f"`python bench/alignment_sweep.py {flags} --out r.json` then `--render r.json{f' --name {name}' * bool(name)}`"
    return rel, model == (ROOT / "models" / "shapes-base").resolve(), rerun


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "shapes-base")
    p.add_argument("--pairs", type=int, default=2000, help="training prompts (one judged pair each)")
    p.add_argument("--val", type=int, default=64, help="validation prompts (x 2 seeds)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoints", type=int, default=6)
    p.add_argument("--sample-steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs-file", type=Path, default=None,
                   help="train on this Parquet of labelled pairs (e.g. a loop snapshot's train.parquet) instead of "
                   "sampling --pairs prompts")  # fmt: skip
    p.add_argument("--labels", choices=("judge", "rater"), default="judge",
                   help="who labels the pairs: the judge's sign, or the loop benchmark's simulated rater")  # fmt: skip
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--configs", default="", help="comma-separated indices into CONFIGS (default: all, in order)")
    p.add_argument("--max-per-worker", type=int, default=len(CONFIGS))
    p.add_argument("--out", type=Path, help="where the sweep's JSON goes")
    p.add_argument("--render", type=Path, help="render a sweep JSON into docs/ and stop")
    p.add_argument("--name", default="", help="with --render: suffix of the doc section and files (another base)")
    p.add_argument("--merge", type=Path, nargs="+", help="merge these sweep JSONs (same base and data) into --out")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny budget, 2 configs: checks the code paths")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render:
        return render(args.render, args.name)
    if args.merge:
        if args.out is None:
            p.error("--merge needs --out")
        args.out.write_text(json.dumps(merge(args.merge), indent=1) + "\n")
        return None
    if args.smoke:
        args.pairs, args.val, args.steps, args.checkpoints, args.sample_steps = 12, 4, 4, 2, 2
        # One worker, two configs that differ in LoRA targets and rank: the evaluation UNet must follow the run's shape.
        args.workers, args.max_per_worker, args.configs = 1, 2, args.configs or "12,13"
    if args.worker is not None:
        configs = [int(i) for i in args.worker.split(",") if i]
        worker(args, args.work, configs, args.result)
        return None
    keep = ["--device", args.device, "--model", str(args.model), "--pairs", str(args.pairs), "--val", str(args.val),
            "--steps", str(args.steps), "--checkpoints", str(args.checkpoints), "--threads", str(args.threads),
            "--sample-steps", str(args.sample_steps), "--labels", args.labels,
            *(["--pairs-file", str(args.pairs_file)] if args.pairs_file else [])]  # fmt: skip
    args.passthrough = keep
    out = args.out or Path(tempfile.mkdtemp(prefix="ncp-sweep-out-")) / "sweep.json"
    result = run_all(args, out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[sweep] {len(result['runs'])} configs in {result['wall_s'] / 60:.1f} min -> {out}")
    return None


if __name__ == "__main__":
    main()
