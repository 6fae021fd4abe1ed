"""How much shape can the shapes world's latent carry? Trains a fresh VAE of the shipped architecture (or with more
latent channels or a wider conv stack) and judges its round trip of clean renders every 500 steps
(docs/research/shapes-layout.md).

    python -m bench.shapes_latent --channels 4 --threads 1     # the shipped 16x16x4 latent, about 12 min for 1,500 steps
    python -m bench.shapes_latent --channels 8 --threads 1     # twice the channels (run both side by side: 2 cores)
    python -m bench.shapes_latent --width 64 --steps 500       # a 4x larger conv stack

The ceiling's samples cannot be judged right more often than its latent carries an attribute: the judge scores
clean renders right every time (shape 1.00), the shipped VAE's round trip 0.89 on held-in shape. The training is the
shipped VAE stage's (`ncp.shapes.pretrain_vae`: batches of 16 renders, 30% two-object, AdamW 1e-3 with warm-up and
cosine decay, the foreground-weighted loss), without the latent centring and decoder refits that follow it.
Judged on the 200 held-in single-object prompts and 200 two-object prompts of `bench/shapes_base.py`'s sets.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny

from ncp.shapes.grammar import parse, probe_prompts
from ncp.shapes.judge import score
from ncp.shapes.model import IMAGE_SIZE
from ncp.shapes.pretrain_data import lr_at, render_batch
from ncp.shapes.pretrain_vae import vae_loss
from ncp.shapes.render import render


def renders(prompts: list[str]) -> torch.Tensor:
    imgs = np.stack([render(parse(p), IMAGE_SIZE) for p in prompts])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_u8(x: torch.Tensor) -> list[np.ndarray]:
    return [np.clip(np.rint((im.permute(1, 2, 0).numpy() + 1) * 127.5), 0, 255).astype(np.uint8) for im in x]


def accuracy(images: list[np.ndarray], prompts: list[str], attr: str) -> float:
    return float(np.mean([score(im, p).attributes_correct[attr] for im, p in zip(images, prompts, strict=True)]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=4, help="latent channels (shipped: 4)")
    p.add_argument(
        "--width", type=int, default=32, help="conv channels of every encoder and decoder block (shipped: 32)"
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the checkpoints' figures as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the VAE's initial weights
    held_in = probe_prompts(200, seed=0, two_object_prob=0.0, held_out=False)
    two = probe_prompts(200, seed=2, two_object_prob=1.0, held_out=False)
    x_in, x_two = renders(held_in), renders(two)
    vae = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(args.width,) * 3,
                          decoder_block_out_channels=(args.width,) * 3, num_encoder_blocks=(1, 1, 1),
                          num_decoder_blocks=(1, 1, 1), latent_channels=args.channels)  # fmt: skip
    name = f"{args.channels} channels, width {args.width}"
    print(name, "parameters", sum(q.numel() for q in vae.parameters()), flush=True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    rng, t0, rows = random.Random(0), time.time(), []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, 1e-3, warmup=100)
        _, x = render_batch(rng, 16, 0.3)
        loss = vae_loss(vae.decode(vae.encode(x).latents).sample, x, 4.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 500 == 0:
            with torch.no_grad():
                r_in = to_u8(vae.decode(vae.encode(x_in).latents).sample.clamp(-1, 1))
                r_two = to_u8(vae.decode(vae.encode(x_two).latents).sample.clamp(-1, 1))
            row = {"step": step + 1, "seconds": round(time.time() - t0), "loss": loss.item(),
                   "held_in_shape": accuracy(r_in, held_in, "shape"), "held_in_color": accuracy(r_in, held_in, "color"),
                   "two_object_shape": accuracy(r_two, two, "shape"), "two_object_color": accuracy(r_two, two, "color")}  # fmt: skip
            rows.append(row)
            print(name, json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(
            json.dumps({"channels": args.channels, "width": args.width, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
