"""The shapes pretraining's first stage: the VAE (trained, centred, its decoder refit), used by `python -m
ncp.shapes.pretrain`."""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ncp.shapes.model import (
    build_vae,
)
from ncp.shapes.pretrain_data import lr_at, render_batch


def train_vae(args: argparse.Namespace, work: Path, log) -> None:
    if (work / "vae").exists():
        return
    if args.init_model is not None:  # the pipeline's own (already centred) VAE, unchanged
        shutil.copytree(args.init_model / "vae", work / "vae")
        return
    if args.init_vae is not None:  # reuse a trained autoencoder (e.g. the shipped model's) and only re-centre it
        from diffusers import AutoencoderTiny

        center_vae(AutoencoderTiny.from_pretrained(args.init_vae), args, work, log)
        return
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = work / "vae.pt"
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    rng = random.Random(args.seed + step)
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae")
    while step < args.vae_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, warmup=100)
        _, x = render_batch(rng, args.vae_batch, args.two_object_prob)
        loss = vae_loss(vae.decode(vae.encode(x).latents).sample, x, args.fg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log({"stage": "vae", "step": step, "loss": loss.item()})
        if step % args.ckpt_every == 0 or step == args.vae_steps:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    bar.close()
    center_vae(vae, args, work, log)


def vae_loss(rec: torch.Tensor, x: torch.Tensor, fg_weight: float, edge_weight: float = 0.0) -> torch.Tensor:
    # Shapes cover a few percent of the frame: weight foreground pixels (far from the corner's background colour)
    # so colour fidelity is not drowned by the background.
    bg = x[:, :, :1, :1]
    fg = ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()
    weight = 1.0 + fg_weight * fg
    err = (rec - x).abs()
    loss = (weight * (err**2 + 0.5 * err)).mean() / weight.mean()
    if edge_weight:
        loss = loss + edge_weight * edge_loss(rec, x, fg)
    return loss


def edge_loss(rec: torch.Tensor, x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """L1 between the finite differences of the reconstruction and of the render, on the objects and one pixel
    around them. A per-pixel loss barely sees the corners of a small square or triangle (a few pixels of a few
    percent of the frame), so the decoder rounds them and the judge reads a circle: the shipped decoder lost 13 of
    27 small squares and 9 of 32 small triangles of the held-in set (docs/research/shapes-layout.md)."""
    near = F.max_pool2d(fg, 3, 1, 1)
    dx = (rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return (dx.abs() * near[..., :, 1:]).mean() + (dy.abs() * near[..., 1:, :]).mean()


def center_vae(vae, args: argparse.Namespace, work: Path, log) -> None:  # noqa: ANN001 - AutoencoderTiny
    """Make the latents zero-mean per channel, then refit the decoder to the shifted latents; set the scale.

    The pipeline decodes `latents / scaling_factor` with no shift, so the shift is folded into the encoder's last conv
    bias (exact) and the decoder, whose first op is a tanh clamp, is fine-tuned for `--decoder-steps` on the centred
    latents with the encoder frozen. Uncentred latents put a large constant offset in every channel that the diffusion
    model must recreate from pure noise; the shipped model failed on exactly the low-frequency attributes (background,
    position) that live in those channel means.
    """
    with torch.no_grad():
        _, x = render_batch(random.Random(12345), 512, args.two_object_prob)
        mu = vae.encode(x).latents.mean(dim=(0, 2, 3))
        vae.encoder.layers[-1].bias -= mu
    log({"stage": "center", "channel_means": mu.tolist()})
    refit_decoder(vae, args, log, args.decoder_steps, args.vae_lr * 0.3)
    # Latent scale: SD divides latents by their std so the diffusion model sees unit variance.
    with torch.no_grad():
        _, x = render_batch(random.Random(12345), 256, args.two_object_prob)
        z = vae.encode(x).latents
    std = z.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(work / "vae")
    log({"stage": "vae", "done": True, "scaling_factor": 1.0 / std, "channel_means_after": z.mean((0, 2, 3)).tolist()})


def refit_decoder(  # noqa: ANN001 - vae: AutoencoderTiny
    vae, args: argparse.Namespace, log, steps: int, lr: float, seed_offset: int = 777, after_step=None
) -> None:
    """Fine-tune the decoder alone (encoder frozen: the latents, and any UNet trained on them, stay valid).
    `after_step(n)`, if given, runs after the n-th step (bench/shapes_roundtrip.py judges the decoder there)."""
    vae.encoder.requires_grad_(False)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(args.seed + seed_offset)
    for step in tqdm(range(steps), desc="decoder"):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=20)
        _, x = render_batch(rng, args.vae_batch, args.two_object_prob)
        with torch.no_grad():
            z = vae.encode(x).latents
        loss = vae_loss(vae.decode(z).sample, x, args.fg_weight, args.edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log({"stage": "decoder", "step": step + 1, "loss": loss.item()})
        if after_step is not None:
            after_step(step + 1)
    vae.encoder.requires_grad_(True)
