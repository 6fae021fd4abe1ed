"""Pretrain the shapes-world model from scratch on CPU: first the VAE, then the UNet and text encoder.

    python -m ncp.shapes.pretrain --out models/shapes-base --work runs/shapes-pretrain   # the shipped recipe
    python -m ncp.shapes.pretrain --init-vae models/shapes-base/vae ...  # reuse (and re-centre) a trained VAE

Resumable: state is checkpointed to `--work` every `--ckpt-every` steps and picked up on restart. Each checkpoint also
exports a loadable pipeline to `--work/latest` (so the model can be evaluated while training continues); the final
pipeline is written with `save_pretrained` to `--out`. Progress: a tqdm bar and `--work/log.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ncp.shapes.grammar import random_scene
from ncp.shapes.model import (
    IMAGE_SIZE,
    assemble_pipeline,
    build_text_encoder,
    build_unet,
    train_scheduler,
    write_tokenizer,
)
from ncp.shapes.pretrain_data import NOISY, lr_at, noisy_caption, parse_caption_noise, render_batch  # noqa: F401
from ncp.shapes.pretrain_vae import refit_decoder, train_vae
from ncp.shapes.render import render


def latent_cache(vae, args: argparse.Namespace, work: Path, dev: torch.device) -> dict:  # noqa: ANN001
    """`--cache-images` rendered scenes and their VAE latents, made once and kept in `work` (resumable).

    Rendering and encoding a 64-px batch costs twice the UNet step itself on this CPU; a fixed set of scenes (each with
    its own position and size jitter), seen a few times each, trains as well at a third of the wall time."""
    path = work / f"latents_{args.cache_images}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    rng = random.Random(args.seed + 4242)
    scenes, latents = [], []
    for _ in tqdm(range(0, args.cache_images, 64), desc="latent cache"):
        batch = [random_scene(rng, args.two_object_prob, held_out=False) for _ in range(64)]
        imgs = np.stack([render(sc, IMAGE_SIZE, rng, jitter=1.5) for sc in batch])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            latents.append(vae.encode(x.to(dev)).latents.cpu() * vae.config.scaling_factor)
        scenes += batch
    cache = {"scenes": scenes, "latents": torch.cat(latents)}
    torch.save(cache, work / "latents.tmp")
    (work / "latents.tmp").replace(path)
    return cache


def sample_timesteps(
    n: int, num_train: int, t_low: float, high_share: float, dev: torch.device, t_high: float = 1.0
) -> torch.Tensor:
    """Training timesteps: a `high_share` of the batch from the high-noise slice [t_low T, T), the rest from
    [0, t_high T) (t_high < 1: a stage on the low-noise steps only, an ablation in docs/research/shapes-layout.md).

    With t uniform the few samples where x_t no longer shows the layout carry tiny eps-gradients, and Adam's step
    is normalised by the much larger gradients of the low-noise samples: the model learns layout from x_t, never from
    the position words (docs/research/shapes-layout.md). Oversampling the high-noise slice is the sampling form of
    P2 weighting (Choi et al. 2022, "Perception Prioritized Training of Diffusion Models"): more of the update goes
    to the noise levels where content and layout are decided."""
    t = torch.randint(0, max(1, int(t_high * num_train)), (n,), device=dev)
    high = torch.rand(n, device=dev) < high_share
    lo = min(int(t_low * num_train), num_train - 1)
    return torch.where(high, torch.randint(lo, num_train, (n,), device=dev), t)


def train_unet(args: argparse.Namespace, work: Path, out: Path, log) -> None:
    from diffusers import AutoencoderTiny

    dev = torch.device(args.device)
    vae = AutoencoderTiny.from_pretrained(work / "vae").eval().requires_grad_(False).to(dev)
    tokenizer = write_tokenizer(work / "tokenizer")
    torch.manual_seed(args.seed)
    if args.init_model is not None:  # continue from a trained pipeline (its VAE was copied by train_vae)
        from transformers import CLIPTextModel

        from ncp.shapes.unet import PositionalUNet2DConditionModel

        text_encoder = CLIPTextModel.from_pretrained(args.init_model / "text_encoder").to(dev)
        unet = PositionalUNet2DConditionModel.from_pretrained(args.init_model / "unet").to(dev)
    else:
        text_encoder, unet = build_text_encoder(tokenizer).to(dev), build_unet().to(dev)
    noise = parse_caption_noise(args.caption_noise)
    # A frozen text encoder (as Stable Diffusion keeps CLIP frozen): noisy captions then reach only the UNet, whose
    # attention a LoRA can retune; trained on them, the encoder itself collapses the noised words (research/loop-plateau).
    text_encoder.requires_grad_(not args.freeze_text_encoder)
    params = list(unet.parameters()) + ([] if args.freeze_text_encoder else list(text_encoder.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = train_scheduler(args.beta_schedule)
    ckpt = work / "unet.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=dev)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    cache = latent_cache(vae, args, work, dev) if args.cache_images else None
    rng = random.Random(args.seed * 1000 + step)
    alphas_cumprod = sched.alphas_cumprod.to(dev)
    bar = tqdm(total=args.unet_steps, initial=step, desc="unet")
    t0 = time.time()
    while step < args.unet_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.lr)
        if cache is None:
            prompts, x = render_batch(rng, args.batch, args.two_object_prob, noise)
            with torch.no_grad():
                z0 = vae.encode(x.to(dev)).latents * vae.config.scaling_factor  # (B, 4, 16, 16)
        else:  # a random batch of the cached scenes, captions re-drawn (with their noise) every time
            idx = [rng.randrange(len(cache["scenes"])) for _ in range(args.batch)]
            z0 = cache["latents"][idx].to(dev)
            prompts = [
                noisy_caption(cache["scenes"][i], noise, rng) if noise else cache["scenes"][i].prompt for i in idx
            ]
        # Classifier-free guidance needs an unconditional model: drop 10% of prompts.
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        cond = text_encoder(ids.input_ids.to(dev))[0]  # (B, 24, 64)
        t = sample_timesteps(
            len(prompts), sched.config.num_train_timesteps, args.t_low, args.high_share, dev, args.t_high
        )
        eps = torch.randn_like(z0)
        if args.noise_offset:  # offset noise: a per-image, per-channel constant, so the model learns the image means
            eps = eps + args.noise_offset * torch.randn(z0.shape[0], z0.shape[1], 1, 1, device=dev)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        err = F.mse_loss(unet(zt, t, cond).sample, eps, reduction="none").mean(dim=(1, 2, 3))
        # eps-MSE = SNR x |x0 error|^2, so the weight w(t) below puts w * SNR on the x0 error. min-SNR-gamma (Hang et
        # al. 2023, eq. 6): w = min(SNR, g) / SNR. `--x0-floor` adds f / SNR: the x0 error then counts at least f at
        # every noise level, as in a v-prediction loss (an ablation in docs/research/shapes-layout.md; not shipped).
        snr = a.flatten() / (1 - a.flatten())
        if args.snr_gamma or args.x0_floor:
            gamma = args.snr_gamma or float("inf")
            err = err * (snr.clamp(max=gamma) + args.x0_floor) / snr
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(
                {
                    "stage": "unet",
                    "step": step,
                    "loss": loss.item(),
                    "lr": opt.param_groups[0]["lr"],
                    "s_per_step": (time.time() - t0) / 50,
                }
            )
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == args.unet_steps:
            state = {"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict()}
            torch.save({**state, "step": step}, work / "unet.tmp")
            (work / "unet.tmp").replace(ckpt)
            # Written aside and swapped in, so an evaluator never loads a half-written checkpoint.
            tmp = work / "latest.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            assemble_pipeline(unet, vae, text_encoder, tokenizer, args.beta_schedule).save_pretrained(tmp)
            (tmp / "step.txt").write_text(str(step))
            shutil.rmtree(work / "latest.old", ignore_errors=True)
            if (work / "latest").exists():
                (work / "latest").rename(work / "latest.old")
            tmp.rename(work / "latest")
    bar.close()
    assemble_pipeline(unet, vae, text_encoder, tokenizer, args.beta_schedule).to("cpu").save_pretrained(out)
    drop_source_paths(out)
    log({"stage": "unet", "done": True, "steps": step})


def drop_source_paths(folder: Path) -> None:
    """Remove `_name_or_path` from the saved components' configs: diffusers records the local folder a component
    was loaded from (a training work folder), which means nothing to whoever loads the published model."""
    for config in Path(folder).glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/shapes-base"), help="final pipeline folder")
    p.add_argument("--work", type=Path, default=Path("runs/shapes-pretrain"), help="checkpoints and log")
    p.add_argument("--vae-steps", type=int, default=600, help="VAE training steps")
    p.add_argument("--init-vae", type=Path, help="start from this trained AutoencoderTiny folder instead (re-centred)")
    p.add_argument("--init-model", type=Path, help="continue from this pipeline folder (its VAE, UNet, text encoder)")
    p.add_argument(
        "--caption-noise",
        default="",
        help="noisy captions, e.g. 'color=0.7,background=0.7': with that probability the caption names a random "
        "value of the attribute (a base model that often ignores those words; the headroom preference tuning fixes)",
    )
    p.add_argument("--decoder-steps", type=int, default=400, help="decoder refit steps after centring the latents")
    p.add_argument(
        "--refit-decoder-steps",
        type=int,
        default=0,
        help="only fine-tune the decoder of the VAE in --out for this many steps, encoder frozen, and exit",
    )
    p.add_argument(
        "--beta-schedule",
        default="linear",
        choices=["scaled_linear", "linear", "squaredcos_cap_v2"],
        help="noise schedule: linear (DDPM's, the shipped models': terminal SNR low enough that x_T no longer shows "
        "the layout; docs/research/shapes-layout.md) or scaled_linear (SD1.5's)",
    )
    p.add_argument("--noise-offset", type=float, default=0.1, help="offset-noise strength (0 = off)")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="min-SNR weighting gamma (0 = off)")
    p.add_argument(
        "--x0-floor",
        type=float,
        default=0.0,
        help="add this to the x0-error weight at every timestep (1: v-prediction's weighting at high noise; 0: min-SNR "
        "alone, the shipped recipe)",
    )
    p.add_argument(
        "--t-low",
        type=float,
        default=0.0,
        help="start of the high-noise slice --high-share oversamples (fraction of T)",
    )
    p.add_argument(
        "--high-share", type=float, default=0.0, help="share of each batch drawn from [t_low T, T) (1: only there)"
    )
    p.add_argument(
        "--t-high",
        type=float,
        default=1.0,
        help="the rest of each batch is drawn from [0, t_high T) (below 1: train the low-noise steps only)",
    )
    p.add_argument(
        "--freeze-text-encoder", action="store_true", help="train the UNet only (with --init-model: keep its encoder)"
    )
    p.add_argument("--device", default="cpu", help="torch device (the shipped model is trained on cpu)")
    p.add_argument("--unet-steps", type=int, default=2500, help="UNet + text encoder training steps")
    p.add_argument("--batch", type=int, default=16, help="images per UNet step")
    p.add_argument(
        "--cache-images",
        type=int,
        default=12288,
        help="UNet stage: train on this many pre-encoded scenes (0: render and encode every batch afresh)",
    )
    p.add_argument("--vae-batch", type=int, default=32, help="images per VAE step")
    p.add_argument("--fg-weight", type=float, default=10.0, help="extra loss weight of foreground pixels (VAE)")
    p.add_argument(
        "--edge-weight",
        type=float,
        default=0.0,
        help="decoder refits: weight of an L1 loss on the image's finite differences around the objects, which "
        "keeps the corners of small shapes (the shipped ceiling's decoder: 2)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of UNet and text encoder")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="peak learning rate of the VAE")
    p.add_argument("--two-object-prob", type=float, default=0.3, help="share of two-object scenes")
    p.add_argument("--ckpt-every", type=int, default=250, help="checkpoint interval in steps")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log_path = args.work / "log.jsonl"

    def log(rec: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **rec}) + "\n")

    if args.refit_decoder_steps:  # sharpen a trained pipeline's decoder in place (its latents do not change)
        from diffusers import AutoencoderTiny

        vae = AutoencoderTiny.from_pretrained(args.out / "vae")
        refit_decoder(vae, args, log, args.refit_decoder_steps, args.vae_lr * 0.3, seed_offset=991)
        vae.save_pretrained(args.out / "vae")
        drop_source_paths(args.out)
        return
    train_vae(args, args.work, log)
    train_unet(args, args.work, args.out, log)


if __name__ == "__main__":
    main()
