"""Step cost on the full-size SDXL UNet (GPU): latent dpo vs ncp dpo, one optimizer step of the trainer's own code.

    python bench/step_cost_gpu.py --device cuda            # < 4 min (--budget-s 220); writes docs/benchmarks/
                                                           # step_cost_gpu.json and the docs/BENCHMARKS.md section
    python bench/step_cost_gpu.py --device cuda --out /tmp/r.json --docs ''     # results only, no docs
    python bench/step_cost_gpu.py --render /tmp/r.json     # results fetched from a GPU machine -> JSON + docs here
    python bench/step_cost_gpu.py --device cpu --tiny      # CPU smoke (~40 s): same code, tiny SDXL-type UNet

Setup (the tracker's): the SDXL base UNet architecture built from its config in code (2567M parameters, random
weights, no download), 128x128x4 latents (1024x1024 images), ONE pair per step (chosen + rejected = 2 latents), LoRA
r64 / alpha 64 on to_q, to_k, to_v, to_out.0, bf16 autocast, gradient checkpointing, SDPA attention (diffusers'
default processor), random text conditioning (1, 77, 2048) + pooled (1, 1280) in bf16 (what bf16 text encoders give),
SDXL time ids for 1024x1024. A step is the trainer's: `ncp.trainer._prepare_models` (freeze, LoRA in fp32, weight
casting, checkpointing), then per step `ncp.trainer.pair_loss` under autocast, backward, grad clip 1.0, AdamW step.

Methods (each in a FRESH subprocess, so peak memory never mixes):
    latent-dpo            trainer path, --mixed_precision bf16: UNet weights bf16
    ncp-dpo               trainer path: UNet weights stay fp32 (autocast runs the passes in bf16), NCP encoder fp32
    ncp-dpo-enc-autocast  as ncp-dpo but the encoder under bf16 autocast (perception's encoder_fp32=False): the
                          cost of the fp32 encoder; bf16 PL differences are rounding noise, so timing only
    ncp-dpo-bf16-weights  UNet weights bf16 like latent-dpo (encoder then bf16 too): NCP's extra passes alone
    latent-dpo-fp32-weights  latent dpo with fp32 weights + autocast: the weight-dtype part of ncp-dpo's cost
step_ms = median of `--steps` timed steps (torch.cuda.synchronize around each) after `--warmup` untimed ones;
peak_mb = torch.cuda.max_memory_allocated over warmup + timed steps (stats reset after setup), weights_mb = memory
allocated after setup (UNet + LoRA). A method that fails (e.g. out of memory) is recorded with its error; the rest go
on. Methods that would start after `--budget-s` seconds are skipped (recorded as such).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.harness import write_json, write_section  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (UNet2DConditionModel defaults for the rest)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled 1280
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    center_input_sample=False,
    upcast_attention=None,
)
# The same block layout, tiny (CPU smoke): cross-attention 64, pooled 32, 6 x 8 time-id dims.
TINY_UNET = {
    **SDXL_UNET,
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": (32, 32, 64),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 2, 4),
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
}
CONFIGS = {"sdxl-full": (SDXL_UNET, 1280), "tiny": (TINY_UNET, 32)}  # name -> (UNet config, pooled dim)
TOKENS, LORA_RANK, PAIRS = 77, 64, 1
# name -> (space, UNet weights: "trainer" = as _prepare_models casts them | "bf16" | "fp32", encoder_fp32)
METHODS = {
    "latent-dpo": ("latent", "trainer", True),
    "ncp-dpo": ("ncp", "trainer", True),
    "ncp-dpo-enc-autocast": ("ncp", "trainer", False),
    "ncp-dpo-bf16-weights": ("ncp", "bf16", True),
    "latent-dpo-fp32-weights": ("latent", "fp32", True),
}


def _log(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _encoder_precision(encoder_fp32: bool) -> Iterator[None]:
    """pair_loss takes perception's default encoder_fp32=True; swap in False for the autocast-encoder variant."""
    import ncp.losses  # where pair_loss looks per_sample_errors up

    original = ncp.losses.per_sample_errors
    if not encoder_fp32:
        ncp.losses.per_sample_errors = functools.partial(original, encoder_fp32=False)
    try:
        yield
    finally:
        ncp.losses.per_sample_errors = original


def worker(config: str, method: str, device_name: str, steps: int, warmup: int) -> dict:
    """One method in this process: build, prepare as the trainer does, time the steps. Errors become the record."""
    import torch

    record: dict = {"method": method, "config": config}
    try:
        return _measure(record, config, method, torch.device(device_name), steps, warmup)
    except Exception as err:  # noqa: BLE001 - a benchmark records the failure (OOM included) and goes on
        record["error"] = f"{type(err).__name__}: {err}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
        if device_name.startswith("cuda") and torch.cuda.is_available():
            record["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        _log(method, f"FAILED: {record['error'][:300]}")
        return record


def _measure(record: dict, config: str, method: str, device, steps: int, warmup: int) -> dict:  # noqa: ANN001
    import diffusers
    import peft
    import torch
    import transformers
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from bench.harness import maxrss_mb, rss_mb
    from ncp.latents import PairBatch
    from ncp.perception import _encoder_in_fp32
    from ncp.pipelines import _SD_SCHEDULE, Conditioning
    from ncp.trainer import TrainConfig, _optimizer, _prepare_models, pair_loss

    cuda = device.type == "cuda"
    space, weights, encoder_fp32 = METHODS[method]
    unet_config, pooled_dim = CONFIGS[config]
    side = unet_config["sample_size"]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    record["machine"] = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    start = time.perf_counter()
    with torch.device(device):  # random init directly on the device (fast for 2.6B parameters)
        unet = UNet2DConditionModel(**unet_config)
    if weights == "bf16":
        unet.to(torch.bfloat16)
    train_config = TrainConfig(
        objective="dpo",
        space=space,
        mixed_precision="no" if weights == "fp32" else "bf16",
        gradient_checkpointing=True,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_RANK,
    )
    unet, params = _prepare_models(SimpleNamespace(unet=unet), train_config, SimpleNamespace(device=device))
    optimizer = _optimizer(params, train_config)
    scheduler = DDPMScheduler(**_SD_SCHEDULE)
    g = torch.Generator().manual_seed(0)
    batch = PairBatch(
        prompts=("a photo",) * PAIRS,
        chosen=torch.randn(PAIRS, 4, side, side, generator=g),
        rejected=torch.randn(PAIRS, 4, side, side, generator=g),
        time_ids=torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * PAIRS, dtype=torch.float32),
    )
    ehs = torch.randn(PAIRS, TOKENS, unet_config["cross_attention_dim"], generator=g)
    cond = Conditioning(ehs, torch.randn(PAIRS, pooled_dim, generator=g)).to(device, torch.bfloat16)
    record.update(
        unet_params_m=sum(p.numel() for p in unet.parameters()) / 1e6,
        lora_params_m=sum(p.numel() for p in params) / 1e6,
        unet_dtype=str(unet.conv_in.weight.dtype).removeprefix("torch."),
        encoder_dtype=None if space == "latent" else ("float32" if _encoder_in_fp32(unet, encoder_fp32) else "bf16"),
        latent=[2 * PAIRS, 4, side, side],
        attention_processor=type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.processor).__name__,
    )
    _log(method, f"setup {time.perf_counter() - start:.1f} s: {record['unet_params_m']:.0f}M UNet "
                 f"({record['unet_dtype']}), LoRA {record['lora_params_m']:.1f}M, encoder {record['encoder_dtype']}")  # fmt: skip

    losses: list[float] = []

    def step(i: int) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            result = pair_loss(unet, scheduler, batch, cond, train_config, torch.Generator().manual_seed(i), sdxl=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        losses.append(result.metrics["loss"])
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        record["weights_mb"] = torch.cuda.memory_allocated(device) / 2**20
    rss_before = rss_mb()
    times = []
    with _encoder_precision(encoder_fp32):
        for i in range(warmup + steps):
            seconds = step(i)
            _log(method, f"{'warmup' if i < warmup else 'step'} {i}: {seconds * 1e3:.0f} ms")
            if i >= warmup:
                times.append(seconds)
    if cuda:
        record["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        record["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:  # CPU: extra resident memory of the steps (as bench/step_cost.py)
        record["peak_mb"] = maxrss_mb() - rss_before
    record.update(step_ms=statistics.median(times) * 1e3, step_times_ms=[t * 1e3 for t in times], losses=losses)
    _log(method, f"median {record['step_ms']:.0f} ms/step, peak {record['peak_mb']:.0f} MB")
    return record


def add_ratios(data: dict) -> dict:
    base = data["results"].get("latent-dpo", {})
    for rec in data["results"].values():
        ok = "step_ms" in rec and "step_ms" in base
        rec["ratio_to_latent_dpo"] = rec["step_ms"] / base["step_ms"] if ok else None
        rec["mem_ratio_to_latent_dpo"] = rec["peak_mb"] / base["peak_mb"] if ok and base["peak_mb"] > 0 else None
    return data


def skeleton(config: str, device: str, methods: list[str], steps: int, warmup: int) -> dict:
    """The results document before any measurement: settings and the methods' definitions."""
    return {
        "benchmark": "step_cost_gpu",
        "config": config,
        "settings": {
            "device": device,
            "steps": steps,
            "warmup": warmup,
            "pairs_per_step": PAIRS,
            "lora_rank": LORA_RANK,
            "lora_alpha": LORA_RANK,
            "lora_targets": ["to_q", "to_k", "to_v", "to_out.0"],
            "mixed_precision": "bf16 autocast",
            "gradient_checkpointing": True,
            "text_conditioning": f"random bf16 ({PAIRS}, {TOKENS}, {CONFIGS[config][0]['cross_attention_dim']}) "
            f"+ pooled ({PAIRS}, {CONFIGS[config][1]})",
            "optimizer": "AdamW lr 1e-5 wd 1e-2, grad clip 1.0",
            "unet_config": CONFIGS[config][0],
        },
        "methods": {m: dict(zip(("space", "weights", "encoder_fp32"), METHODS[m], strict=True)) for m in methods},
        "results": {},
    }


def run_all(config: str, device: str, methods: list[str], steps: int, warmup: int, budget_s: float, out: Path) -> dict:
    # Keep an existing PYTHONPATH (wheels unpacked into a --target folder on the GPU machine) behind the repo root.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    data = skeleton(config, device, methods, steps, warmup)
    started = time.monotonic()
    for method in methods:
        left = budget_s - (time.monotonic() - started)
        if left < 20:
            data["results"][method] = {"method": method, "error": f"skipped: time budget of {budget_s:.0f} s spent"}
            print(f"{method}: skipped (budget)", flush=True)
            continue
        print(f"--- {method} ({left:.0f} s of budget left)", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_path = Path(f.name)
        cmd = [sys.executable, __file__, "--worker", config, method, device, str(steps), str(warmup), str(result_path)]
        try:
            proc = subprocess.run(cmd, env=env, timeout=left, check=False)
            text = result_path.read_text()
            rec = json.loads(text) if text else {"method": method, "error": f"worker exited {proc.returncode}"}
        except subprocess.TimeoutExpired:
            rec = {"method": method, "error": f"timed out after {left:.0f} s (budget)"}
        finally:
            result_path.unlink(missing_ok=True)
        machine = rec.pop("machine", None)
        if machine and not data.get("machine"):
            data["machine"] = machine
        data["results"][method] = rec
        data["wall_s"] = time.monotonic() - started
        write_json(add_ratios(data), out)  # partial results survive a kill
    return data


def render(data: dict) -> str:
    s, m = data["settings"], data.get("machine") or {}
    side = s["unet_config"]["sample_size"]
    params = next((r["unet_params_m"] for r in data["results"].values() if "unet_params_m" in r), None)
    full = data["config"] == "sdxl-full"
    arch = "SDXL base UNet architecture" if full else "tiny SDXL-type UNet (CPU smoke, not a result)"
    lines = [
        f"## Step cost on the {'full-size SDXL UNet' if full else 'tiny SDXL-type UNet'} (`bench/step_cost_gpu.py`, "
        f"config `{data['config']}`)",
        "",
        f"Device: {m.get('device', '?')}; torch {m.get('torch', '?')} (CUDA {m.get('cuda')}), diffusers "
        f"{m.get('diffusers', '?')}, peft {m.get('peft', '?')}. {arch}"
        + (f" ({params:.0f}M parameters)" if params else "")
        + " with random weights, "
        f"{side}x{side}x4 latents ({side * 8}x{side * 8} images), {s['pairs_per_step']} pair per step, LoRA "
        f"r{s['lora_rank']}, bf16 autocast, gradient checkpointing, SDPA attention, TF32 matmul "
        f"{'on' if m.get('tf32_matmul') else 'off'}; the trainer's own step (`pair_loss`, backward, clip, AdamW). "
        f"Median of {s['steps']} timed steps after {s['warmup']} warm-up steps, each method in a fresh process; "
        "peak = `torch.cuda.max_memory_allocated` over the steps. Rerun: `python bench/step_cost_gpu.py --device "
        "cuda`; raw numbers in `docs/benchmarks/step_cost_gpu.json`.",
        "",
        "| method | UNet weights | NCP encoder | ms/step | x latent dpo | peak GiB | x latent dpo | weights GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rec in data["results"].items():
        if "step_ms" not in rec:
            lines.append(f"| {name} | | | failed: {rec.get('error', '?')[:120]} | | | | |")
            continue
        ratio = "n/a" if rec["ratio_to_latent_dpo"] is None else f"{rec['ratio_to_latent_dpo']:.2f}"
        mem = "n/a" if rec["mem_ratio_to_latent_dpo"] is None else f"{rec['mem_ratio_to_latent_dpo']:.2f}"
        weights = f"{rec['weights_mb'] / 1024:.1f}" if "weights_mb" in rec else "n/a"
        lines.append(
            f"| {name} | {rec['unet_dtype']} | {rec['encoder_dtype'] or '-'} | {rec['step_ms']:.0f} | {ratio} | "
            f"{rec['peak_mb'] / 1024:.1f} | {mem} | {weights} |"
        )
    ncp = data["results"].get("ncp-dpo", {})
    if ncp.get("ratio_to_latent_dpo") is not None:
        verdict = "met" if ncp["ratio_to_latent_dpo"] <= 1.5 else "NOT met"
        lines += ["", f"Goal ncp dpo <= 1.5x latent dpo step time: {ncp['ratio_to_latent_dpo']:.2f}x ({verdict})."]
    lines += [
        "",
        "latent-dpo and ncp-dpo are what `python -m ncp.train --mixed_precision bf16 --gradient_checkpointing` runs: "
        "for ncp the UNet weights stay fp32 and the NCP encoder runs in fp32 (in bf16 the PL differences are "
        "rounding noise, METHOD.md), so ncp-dpo also pays fp32 weights; ncp-dpo-enc-autocast (encoder in bf16, "
        "not usable for training) and ncp-dpo-bf16-weights / latent-dpo-fp32-weights separate the fp32 encoder, "
        "the weight dtype and NCP's extra encoder passes.",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        config, method, device, steps, warmup, result_path = sys.argv[2:8]
        rec = worker(config, method, device, int(steps), int(warmup))
        Path(result_path).write_text(json.dumps(rec))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (smoke)")
    parser.add_argument("--tiny", action="store_true", help="tiny SDXL-type UNet (CPU smoke); no docs by default")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all (--tiny: the two dpo)")
    parser.add_argument("--steps", type=int, help="timed steps per method (default 5; --tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; --tiny: 1)")
    parser.add_argument("--budget-s", type=float, default=220, help="start no method after this many seconds")
    parser.add_argument("--out", default=None, help="results JSON (default docs/benchmarks/step_cost_gpu.json)")
    parser.add_argument("--docs", default=None, help="markdown file for the section ('' = none)")
    parser.add_argument("--render", metavar="JSON", help="only write --out and --docs from this results JSON")
    args = parser.parse_args()
    default_out = ROOT / "docs" / "benchmarks" / "step_cost_gpu.json"
    methods = args.methods or (["latent-dpo", "ncp-dpo"] if args.tiny else list(METHODS))
    steps = args.steps if args.steps is not None else 2 if args.tiny else 5
    warmup = args.warmup if args.warmup is not None else 1 if args.tiny else 2
    if args.tiny:  # a smoke run never touches docs/
        out = Path(args.out or Path(tempfile.gettempdir()) / "step_cost_gpu_tiny.json")
        docs = args.docs or ""
    else:
        out = Path(args.out or default_out)
        docs = str(ROOT / "docs" / "BENCHMARKS.md") if args.docs is None else args.docs
    if args.render:
        data = add_ratios(json.loads(Path(args.render).read_text()))
    else:
        config = "tiny" if args.tiny else "sdxl-full"
        data = run_all(config, args.device, methods, steps, warmup, args.budget_s, out)
    write_json(data, out)
    if docs:
        write_section(Path(docs), "step_cost_gpu", render(data))
    print(render(data), flush=True)
    print(f"wrote {out}" + (f" and {docs}" if docs else ""), flush=True)


if __name__ == "__main__":
    main()
