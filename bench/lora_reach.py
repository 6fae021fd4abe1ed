"""Can the loop's LoRA hold the fix at all? A rank-R attention LoRA on the default base, taught by the plain diffusion
loss on fresh scenes with correct captions (the base's own pretraining step: min-SNR 5, offset noise 0.1, half of
each batch from t >= 0.5 T). Judge the adapter it writes with `ncp.evaluate --probe-set test` (docs/research/
loop-plateau.md, "What limits a round").

    python -m bench.lora_reach --rank 8 --steps 400 --lr 1e-3 --out runs/lora-reach/r8
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ncp.adapters import LoraSettings, add_lora, lora_parameters, save_adapter
from ncp.pipelines import load_pipeline
from ncp.shapes.pretrain import sample_timesteps
from ncp.shapes.pretrain_data import render_batch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes-base")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    settings = LoraSettings(rank=args.rank, alpha=args.rank)
    add_lora(unet, settings)
    params = lora_parameters(unet)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ac = pipe.scheduler.alphas_cumprod
    rng = random.Random(7)
    torch.manual_seed(7)
    for _ in tqdm(range(args.steps), desc="lora"):
        prompts, x = render_batch(rng, args.batch, 0.3, None)  # clean captions
        with torch.no_grad():
            z0 = vae.encode(x).latents * vae.config.scaling_factor
            prompts = ["" if rng.random() < 0.1 else q for q in prompts]  # keep the unconditional model
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
            cond = te(ids.input_ids)[0]
        t = sample_timesteps(len(prompts), len(ac), 0.5, 0.5, torch.device("cpu"))
        eps = torch.randn_like(z0) + 0.1 * torch.randn(z0.shape[0], z0.shape[1], 1, 1)
        a = ac[t].view(-1, 1, 1, 1)
        err = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, cond).sample, eps, reduction="none")
        snr = a.flatten() / (1 - a.flatten())
        loss = (err.mean(dim=(1, 2, 3)) * snr.clamp(max=5.0) / snr).mean()  # min-SNR-5, as the pretraining
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    print(save_adapter(pipe, unet, args.out, settings))


if __name__ == "__main__":
    main()
