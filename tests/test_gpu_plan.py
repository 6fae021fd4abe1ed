"""The GPU memory plan (jobs/gpu_plan.py): a pure function of memory figures, checked for the card sizes a Space
offers (24, 48 and 80 GB), the overrides, the trainer options it emits (parsed by ncp.train's own parser), and the
training size that keeps a round on the served images' SDXL micro-conditioning."""

from __future__ import annotations

import io

import pytest
import torch

from jobs.gpu_plan import (
    CONTEXT_GIB,
    app_plan,
    estimate_figures,
    plan_gpu,
    rungs,
    training_size_args,
)
from ncp.data import PreferencePair
from ncp.latents import encode_pairs
from ncp.memory import CardInfo, model_footprint
from ncp.pipelines import build_tiny_sdxl, encode_prompts
from ncp.serving import GenerationService, SamplingConfig
from ncp.train import build_parser, config_from_args

CARDS_GB = (24, 48, 80)  # nominal sizes: 24 GB is 22.4 GiB


def gib(gb: float) -> float:
    return gb * 1e9 / 2**30


SDXL = estimate_figures(None, 1024, "ncp", lora_rank=8)


@pytest.mark.parametrize("gb", CARDS_GB)
def test_a_plan_fits_its_budget_and_keeps_the_effective_batch(gb: int) -> None:
    plan = plan_gpu(SDXL, card_gib=gib(gb), batch_size=8, card=f"{gb} GB")
    r = plan.rung
    assert plan.fits and r is not None and r.micro_batch * r.accumulation == 8
    if plan.mode == "shared":
        assert plan.serve_gib + plan.train_gib <= plan.budget_gib
    else:  # alone on the card: the serving weights are off it, its process keeps a context
        assert plan.train_gib <= plan.budget_gib
        assert plan.train_gib == pytest.approx(r.gib(SDXL) + CONTEXT_GIB)
    assert plan.summary().startswith(plan.mode) and len(plan.reasons) >= 4


def test_sdxl_on_the_three_cards() -> None:
    """24 GB: the round cannot share the card, so it trains alone at the leanest options; 48 GB: beside serving with
    checkpointing; 80 GB: beside serving without it (faster)."""
    small, mid, big = (plan_gpu(SDXL, card_gib=gib(gb), batch_size=8) for gb in CARDS_GB)
    assert small.mode == "exclusive" and small.pauses_generation
    assert small.rung == rungs(8, "bf16")[-1]  # 1 pair x 8 accumulation, checkpointing, bf16
    assert "trains alone" in " ".join(small.reasons)
    assert mid.mode == "shared" and mid.rung.checkpointing and mid.rung.precision == "bf16"
    assert big.mode == "shared" and not big.rung.checkpointing
    assert mid.train_args()[-1] == "--gradient-checkpointing"
    assert "--gradient-checkpointing" not in big.train_args()


def test_more_memory_never_makes_the_plan_leaner() -> None:
    ladder = rungs(8, "bf16")
    previous_mode, previous_index = "exclusive", len(ladder)
    for gb in range(20, 200, 4):
        plan = plan_gpu(SDXL, card_gib=gib(gb), batch_size=8)
        index = ladder.index(plan.rung)
        if plan.mode == previous_mode:
            assert index <= previous_index, f"{gb} GB chose a leaner rung than a smaller card"
        assert not (previous_mode == "shared" and plan.mode == "exclusive"), f"{gb} GB went back to exclusive"
        previous_mode, previous_index = plan.mode, index


def test_auto_goes_exclusive_only_when_sharing_cannot_fit() -> None:
    for gb in range(16, 160, 2):
        plan = plan_gpu(SDXL, card_gib=gib(gb), batch_size=8)
        leanest = rungs(8, "bf16")[-1].gib(SDXL)
        assert (plan.mode == "exclusive") == (SDXL.serve_gib + leanest > plan.budget_gib)


def test_overrides_and_cards_too_small() -> None:
    forced = plan_gpu(SDXL, card_gib=gib(80), batch_size=8, requested="exclusive")
    assert forced.mode == "exclusive" and forced.fits and forced.requested == "exclusive"
    shared = plan_gpu(SDXL, card_gib=gib(80), batch_size=8)
    assert forced.rung.micro_batch > shared.rung.micro_batch  # alone, the round takes larger micro-batches
    cramped = plan_gpu(SDXL, card_gib=gib(24), batch_size=8, requested="shared")
    assert cramped.mode == "shared" and not cramped.fits and "out-of-memory" in cramped.reasons[-1]
    assert "may not fit" in cramped.summary()
    tiny_card = plan_gpu(SDXL, card_gib=gib(16), batch_size=8)
    assert tiny_card.mode == "exclusive" and not tiny_card.fits
    no_bf16 = plan_gpu(SDXL, card_gib=gib(24), batch_size=8, bf16=False)  # e.g. a T4: fp16 autocast
    assert no_bf16.rung.precision == "fp16"
    for bad in ({"requested": "sometimes"}, {"batch_size": 0}, {"card_gib": -1.0}):
        kwargs = {"card_gib": gib(24), "batch_size": 8, **bad}
        with pytest.raises(ValueError):
            plan_gpu(SDXL, **kwargs)


def test_no_gpu_plans_for_the_cpu() -> None:
    plan = plan_gpu(SDXL, card_gib=None, batch_size=8)
    assert plan.device == "cpu" and plan.mode == "shared" and plan.train_args() == ()
    paused = plan_gpu(SDXL, card_gib=None, batch_size=8, requested="exclusive")
    assert paused.mode == "exclusive" and paused.pauses_generation


def test_the_trainer_takes_the_plans_options_over_the_rounds_batch() -> None:
    """The round's command has `--batch-size 8` before the plan's options: the later ones win, and every option
    exists in ncp.train (parsed by its own parser into its TrainConfig)."""
    plan = plan_gpu(SDXL, card_gib=gib(24), batch_size=8)
    base = ["--model", "m", "--data", "d", "--out", "o", "--batch-size", "8"]
    config = config_from_args(build_parser().parse_args([*base, *plan.train_args(), "--resolution", "768"]))
    assert (config.batch_size, config.gradient_accumulation) == (1, 8)
    assert config.gradient_checkpointing and config.mixed_precision == "bf16" and config.resolution == 768


def test_footprint_counts_the_saved_pipeline(tmp_path) -> None:
    pipe = build_tiny_sdxl()
    pipe.save_pretrained(tmp_path / "tiny")
    fp = model_footprint(tmp_path / "tiny")
    assert fp is not None and fp.sdxl and fp.native_px == 64
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert fp.params[name] == sum(p.numel() for p in getattr(pipe, name).parameters()), name
    assert model_footprint(tmp_path / "missing") is None
    card = CardInfo("test card", gib(24), True)
    plan, args = app_plan(
        str(tmp_path / "tiny"), card, width=None, height=None, space="ncp", batch_size=8, lora_rank=8
    )
    assert plan.mode == "shared" and plan.rung == rungs(8, "bf16")[0]  # a tiny model: the cheapest options
    assert args == plan.train_args() and "native" in plan.reasons[-1]


def test_training_size_args() -> None:
    assert training_size_args(None, None, 1024)[0] == ()
    assert training_size_args(1024, 1024, 1024)[0] == ()
    assert training_size_args(768, 768, 1024)[0] == ("--resolution", "768")
    args, note = training_size_args(1152, 896, 1024)
    assert args == ("--resolution", "896") and "crop" in note


def test_rounds_train_on_the_served_images_micro_conditioning() -> None:
    """Served at 32 px by a 64-px tiny SDXL: the plan's `--resolution 32` makes each pair's time ids exactly the
    ones the pipeline generated the images with; the trainer's native default (64) would not."""
    pipe = build_tiny_sdxl()
    service = GenerationService(pipe, "tiny-sdxl", SamplingConfig(steps=2, width=32, height=32), lora_rank=8)
    a, b = service.generate("a red circle", [1, 2])
    _, args = app_plan("not-a-local-model", None, width=32, height=32, space="ncp", batch_size=8, lora_rank=8)
    base = ["--model", "m", "--data", "d", "--out", "o"]
    resolution = config_from_args(build_parser().parse_args([*base, *args])).resolution
    pair = PreferencePair("a red circle", a.png, b.png, (a.height, a.width), (b.height, b.width))
    encoded = encode_pairs([pair], pipe.vae, resolution=resolution, model_key="tiny")[0]
    cond = encode_prompts(pipe, ["a red circle"])
    generated = pipe._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), dtype=torch.float32, text_encoder_projection_dim=cond.pooled.shape[-1]
    )
    assert torch.equal(encoded.time_ids, generated[0])
    assert tuple(encoded.chosen.shape[-2:]) == (8, 8)  # the served latents, not the native 16 x 16
    native = encode_pairs([pair], pipe.vae, resolution=64, model_key="tiny")[0]
    assert not torch.equal(native.time_ids, generated[0])
    assert io.BytesIO(a.png).getbuffer().nbytes > 0 and a.scheduler == type(pipe.scheduler).__name__


def test_settings_read_the_plan_and_the_sampler() -> None:
    from jobs.settings import config_from_env

    sdxl = config_from_env({"NCP_GPU_PLAN": "exclusive", "NCP_MODEL": "/models/sdxl"})
    assert sdxl.gpu_plan == "exclusive" and sdxl.sampling.scheduler == "dpmpp-2m"
    shapes = config_from_env({})
    assert shapes.gpu_plan == "auto" and shapes.sampling.scheduler == "model"  # the shapes model's tuned sampler
    assert config_from_env({"NCP_SCHEDULER": "model", "NCP_MODEL": "/m"}).sampling.scheduler == "model"
    with pytest.raises(ValueError, match="NCP_GPU_PLAN"):
        config_from_env({"NCP_GPU_PLAN": "half"})
    with pytest.raises(ValueError, match="scheduler"):
        config_from_env({"NCP_SCHEDULER": "ddim"})


def test_the_fast_sampler_and_the_worker_s_device_calls(tmp_path) -> None:
    from ncp.generation_worker import GenerationWorker

    pipe = build_tiny_sdxl()
    service = GenerationService(pipe, "tiny", SamplingConfig(steps=2, scheduler="dpmpp-2m"), lora_rank=8)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler" and pipe.scheduler.config.use_karras_sigmas
    assert service.generate("a red circle", [0])[0].scheduler == "DPMSolverMultistepScheduler"  # in the lineage
    assert service.card_info() is None and service.release_device() == 0.0 == service.restore_device()  # CPU
    pipe.save_pretrained(tmp_path / "tiny")
    worker = GenerationWorker(str(tmp_path / "tiny"), "tiny", SamplingConfig(steps=2), lora_rank=8, device="cpu")
    try:
        assert worker.card_info() is None and worker.release_device() == 0.0 == worker.restore_device()
    finally:
        worker.close()
