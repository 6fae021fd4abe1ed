"""Where the ceiling loses shape and the second object: the VAE's decoder, its latents, or the UNet?

    python -m bench.shapes_decoder                 # 200 prompts per set, decoder refit 500 steps (about 6 min, 2 threads)
    python -m bench.shapes_decoder --n 40 --refit-steps 50   # quicker, noisier

For the held-in single-object and the two-object prompt sets of `bench/shapes_base.py` (fixed prompts, seed 0), the
judge's per-attribute accuracy of: the renders themselves; the renders through the VAE (encode, decode: what the latent
space can carry); the ceiling's own samples (shipped sampler) decoded by the shipped decoder; and the SAME sampled
latents decoded by a copy of the decoder refit `--refit-steps` more steps on fresh renders (encoder frozen, so the
latents and the UNet stay valid). If the refit decoder barely moves the samples' accuracy, the loss is in the latents
the UNet draws, not in decoding them. Raw numbers: docs/benchmarks/shapes_decoder.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from bench.docs import ROOT
from bench.shapes_base import summarize
from ncp.pipelines import load_pipeline
from ncp.shapes.grammar import parse, probe_prompts
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SIZE
from ncp.shapes.pretrain_data import lr_at, render_batch
from ncp.shapes.pretrain_vae import vae_loss
from ncp.shapes.render import render

ATTRS = ("color", "shape", "size", "position")


def _u8(x: torch.Tensor) -> list[np.ndarray]:  # (n, 3, H, W) in [-1, 1] -> HxWx3 uint8
    x = x.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    return [np.clip(np.rint((im + 1) * 127.5), 0, 255).astype(np.uint8) for im in x]


def accuracies(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    summary = summarize(prompts, images)[0]  # bench/shapes_base.py's accuracies (hard decisions)
    return {a: summary[a] for a in ATTRS}


@torch.no_grad()
def sampled_latents(pipe, prompts: list[str], seed: int = 0, batch: int = 25) -> torch.Tensor:  # noqa: ANN001
    """The shipped sampler's final latents; image i uses seed `seed * 100003 + i` (as bench/shapes_base.py)."""
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        gens = [torch.Generator().manual_seed(seed * 100003 + s + i) for i in range(len(chunk))]
        out.append(pipe(prompt=chunk, generator=gens, num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                        height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="latent").images)  # fmt: skip
    return torch.cat(out)


def refit(vae, steps: int, batch: int = 32, lr: float = 3e-4, fg_weight: float = 10.0):  # noqa: ANN001, ANN201
    """A copy of `vae` whose decoder trained `steps` more steps on fresh renders (30% two-object), encoder frozen."""
    new = copy.deepcopy(vae)
    new.encoder.requires_grad_(False)
    opt = torch.optim.AdamW(new.decoder.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(999)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=20)
        _, x = render_batch(rng, batch, 0.3)
        with torch.no_grad():
            z = new.encoder(x)  # AutoencoderTiny.encode's latents, without its output wrapper
        loss = vae_loss(new.decoder(z), x, fg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return new.requires_grad_(False)


def run(model: str, n: int, refit_steps: int) -> dict:
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    sets = {"held_in": probe_prompts(n, seed=0, two_object_prob=0.0, held_out=False),
            "two_object": probe_prompts(n, seed=2, two_object_prob=1.0, held_out=False)}  # fmt: skip
    t0 = time.time()
    new = refit(vae, refit_steps)
    result: dict = {"model": model, "n": n, "refit_steps": refit_steps, "sets": {}}
    with torch.no_grad():
        for name, prompts in sets.items():
            x = torch.from_numpy(np.stack([render(parse(p), IMAGE_SIZE) for p in prompts])).permute(0, 3, 1, 2)
            x = x.float() / 127.5 - 1
            lat = sampled_latents(pipe, prompts)
            result["sets"][name] = {
                "renders": accuracies(_u8(x), prompts),
                "vae_round_trip": accuracies(_u8(vae.decode(vae.encode(x).latents).sample), prompts),
                "refit_round_trip": accuracies(_u8(new.decode(new.encode(x).latents).sample), prompts),
                "samples": accuracies(_u8(vae.decode(lat / vae.config.scaling_factor).sample), prompts),
                "samples_refit_decoder": accuracies(_u8(new.decode(lat / vae.config.scaling_factor).sample), prompts),
            }
    result["seconds"] = round(time.time() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes-ceiling")
    p.add_argument("--n", type=int, default=200, help="prompts per set")
    p.add_argument("--refit-steps", type=int, default=500, help="extra decoder steps (batches of 32 renders)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "shapes_decoder.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.n, args.refit_steps)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, rows in result["sets"].items():
        for row, acc in rows.items():
            print(f"{name:10s} {row:22s} " + " ".join(f"{a} {v:.3f}" for a, v in acc.items()))


if __name__ == "__main__":
    main()
