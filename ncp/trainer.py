"""The preference trainer: LoRA on a diffusers UNet, one of six methods (objective dpo|cpo|sft x space latent|ncp),
an accelerate loop (gradient accumulation, mixed precision, several processes), resumable and deterministic.

Run it through the CLI (`python -m ncp.train --help`, or `accelerate launch -m ncp.train ...`); in Python:
    result = train(TrainConfig(objective="dpo", space="ncp", max_steps=200), model="models/shapes",
                   data=["data/snapshot"], out="adapters/v7")

Per step (METHOD.md): each pair draws ONE timestep t, ONE noise eps (and for NCP one variance noise z), SHARED by its
chosen and rejected latents; `ncp.perception.per_sample_errors` measures policy (and reference) errors of the 2B
images and `ncp.objectives.preference_loss` turns them into the loss (`ncp.losses.pair_loss`). Randomness (data order, t, eps, z) is a pure
function of (seed, micro-step, process index), so a resumed run repeats an uninterrupted one exactly.

Output: `out/` = the diffusers LoRA (`ncp.adapters.save_adapter`, alpha kept) + `metrics.json`, written into a
temporary sibling folder and renamed into place at the very end: a killed or failed run never leaves an adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ncp.adapters import (
    add_lora,
    add_reference_adapter,
    load_adapter_weights,
    lora_parameters,
    reference_mode,
    save_adapter,
    unwrap_unet,
)
from ncp.checkpoints import ProgressLog, atomic_dir, finite_json, load_checkpoint, resume_path, save_checkpoint
from ncp.data import PreferencePair, coin_flip, load_pairs, require_pairs  # noqa: F401 - coin_flip re-exported
from ncp.latents import LatentCache, PreferenceDataset, collate_pairs, encode_pairs
from ncp.losses import pair_loss, uncond_drift  # noqa: F401 - re-exported: `from ncp.trainer import pair_loss`
from ncp.perception import random_encoder
from ncp.pipelines import encode_prompts, is_sdxl, load_pipeline, sdxl_time_ids, uncond_conditioning
from ncp.train_config import TrainConfig  # noqa: F401 - re-exported: `from ncp.trainer import TrainConfig`

logger = logging.getLogger(__name__)
METRIC_KEYS = ("loss", "implicit_acc", "reward_margin", "chosen_err", "rejected_err")


class TrainingError(RuntimeError):
    """A run that stopped for a reason the user must act on (the message says which); no adapter was written."""


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns: the adapter folder, steps done, why it stopped, and metrics.json's content (main
    process; empty on the others)."""

    out: Path
    steps: int
    stop_reason: str
    metrics: dict[str, Any]


# ------------------------------------------------------------------------------------------- determinism helpers


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> 1)


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 7))).tolist())


def batch_indices(n: int, batch_size: int, micro_step: int, seed: int, num_processes: int, process: int) -> list[int]:
    """Pair indices of one process for global micro-step `micro_step`: an endless stream of seeded per-epoch
    permutations, cut into global batches of batch_size x num_processes, each process taking its own slice."""
    start = (micro_step * num_processes + process) * batch_size
    return [_permutation(n, seed, pos // n)[pos % n] for pos in range(start, start + batch_size)]


@torch.no_grad()
def probe_eps(pipe: Any, prompt: str, *, seed: int = 0, timestep: int = 500, side: int = 8) -> torch.Tensor:
    """The UNet's eps on a fixed (1, C, side, side) input: recorded in metrics.json so anyone can check that a loaded
    adapter reproduces the trainer's own outputs (a lost alpha changes it)."""
    unet = unwrap_unet(pipe.unet)
    param = next(unet.parameters())
    x = torch.randn((1, unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(seed))
    cond = encode_prompts(pipe, [prompt])
    res = side * pipe.vae_scale_factor
    ids = sdxl_time_ids((res, res), (0, 0), (res, res), 1) if is_sdxl(pipe) else None
    t = torch.tensor([timestep], device=param.device)
    ehs = cond.encoder_hidden_states.to(param.dtype)
    added = cond.to(dtype=param.dtype).added_cond_kwargs(ids)
    return unet(x.to(param.device, param.dtype), t, ehs, added_cond_kwargs=added).sample.float().cpu()


# ------------------------------------------------------------------------------------------- progress and checkpoints


def _vae_key(model: str, vae: torch.nn.Module) -> str:
    """Identity of the VAE for the latent cache: the model name plus a digest of the VAE weights."""
    digest = hashlib.sha256(model.encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- the loop


def lr_factor(config: TrainConfig, step: int) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear warm-up, then constant or decayed to 0 at max_steps."""
    warm = config.lr_warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    if config.lr_schedule == "constant":
        return 1.0
    left = max(0.0, 1.0 - (step - warm) / max(1, config.max_steps - warm))  # 1 at the end of warm-up, 0 at max_steps
    return left if config.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * (1.0 - left)))


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.adam_8bit:
        import bitsandbytes as bnb  # checked in TrainConfig.__post_init__

        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _prepare_models(pipe: Any, config: TrainConfig, accelerator: Accelerator) -> tuple[torch.nn.Module, list]:
    """Freeze everything, add (or continue) the LoRA, cast frozen weights to the autocast dtype.

    The VAE stays fp32 (SDXL's overflows in fp16). For space="ncp" the UNet stays fp32 too: the NCP encoder runs in
    fp32 (perception's `encoder_fp32`), since PL differences of about c_t^2 of the features drown in bf16 rounding;
    autocast still runs its passes in half precision."""
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    for name in ("text_encoder", "text_encoder_2") + (("unet",) if config.space == "latent" else ()):
        if getattr(pipe, name, None) is not None and weight_dtype != torch.float32:
            getattr(pipe, name).to(accelerator.device, dtype=weight_dtype)
    unet = pipe.unet
    add_lora(unet, config.lora_settings())
    if config.init_adapter:
        load_adapter_weights(unet, config.init_adapter)
        logger.info("Continuing from adapter %s.", config.init_adapter)
        if config.reference == "init":  # a frozen copy is the policy reference (ncp.adapters.policy_reference_mode)
            add_reference_adapter(unet, config.lora_settings(), config.init_adapter)
    params = lora_parameters(unet, "default")
    for p in params:  # trainable LoRA weights stay fp32 under mixed precision
        p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, params


def train(
    config: TrainConfig,
    *,
    model: str,
    data: Any,
    out: str | Path,
    accelerator: Accelerator | None = None,
    show_progress: bool = True,
    include_eval: bool = False,
) -> TrainResult:
    """Train a LoRA on the preference pairs in `data` and write it to `out` (must not exist or be empty).

    `data`: a snapshot folder (its train.parquet; eval.parquet too only with `include_eval`), Parquet file(s), a
    folder of shards or a `datasets` folder (`ncp.data.parquet_files`). The data is read and checked before any model
    is loaded: unusable data raises `ncp.data.DataError` (one line: file, problem, fix). Raises TrainingError on a
    non-finite loss (no adapter written)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; adapter versions are immutable, pass a new --out folder.")
    # Data first: a bad file must cost seconds, not a model load (minutes for SDXL).
    pairs, report = load_pairs(
        data, keep_ties=config.keep_ties, absolute_winners=config.absolute_winners, include_eval=include_eval
    )
    require_pairs(report, keep_ties=config.keep_ties)
    # cpu=True on a machine without a GPU lets `accelerate launch --multi_gpu` / torchrun start a gloo process group
    # (MULTI_CPU); accelerate's `--cpu` launcher alone starts only one process.
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = accelerator or Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation, mixed_precision=config.mixed_precision, cpu=no_gpu
    )
    main = accelerator.is_main_process
    progress = ProgressLog(config.progress_file if main else None)
    started, step = time.monotonic(), 0
    try:
        set_seed(config.seed)  # the same LoRA init on every process
        pipe = load_pipeline(model, dtype=torch.float32, device=accelerator.device)
        sdxl = is_sdxl(pipe)
        resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        flipped = 0
        if config.coin_flip_labels:  # measures how much "gain" the machinery makes from labels that mean nothing
            shuffled = coin_flip(pairs, config.seed)
            flipped = sum(a is not b for a, b in zip(pairs, shuffled, strict=True))
            pairs = shuffled
        if config.keep_ties and any(p.is_tie for p in pairs):
            logger.warning("keep_ties: tie pairs are trained as ordered pairs (jpg_0 as chosen).")
        with accelerator.main_process_first():  # the main process fills the disk cache, the others read it
            cache = LatentCache(config.latent_cache_dir or None)
            encoded = encode_pairs(
                pairs, pipe.vae, resolution=resolution, model_key=_vae_key(model, pipe.vae), cache=cache
            )
        dataset = PreferenceDataset(encoded)
        unet, params = _prepare_models(pipe, config, accelerator)
        optimizer = _optimizer(params, config)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, config))
        # DDP (several processes) wraps the UNet; perception unwraps it for the encoder (frozen reference weights).
        unet, optimizer = accelerator.prepare(unet, optimizer)
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        uncond = uncond_conditioning(pipe) if config.uncond_weight or config.train_guidance != 1.0 else None
        encoder = random_encoder(unet, config.seed) if config.random_encoder else None  # the NCP encoder's control
        ckpt_dir = Path(config.checkpoint_dir or f"{out}.checkpoints")
        resumed = resume_path(config, ckpt_dir)
        if resumed is not None:
            step = load_checkpoint(resumed, unet, optimizer, lr_sched, config, accelerator.scaler)
            logger.info("Resumed from %s at step %d.", resumed, step)
        n_proc, accum = accelerator.num_processes, config.gradient_accumulation
        progress.write(
            "start",
            step=step,
            max_steps=config.max_steps,
            pairs=len(dataset),
            data=report.to_dict(),
            num_processes=n_proc,
            effective_batch=config.batch_size * accum * n_proc,
            resumed_from=str(resumed) if resumed else None,
            config=dataclasses.asdict(config),
        )
        bar = tqdm(total=config.max_steps, initial=step, disable=not (show_progress and main), desc="train")
        history: list[dict[str, float]] = []
        # With the empty-prompt hold, its drift is logged too: the one sign that the hold is doing its job.
        keys = METRIC_KEYS + (("uncond_drift",) if config.uncond_weight else ())
        stop_reason = "max_steps"
        while step < config.max_steps:
            sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
            for micro in range(accum):
                g = step * accum + micro
                idx = batch_indices(len(dataset), config.batch_size, g, config.seed, n_proc, accelerator.process_index)
                batch = collate_pairs([dataset[i] for i in idx])
                generator = torch.Generator().manual_seed(_mix(config.seed, g, accelerator.process_index))
                with accelerator.accumulate(unet):
                    cond = encode_prompts(pipe, list(batch.prompts))
                    with accelerator.autocast():
                        result = pair_loss(
                            unet, scheduler, batch, cond, config, generator, sdxl=sdxl, uncond=uncond, encoder=encoder
                        )
                    # One collective per micro-step: the metrics averaged over processes, NaN if any process has NaN.
                    values = torch.tensor([result.metrics[k] for k in keys] + [0.0], dtype=torch.float64)
                    if micro == accum - 1 and config.max_seconds and time.monotonic() - started > config.max_seconds:
                        values[-1] = 1.0
                    values = accelerator.reduce(values.to(accelerator.device), reduction="mean").cpu()
                    if not math.isfinite(values[0].item()):
                        raise TrainingError(
                            f"Loss became {values[0].item()} at step {step + 1} (micro-step {micro}); stopping, "
                            "no adapter written. Check the base model for NaN weights, lower --lr or --beta, "
                            "or use fp32/bf16."
                        )
                    sums += values
                    accelerator.backward(result.loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        lr_sched.step()
                        optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = {k: (sums[i] / accum).item() for i, k in enumerate(keys)}
            history.append(metrics)
            lr = lr_sched.get_last_lr()[0]
            progress.write(
                "step", step=step, loss=metrics["loss"], metrics=metrics, lr=lr, seconds=time.monotonic() - started
            )
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['implicit_acc']:.2f}")
            if sums[-1] > 0:
                stop_reason = "max_seconds"
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
                if main:
                    save_checkpoint(ckpt_dir, step, unet, optimizer, lr_sched, config, accelerator.scaler)
                accelerator.wait_for_everyone()
        bar.close()
        # Every process must hold the same LoRA weights (DDP averages gradients); recorded as evidence in metrics.
        checksum = torch.stack([p.detach().double().abs().sum() for p in params]).sum().reshape(1)
        sums_all = accelerator.gather(checksum.to(accelerator.device)).cpu()
        run = {
            "steps": step,
            "stop_reason": stop_reason,
            "num_processes": n_proc,
            "effective_batch": config.batch_size * accum * n_proc,
            "replicas_in_sync": bool(torch.allclose(sums_all, sums_all[0], rtol=1e-6, atol=0)),
            "model": str(model),
            "init_adapter": config.init_adapter or None,
            "resumed_from": str(resumed) if resumed else None,
            "data": report.to_dict(),
            "labels_flipped": flipped,
            "config": dataclasses.asdict(config),
        }
        summary: dict[str, Any] = {}
        if main:
            summary = _finish(pipe, config, out, run, history, started)
            progress.write(
                "end",
                step=step,
                adapter=str(out),
                stop_reason=stop_reason,
                metrics=summary["final"],
                seconds=time.monotonic() - started,
            )
        accelerator.wait_for_everyone()
        return TrainResult(out, step, stop_reason, summary)
    except BaseException as err:
        progress.write("error", step=step, message=f"{type(err).__name__}: {err}", seconds=time.monotonic() - started)
        raise


def _finish(pipe: Any, config: TrainConfig, out: Path, run: dict, history: list[dict], started: float) -> dict:
    """Write the adapter + metrics.json atomically (main process); returns the metrics."""
    unet = unwrap_unet(pipe.unet)
    unet.eval()
    prompt = "a probe prompt"
    eps = probe_eps(pipe, prompt)
    with reference_mode(unet):
        base = probe_eps(pipe, prompt)
    tail = history[-10:]
    metrics = {
        **run,
        "seconds": time.monotonic() - started,
        "final": history[-1] if history else {},
        "mean_last_10": {k: float(np.mean([h[k] for h in tail])) for k in tail[-1]} if tail else {},
        "probe": {
            "prompt": prompt,
            "seed": 0,
            "timestep": 500,
            "side": 8,
            "eps": eps.flatten().tolist(),
            "delta_from_base_mean_abs": (eps - base).abs().mean().item(),
        },
    }
    metadata = {k: metrics[k] for k in ("model", "init_adapter", "data", "config", "steps")}

    def write(tmp: Path) -> None:
        save_adapter(pipe, unet, tmp, config.lora_settings(), metadata=finite_json(metadata))
        (tmp / "metrics.json").write_text(json.dumps(finite_json(metrics), indent=2))

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        out.rmdir()  # empty (checked at start)
    atomic_dir(out, write)
    logger.info("Wrote adapter %s after %d step(s) (%s).", out, run["steps"], run["stop_reason"])
    return metrics
