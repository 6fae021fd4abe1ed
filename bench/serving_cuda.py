"""The arena's serving path on a GPU: the fp16 CUDA pipeline a GPU Space runs, with the same checks the CPU tests make.

    python bench/serving_cuda.py --device cuda --out /tmp/s.json   # on a GPU machine (~1 min)
    python bench/serving_cuda.py --render /tmp/s.json              # -> docs/benchmarks/serving_cuda.json + section
    python bench/serving_cuda.py --device cpu --prompts 2 --out /tmp/s.json   # the same code on the CPU (smoke)

What it checks, on `load_serving_pipeline(model, device)` (fp16 on CUDA, fp32 on the CPU) inside a `GenerationService`:
warmed zero slots leave the base images unchanged; a hot-swapped adapter changes them; the same (prompt, seed,
version) gives the same pixels twice; a cross-version (battle-slot) image equals the served one; the shipped model's
judge score on probe prompts (fp16 rounding must not cost quality: compare with the CPU figure); a tiny SDXL-type
pipeline in fp16 decodes finite images (SDXL's VAE upcasts itself). Timings: ms per image (batch of 2), swap ms.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.docs import repo_path, write_section  # noqa: E402

NAME = "serving-cuda"
# The deployment's LoRA rank and alpha (jobs.loop.LoopConfig; not imported: it pulls in DuckDB, which a bare GPU
# machine lacks; tests/test_bench_serving_cuda.py checks they agree).
LORA_RANK, LORA_ALPHA = 8, 8


def random_adapter(model: str, rank: int, folder: Path) -> Path:
    """A LoRA of the deployment's rank with random B (a trained adapter's shape, not its quality), saved as a version."""
    import torch

    from ncp.adapters import LoraSettings, add_lora, save_adapter
    from ncp.pipelines import load_pipeline

    pipe = load_pipeline(model)
    settings = LoraSettings(rank=rank, alpha=rank)
    add_lora(pipe.unet, settings)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return save_adapter(pipe, pipe.unet, folder, settings)


def pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(g.image, dtype=np.int16) for g in images])


def run(args: argparse.Namespace) -> dict:
    import torch

    from jobs.registry import BASE
    from ncp.adapters import LoraSettings
    from ncp.evaluate import PROBE_SEED
    from ncp.generation_worker import load_serving_pipeline
    from ncp.pipelines import build_tiny_sdxl
    from ncp.serving import GenerationService, SamplingConfig
    from ncp.shapes.grammar import probe_prompts
    from ncp.shapes.judge import score

    pipe = load_serving_pipeline(args.model, args.device)
    svc = GenerationService(pipe, "shapes", SamplingConfig(steps=12, guidance=4.0), lora_rank=LORA_RANK)
    prompts = list(dict.fromkeys(probe_prompts(args.prompts, seed=PROBE_SEED, two_object_prob=0.3)))
    seeds = [0, 1]

    def batch(version: str | None = None) -> tuple[np.ndarray, list, float]:
        t0, out = time.perf_counter(), []
        for p in prompts:
            out += svc.generate(p, seeds, version=version)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        return pixels(out), out, 1000 * (time.perf_counter() - t0) / len(out)

    svc.generate(prompts[0], seeds)  # warm-up (kernels, allocator)
    cold, images, _ = batch()
    svc.warm_slots(LoraSettings().target_modules, LORA_ALPHA)
    base, _, ms_base = batch()
    judge = float(np.mean([score(g.image, g.prompt).overall for g in images]))
    with tempfile.TemporaryDirectory() as tmp:
        svc.register_version("v1", random_adapter(args.model, LORA_RANK, Path(tmp) / "v1"))
        swap_ms = 1000 * svc.swap_adapter("v1")
        v1, _, ms_lora = batch()
        v1_again, _, _ = batch()
        svc.swap_adapter(BASE)
        battle, _, _ = batch("v1")
        base_after, _, _ = batch()
    sdxl = GenerationService(build_tiny_sdxl().to(pipe.device, torch.float16 if pipe.device.type == "cuda" else None),
                             "tiny-sdxl", SamplingConfig(steps=4, width=64, height=64))  # fmt: skip
    xl = pixels(sdxl.generate("a red circle", [0, 1]))
    checks = {
        "zero slots leave the base images unchanged": bool(np.array_equal(cold, base)),
        "the swapped adapter changes the images": bool(np.abs(v1 - base).mean() > 0.5),
        "same prompt, seed and version: same pixels": bool(np.array_equal(v1, v1_again)),
        "battle-slot image equals the served one": bool(np.array_equal(battle, v1)),
        "swap back to base restores its images": bool(np.array_equal(base_after, base)),
        "tiny SDXL in the serving dtype decodes a non-flat image": bool(xl.std() > 1.0),
    }
    return {
        "device": str(pipe.device), "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name(0) if pipe.device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": repo_path(args.model), "prompts": len(prompts), "seeds": seeds,
        "judge": judge, "ms_per_image_base": ms_base, "ms_per_image_lora": ms_lora, "swap_ms": swap_ms,
        "v1_mean_abs_change": float(np.abs(v1 - base).mean()), "checks": checks,
    }  # fmt: skip


# Where the same model's fp32 CPU score on the loop's probe prompts is published, to compare the fp16 one with.
CPU_SCORES = {"models/shapes-tiny": "research/own-samples-headroom.md"}


def cpu_reference(model: str) -> str:
    page = CPU_SCORES.get(model)
    if page is None:
        return f"compare with `python -m ncp.evaluate --model {model}` in fp32 on the CPU"
    return f"fp32 on the CPU, the same model on the loop's probe prompts: [best-of-n]({page}), `{model}`"


def render(result: dict) -> str:
    rows = "\n".join(f"| {name} | {'yes' if ok else '**NO**'} |" for name, ok in result["checks"].items())
    return (
        f"## The serving path on {result['device']} ({result['gpu']}, {result['dtype']})\n\n"
        "What a GPU Space runs: `load_serving_pipeline(model, 'auto')` (fp16 on CUDA) inside the arena's "
        f"`GenerationService`, on `{result['model']}`, {result['prompts']} probe prompts x {len(result['seeds'])} seeds, "
        "12 Euler-ancestral steps, guidance 4. Rerun on a GPU machine: `python bench/serving_cuda.py --device cuda "
        "--out s.json`, then `--render s.json` here.\n\n"
        f"| check | holds |\n|---|---|\n{rows}\n\n"
        f"Judge score of these images: **{result['judge']:.3f}** ({cpu_reference(result['model'])}). "
        f"{result['ms_per_image_base']:.1f} ms per image without an adapter, {result['ms_per_image_lora']:.1f} ms with "
        f"the hot-swapped LoRA (batch of 2, torch {result['torch']}); the swap held the lock {result['swap_ms']:.1f} ms."
    )


def publish(result: dict, docs: Path = ROOT / "docs") -> None:
    (docs / "benchmarks").mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks" / "serving_cuda.json").write_text(json.dumps(result, indent=1) + "\n")
    write_section(docs / "BENCHMARKS.md", NAME, render(result))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=str(ROOT / "models" / "shapes-base"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--render", type=Path, help="a result JSON: write docs/benchmarks/serving_cuda.json and the section"
    )
    args = p.parse_args(argv)
    if args.render:
        publish(json.loads(args.render.read_text()))
        return 0
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
