"""SDXL at full size on one GPU, as the Space runs it: pairs served while a round trains, the hot-swap, and the GPU
plan (jobs/gpu_plan.py) on 24, 48 and 80 GB cards.

    python bench/sdxl_space.py --device cuda                 # < 8 min on an H200: docs/benchmarks/sdxl_space.json
                                                             # and the docs/BENCHMARKS.md section
    python bench/sdxl_space.py --device cuda --out /tmp/s.json --docs ''     # results only
    python bench/sdxl_space.py --render /tmp/s.json          # results fetched from a GPU machine -> JSON + docs here
    python bench/sdxl_space.py --tiny --device cpu           # CPU smoke (~1 min; tests/test_bench_sdxl_space.py)

Setup: the SDXL base pipeline built from its configs with random weights (no download): UNet (2567M), both CLIP text
encoders, the VAE (force_upcast, as the stock SDXL VAE: decoded in fp32), served in fp16 by the arena's own
`GenerationService` (DPM-Solver++ 2M Karras, 20 steps, guidance 5, 1024x1024, LoRA slots of rank 8 warmed) and its
`PairPrefetcher`. For each card size the process is capped with `torch.cuda.set_per_process_memory_fraction` (24 GB =
22.4 GiB), the plan is computed from the SDXL figures, and one round runs as the app runs it (`jobs.gpu_round.
RoundPause`): "shared" trains beside generation, "exclusive" pauses it and moves the serving weights off the card.
The round is the trainer's own NCP-DPO step (`ncp.trainer._prepare_models` + `pair_loss`, fp32 UNet, LoRA r8) on a
second UNet with its own bf16 text encoders, with the plan's options (micro-batch, accumulation, checkpointing,
autocast), `--micro-steps` timed micro-steps after one warm-up; "round for 200 steps" = 200 x accumulation x the
median micro-step (an extrapolation). A simulated rater takes a pair every `--rater-period-s` from the queue
(ratings_per_pair 1: every showing uses a pair); a request that found no ready pair counts as a wait. The round's
adapter is then hot-swapped into the serving pipeline (the stall = the time the swap holds the pipeline lock).
Serving and training share one process here (threads) so that one memory cap covers both; the app runs them in two.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.docs import write_section  # noqa: E402
from bench.sdxl_space_models import Round, build_pipeline  # noqa: E402
from bench.sdxl_space_report import BATCH, LORA_RANK, render  # noqa: E402 - the round: the loop's defaults

CARDS_GB = (24, 48, 80)

PROMPTS = ("a red fox in the snow", "a lighthouse at dusk, oil painting", "a bowl of ramen, studio photo")


def _log(msg: str) -> None:
    print(f"[sdxl_space] {msg}", file=sys.stderr, flush=True)


# -- the serving side -------------------------------------------------------------------------------------------------
def timed_service(pipe, sampling):  # noqa: ANN001, ANN201
    """The arena's GenerationService, recording each pair's wall time (start, seconds)."""
    from ncp.serving import GenerationService

    class Timed(GenerationService):
        pairs: list[tuple[float, float]] = []

        def make_pair(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.monotonic()
            pair = super().make_pair(*args, **kwargs)
            self.pairs.append((t0, time.monotonic() - t0))
            return pair

    service = Timed(pipe, "sdxl-random", sampling, lora_rank=LORA_RANK)
    service.pairs = []
    return service


class Rater(threading.Thread):
    """Takes a pair every `period` s; a request that found no ready pair is a wait (GenerationPaused: refused)."""

    def __init__(self, prefetcher, period: float) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.prefetcher, self.period = prefetcher, period
        self.stop = threading.Event()
        self.requests, self.waits, self.refused, self.max_wait_s = 0, 0, 0, 0.0

    def run(self) -> None:
        from ncp.serving import GenerationPaused

        while not self.stop.wait(self.period):
            self.requests += 1
            ready_before = self.prefetcher.qsize() > 0 or self.prefetcher.bridge_size() > 0
            t0 = time.monotonic()
            try:
                self.prefetcher.get(timeout=120.0)
            except GenerationPaused:
                self.refused += 1
                continue
            wait = time.monotonic() - t0
            self.max_wait_s = max(self.max_wait_s, wait)
            self.waits += not ready_before

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "waited": self.waits,
            "refused": self.refused,
            "max_wait_s": self.max_wait_s,
        }


def run_card(gb: int, ctx: SimpleNamespace, args: argparse.Namespace) -> dict:
    import torch

    from jobs.gpu_plan import plan_gpu
    from jobs.gpu_round import RoundPause
    from ncp.prefetch import PairPrefetcher

    dev, cuda = ctx.device, ctx.device.type == "cuda"
    card_gib = gb * 1e9 / 2**30
    rec: dict = {"card_gb": gb, "card_gib": card_gib}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, card_gib / ctx.total_gib), dev)
        torch.cuda.reset_peak_memory_stats(dev)
    plan = plan_gpu(ctx.figures, card_gib=card_gib, batch_size=BATCH, bf16=ctx.bf16, card=f"{gb} GB")
    rec["plan"] = plan.as_dict()
    _log(f"{gb} GB: {plan.summary()}")
    service = ctx.service
    rnd = Round(args.tiny, dev, plan.rung, args.micro_steps, dict(service.pipe.unet.config), ctx.px)
    prefetcher = PairPrefetcher(service, lambda rng: rng.choice(PROMPTS), lambda: [], size=args.queue, seed=gb)
    pause = RoundPause(plan, prefetcher, service, pace=lambda: 1 / args.rater_period_s, ratings_per_pair=1,
                       base_size=args.queue, expected_round_s=args.expected_round_s, fill_wait_s=args.fill_wait_s)  # fmt: skip
    rec["queue_target"] = pause.resize()
    prefetcher.start()
    deadline = time.monotonic() + args.fill_wait_s
    while prefetcher.qsize() < rec["queue_target"] and time.monotonic() < deadline:
        time.sleep(0.1)
    rater = Rater(prefetcher, args.rater_period_s)
    rater.start()
    t_start = time.monotonic()
    pause.before_round()
    rec["queued_at_round_start"] = prefetcher.qsize()
    worker = threading.Thread(target=rnd.run)
    worker.start()
    worker.join()
    t_end = time.monotonic()
    pause.after_round()
    rec.update(rnd.record)
    rec["round_window_s"] = t_end - t_start
    rec["pause"] = pause.last
    if cuda:
        rec["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2**30
    during = [s for t0, s in service.pairs if t_start <= t0 < t_end]
    rec["pair_s_during_round"] = during
    # The round's adapter goes live the way a promotion does it: registered, then hot-swapped under the lock.
    if rnd.unet is not None and "error" not in rnd.record:
        from diffusers import StableDiffusionXLPipeline

        from ncp.adapters import LoraSettings, save_adapter

        try:
            folder = save_adapter(StableDiffusionXLPipeline, rnd.unet, ctx.tmp / f"round-{gb}", LoraSettings(
                                  LORA_RANK, LORA_RANK))  # fmt: skip
            service.register_version(f"v{gb}", folder)
            rec["swap_stall_s"] = service.swap_adapter(f"v{gb}")
            prefetcher.flush(bridge=plan.pauses_generation)
        except Exception as err:  # noqa: BLE001 - recorded with the card's other results
            rec["swap_error"] = f"{type(err).__name__}: {err}"[:800]
    rnd.unet = None
    refill_deadline = time.monotonic() + args.fill_wait_s
    while prefetcher.qsize() < min(2, rec["queue_target"]) and time.monotonic() < refill_deadline:
        time.sleep(0.1)
    rec["refilled"] = prefetcher.qsize()
    rater.stop.set()
    rater.join(timeout=150)
    prefetcher.stop()
    rec["raters"] = rater.summary()
    rec["raters_waited"] = bool(rater.waits or rater.refused)
    return rec


def run(args: argparse.Namespace) -> dict:
    import diffusers
    import torch

    from jobs.gpu_plan import estimate_figures
    from ncp.adapters import LoraSettings
    from ncp.memory import cuda_card
    from ncp.serving import SamplingConfig

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    started = time.monotonic()
    card = cuda_card(args.device) if cuda else None
    data: dict = {
        "benchmark": "sdxl_space",
        "tiny": args.tiny,
        "machine": {
            "device": card.name if card else platform.processor() or "cpu",
            "total_gib": card and card.total_gib,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },  # fmt: skip
        "settings": {k: v for k, v in vars(args).items() if k not in ("render", "docs", "out")},
        "cards": {},
    }
    t0 = time.perf_counter()
    pipe = build_pipeline(args.tiny, dev)
    data["build_s"] = time.perf_counter() - t0
    size = 64 if args.tiny else 1024
    sampling = SamplingConfig(steps=args.steps, guidance=5.0, width=size, height=size, scheduler="dpmpp-2m")
    service = timed_service(pipe, sampling)
    service.warm_slots(LoraSettings().target_modules, LORA_RANK)
    rng = __import__("random").Random(0)
    service.make_pair(PROMPTS[0], "on_policy", rng)  # warm-up (kernels, allocator)
    service.pairs.clear()
    for i in range(args.idle_pairs):
        service.make_pair(PROMPTS[i % len(PROMPTS)], "on_policy", rng)
    data["idle_pair_s"] = [s for _, s in service.pairs]
    if cuda:
        data["serve_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        data["serve_weights_gib"] = torch.cuda.memory_allocated(dev) / 2**30
    _log(f"built in {data['build_s']:.0f} s; idle pair {statistics.median(data['idle_pair_s']):.2f} s")
    # The plan's figures are SDXL's at 1024 px in both modes: the tiny smoke takes the same decisions and code paths.
    ctx = SimpleNamespace(device=dev, service=service, px=size, figures=estimate_figures(None, 1024, "ncp", LORA_RANK),
                          bf16=card.bf16 if card else True, total_gib=card.total_gib if card else 0.0,
                          tmp=Path(tempfile.mkdtemp(prefix="sdxl-space-")))  # fmt: skip
    for gb in args.cards:
        left = args.budget_s - (time.monotonic() - started)
        if left < 45:
            data["cards"][str(gb)] = {"card_gb": gb, "error": f"skipped: time budget of {args.budget_s:.0f} s spent"}
            continue
        try:
            data["cards"][str(gb)] = run_card(gb, ctx, args)
        except Exception as err:  # noqa: BLE001 - one card's failure is recorded; the others go on
            data["cards"][str(gb)] = {"card_gb": gb, "error": f"{type(err).__name__}: {err}"[:1500]}
            _log(traceback.format_exc()[-2000:])
        if args.out_partial:
            Path(args.out_partial).write_text(json.dumps(data, indent=2, default=str))
    data["wall_s"] = time.monotonic() - started
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny SDXL pipeline (CPU smoke); no docs by default")
    p.add_argument("--cards", nargs="+", type=int, default=list(CARDS_GB), help="card sizes in GB to emulate")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; --tiny: 2)")
    p.add_argument("--micro-steps", type=int, default=None, help="timed trainer micro-steps (default 3; --tiny: 2)")
    p.add_argument("--idle-pairs", type=int, default=None, help="pairs timed with no round (default 3; --tiny: 2)")
    p.add_argument("--queue", type=int, default=4, help="the prefetch queue's base size")
    p.add_argument("--rater-period-s", type=float, default=None, help="seconds between rater requests (4; tiny 0.5)")
    p.add_argument("--expected-round-s", type=float, default=None, help="round length the queue is sized for")
    p.add_argument("--fill-wait-s", type=float, default=60.0, help="longest wait for the queue to fill")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no card after this many seconds")
    p.add_argument("--out", default=None, help="results JSON (default docs/benchmarks/sdxl_space.json)")
    p.add_argument("--docs", default=None, help="markdown file for the section ('' = none)")
    p.add_argument("--render", metavar="JSON", help="only write --out and --docs from this results JSON")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.steps = args.steps or (2 if tiny else 20)
    args.micro_steps = args.micro_steps or (2 if tiny else 3)
    args.idle_pairs = args.idle_pairs or (2 if tiny else 3)
    args.rater_period_s = args.rater_period_s or (0.5 if tiny else 4.0)
    args.expected_round_s = args.expected_round_s or (3.0 if tiny else 30.0)
    if tiny:  # a smoke run never touches docs/
        out, docs = Path(args.out or Path(tempfile.gettempdir()) / "sdxl_space_tiny.json"), args.docs or ""
    else:
        out = Path(args.out or ROOT / "docs" / "benchmarks" / "sdxl_space.json")
        docs = str(ROOT / "docs" / "BENCHMARKS.md") if args.docs is None else args.docs
    args.out_partial = str(out)
    if args.render:
        data = json.loads(Path(args.render).read_text())
    else:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print(
                "bench/sdxl_space.py measures SDXL on a GPU, and torch sees no CUDA device here (CUDA build: "
                f"{torch.version.cuda or 'none'}). Run it on a GPU machine: `python bench/sdxl_space.py --device "
                "cuda`; or the CPU smoke of the same code: `python bench/sdxl_space.py --tiny --device cpu`.",
                file=sys.stderr,
            )
            return 2
        if not tiny and not args.device.startswith("cuda"):
            print("The full-size run needs --device cuda (on a CPU use --tiny).", file=sys.stderr)
            return 2
        torch.set_num_threads(1 if tiny else torch.get_num_threads())
        out.parent.mkdir(parents=True, exist_ok=True)
        data = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))
    if docs:
        write_section(Path(docs), "sdxl-space", render(data))
    print(render(data), flush=True)
    print(f"wrote {out}" + (f" and {docs}" if docs else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
