"""Time one pair of shapes-world images: one pipeline call of batch 2 at the step count and scheduler the model ships.

    python bench/shapes_speed.py                                         # models/shapes-base, 2 threads, 20 calls
    python bench/shapes_speed.py --model runs/shapes-pretrain/latest     # a checkpoint while pretraining runs
    python bench/shapes_speed.py --also-threads 1                        # also time 1 thread (busy machines)

Method. The pipeline is loaded from `--model` offline (no fallback: a missing folder is an error). Each call is
`pipe(prompt, num_images_per_prompt=2, num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE)` with the
folder's own scheduler and PIL output, i.e. exactly what the arena does to show one pair (classifier-free guidance
makes it 4 UNet rows per step). `--warmup` untimed calls, then `--calls` timed ones with distinct prompts and seeds;
p50/p95/mean of the wall time. Goal: p50 <= 0.5 s per pair on the 2-core CPU at 2 threads (the 64-px models; the
retired 32-px model's goal was 1.0 s). Writes
docs/benchmarks/shapes_speed.json and the `shapes_speed` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ncp.pipelines import load_pipeline  # noqa: E402
from ncp.shapes.grammar import probe_prompts  # noqa: E402
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SIZE  # noqa: E402

GOAL_S = 0.5


def write_section(path: Path, name: str, body: list[str]) -> None:
    """Replace (or append) the `<!-- BEGIN name -->` ... `<!-- END name -->` section of a markdown file, leaving the
    other writers' sections untouched."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = "\n".join([begin, *body, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def checkpoint_step(model: Path) -> int | None:
    """The pretraining step of a `runs/shapes-pretrain/latest` export (step.txt), else None."""
    f = model / "step.txt"
    return int(f.read_text().strip()) if f.is_file() else None


def measure(model: Path, threads: int, calls: int, warmup: int, steps: int, guidance: float, pipe=None) -> dict:  # noqa: ANN001
    """Time `calls` pair generations with `threads` torch threads (loads the pipeline unless one is passed)."""
    torch.set_num_threads(threads)
    if pipe is None:
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
    prompts = probe_prompts(calls + warmup, seed=123, two_object_prob=0.3)
    times, cpu_times = [], []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(2 * i), torch.Generator().manual_seed(2 * i + 1)]
        t0, c0 = time.perf_counter(), time.process_time()
        out = pipe(
            prompt,
            num_images_per_prompt=2,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=gens,
        )
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if len(out.images) != 2 or out.images[0].size != (IMAGE_SIZE, IMAGE_SIZE):
            raise RuntimeError(f"expected 2 images of {IMAGE_SIZE}px, got {len(out.images)} of {out.images[0].size}")
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
    t, c = np.asarray(times), np.asarray(cpu_times)
    return {
        "model": str(model),
        "checkpoint_step": checkpoint_step(model),
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": steps,
        "guidance": guidance,
        "shipped_defaults": steps == DEFAULT_STEPS and guidance == DEFAULT_GUIDANCE,
        "image_size": IMAGE_SIZE,
        "batch": 2,
        "threads": threads,
        "calls": calls,
        "warmup": warmup,
        "p50_s": float(np.percentile(t, 50)),
        "p95_s": float(np.percentile(t, 95)),
        "mean_s": float(t.mean()),
        "min_s": float(t.min()),
        # CPU seconds of this process per call (all its threads): with 1 thread, about the wall time on an idle core.
        "cpu_p50_s": float(np.percentile(c, 50)),
        "ms_per_step_p50": float(np.percentile(t, 50) / steps * 1000),
        "goal_s": GOAL_S,
        "goal_met": bool(np.percentile(t, 50) <= GOAL_S),
        "params_m": {
            "unet": sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
            "vae": sum(p.numel() for p in pipe.vae.parameters()) / 1e6,
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "loadavg_at_end": list(os.getloadavg()),
        },
    }


def docs_section(r: dict) -> list[str]:
    step = f" (pretraining step {r['checkpoint_step']})" if r["checkpoint_step"] is not None else ""
    return [
        "## Shapes model: time per pair (`bench/shapes_speed.py`)",
        "",
        f"One `{r['pipeline']}` call of batch 2 (one arena pair) on `{r['model']}`{step}: {r['scheduler']}, "
        f"{r['steps']} steps, guidance {r['guidance']} ({'the shipped defaults' if r['shipped_defaults'] else 'NOT the shipped defaults'}"
        "; classifier-free guidance: 4 UNet rows per step), "
        f"{r['image_size']}x{r['image_size']} PIL output, torch {r['threads']} threads (the headline; extra rows: "
        "other thread counts), CPU "
        f"({r['machine']['cpu_count']} cores). {r['calls']} timed calls after {r['warmup']} warm-up calls. "
        "Rerun: `python bench/shapes_speed.py [--model FOLDER]`; raw numbers in `docs/benchmarks/shapes_speed.json`.",
        "",
        "| threads | p50 s/pair | p95 s/pair | mean s | ms/step (p50) | CPU s/pair (p50) | goal | met |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {x['threads']} | {x['p50_s']:.3f} | {x['p95_s']:.3f} | {x['mean_s']:.3f} | {x['ms_per_step_p50']:.1f} | "
            f"{x['cpu_p50_s']:.3f} | <= {x['goal_s']:.1f} s | {'yes' if x['goal_met'] else 'NO'} |"
            for x in [r, *r.get("other_threads", [])]
        ],
        "",
        f"Load average when it finished: {r['machine']['loadavg_at_end'][0]:.1f} (other processes, e.g. pretraining, "
        "shared the 2 cores; wall time is then inflated, and with 2 threads torch's thread barriers make it much "
        "worse). CPU s/pair = process CPU time per call, all threads: with `--threads 1` it estimates the wall time "
        "on an idle core.",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "shapes-base", help="pipeline folder")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the headline figure")
    p.add_argument("--also-threads", type=int, nargs="*", default=[], help="extra thread counts to measure after it")
    p.add_argument("--calls", type=int, default=20, help="timed pipeline calls")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="sampling steps (default: the shipped value)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale (default: the shipped value)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "shapes_speed.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="markdown file for the section")
    args = p.parse_args(argv)
    if not (args.model / "model_index.json").is_file():
        p.error(
            f"no diffusers pipeline at {args.model} (model_index.json missing). Train it with "
            "`python -m ncp.shapes.pretrain`, or pass --model runs/shapes-pretrain/latest for a checkpoint."
        )
    if args.calls < 2 or min([args.threads, *args.also_threads]) < 1 or args.warmup < 0:
        p.error("--calls must be >= 2, --threads and --also-threads >= 1 and --warmup >= 0")
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    result = measure(args.model, args.threads, args.calls, args.warmup, args.steps, args.guidance, pipe)
    keep = ("threads", "p50_s", "p95_s", "mean_s", "ms_per_step_p50", "cpu_p50_s", "goal_s", "goal_met")
    result["other_threads"] = [
        {
            k: v
            for k, v in measure(args.model, t, args.calls, args.warmup, args.steps, args.guidance, pipe).items()
            if k in keep
        }
        for t in args.also_threads
    ]
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_section(args.md, "shapes_speed", docs_section(result))
    print(json.dumps({k: result[k] for k in ("p50_s", "p95_s", "scheduler", "steps", "goal_met")}))


if __name__ == "__main__":
    main()
