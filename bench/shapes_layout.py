"""Why does the shapes model ignore position words? Short from-scratch pretraining ablations, judged on position.

    python -m bench.shapes_layout --probe models/shapes-ceiling runs/other-model   # position probe + x_T leak, 1 min
    python -m bench.shapes_layout --render docs/benchmarks/shapes_layout.json         # the ablation table
    git checkout cf6040c && python -m bench.shapes_layout --steps 800 --out r.json    # the ablations, ~35 min

The ablations train on the first (32-px) model's VAE and its stock UNet, so they rerun at the commit that still has
`models/shapes-tiny` (cf6040c); `--probe` runs on any pipeline folder.

Every variant trains the same number of steps with the shipped recipe (batch 16, AdamW 1e-3, offset noise 0.1,
min-SNR 5, SD1.5 schedule, 30% two-object scenes) and is sampled with the shipped sampler (Euler-a 12 steps, guidance 4)
on the same 40 single-object held-in prompts. Besides the judge's position accuracy, `pos_text_sep` is how far the
text encoder moves the position word's own token when "left" becomes "right", relative to the colour word's move
when "red" becomes "blue": a model that cannot use a word stops separating it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, EulerAncestralDiscreteScheduler, UNet2DConditionModel

from ncp.shapes.grammar import probe_prompts
from ncp.shapes.judge import score
from ncp.shapes.model import SCALED_LINEAR, build_text_encoder, build_unet, write_tokenizer
from ncp.shapes.pretrain import lr_at, render_batch

VARIANTS = {
    "shipped": "latent 16x16 (shipped VAE), UNet (32,64,128), cross-attention at 8x8 and 4x4",
    "coord": "as shipped, plus two fixed coordinate channels (x, y) concatenated to the UNet input",
    "deep": "as shipped, one more level down to 2x2 (32,64,128,128)",
    "pixel": "pixel space 32x32, UNet (32,64,64), cross-attention at 8x8 only (the feasibility model)",
    "hinoise": "as shipped, loss weighted (min(SNR, 5) + 1) / SNR: x0 errors at high noise count as in v-prediction",
}


class CoordUNet(torch.nn.Module):
    """A UNet that sees where it is: x/y ramps in [-1, 1] appended as input channels (CoordConv, Liu et al. 2018)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        n = unet.config.sample_size
        r = torch.linspace(-1, 1, n)
        self.register_buffer("grid", torch.stack(torch.meshgrid(r, r, indexing="xy"))[None])  # (1, 2, n, n)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([x, self.grid.expand(len(x), -1, -1, -1)], 1), t, cond).sample


class PlainUNet(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, cond).sample


def build(variant: str) -> tuple[torch.nn.Module, bool]:
    """-> (model(x, t, cond) -> eps, latent space?)"""
    if variant in ("shipped", "hinoise"):
        return PlainUNet(build_unet()), True
    if variant == "coord":
        u = build_unet()
        cfg = dict(u.config)
        cfg["in_channels"] = 6
        return CoordUNet(UNet2DConditionModel.from_config(cfg)), True
    if variant == "deep":
        return PlainUNet(
            UNet2DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64, 128, 128),
                down_block_types=(
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                ),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                layers_per_block=1,
                cross_attention_dim=64,
                attention_head_dim=4,
                norm_num_groups=16,
            )
        ), True
    if variant == "pixel":
        return PlainUNet(
            UNet2DConditionModel(
                sample_size=32,
                in_channels=3,
                out_channels=3,
                block_out_channels=(32, 64, 64),
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                layers_per_block=1,
                cross_attention_dim=64,
                attention_head_dim=4,
                norm_num_groups=16,
            )
        ), False
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def text_separation(tok, te) -> float:  # noqa: ANN001
    ids = tok(
        [
            "a large red circle on the left, gray background",
            "a large red circle on the right, gray background",
            "a large blue circle on the left, gray background",
        ],
        padding="max_length",
        max_length=tok.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        h = te(ids)[0]
    return float((h[0, 7] - h[1, 7]).norm() / (h[0, 3] - h[2, 3]).norm())  # token 7 = position word, 3 = colour


@torch.no_grad()
def sample(model, te, tok, vae, prompts: list[str], latent: bool, steps: int = 12, guidance: float = 4.0) -> list:  # noqa: ANN001
    sched = EulerAncestralDiscreteScheduler(**SCALED_LINEAR, steps_offset=1)
    sched.set_timesteps(steps)

    def enc(ps: list[str]) -> torch.Tensor:
        ids = tok(ps, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return te(ids)[0]

    cond, uncond = enc(prompts), enc([""] * len(prompts))
    shape = (len(prompts), 4, 16, 16) if latent else (len(prompts), 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        e_u, e_c = model(xin, t.expand(2 * len(x)), torch.cat([uncond, cond])).chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x, generator=g).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample if latent else x
    return list(((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def run_variant(variant: str, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    vae = AutoencoderTiny.from_pretrained("models/shapes-tiny/vae").eval().requires_grad_(False)
    tok = write_tokenizer(Path(f"/tmp/shapes_layout_tok_{variant}"))
    te = build_text_encoder(tok)
    model, latent = build(variant)
    params = list(model.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    ac = torch.tensor(np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2), dtype=torch.float32)
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, steps, 1e-3, warmup=100)
        prompts, x = render_batch(rng, 16, 0.3, size=32)  # the shipped 32-px VAE
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]
        with torch.no_grad():
            z0 = vae.encode(x).latents * vae.config.scaling_factor if latent else x
        cond = te(tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids)[
            0
        ]
        t = torch.randint(0, 1000, (16,))
        eps = torch.randn_like(z0) + 0.1 * torch.randn(z0.shape[0], z0.shape[1], 1, 1)
        a = ac[t].view(-1, 1, 1, 1)
        err = F.mse_loss(model(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, cond), eps, reduction="none").mean((1, 2, 3))
        snr = a.flatten() / (1 - a.flatten())
        # eps-loss = SNR * |x0 error|^2: min-SNR keeps high-noise x0 errors (where the layout is decided) at weight
        # SNR ~ 0.005-0.1; "hinoise" adds 1 to the x0 weight there, as a v-prediction loss would.
        loss = (err * (snr.clamp(max=5.0) + (variant == "hinoise")) / snr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            print(
                f"{variant} step {step + 1} loss {loss.item():.4f} {(time.time() - t0) / (step + 1):.2f} s/step",
                flush=True,
            )
    model.eval()
    prompts = probe_prompts(40, seed=4242)
    imgs = sample(model, te, tok, vae, prompts, latent)
    scores = [score(im, p) for im, p in zip(imgs, prompts, strict=True)]
    acc = {
        a: float(np.mean([s.attributes_correct[a] for s in scores])) for a in ("position", "color", "shape", "size")
    }
    return {
        "variant": variant,
        "what": VARIANTS[variant],
        "steps": steps,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "s_per_step": (time.time() - t0) / steps,
        **acc,
        "overall": float(np.mean([s.overall for s in scores])),
        "pos_text_sep": text_separation(tok, te),
    }


@torch.no_grad()
def probe_x0(model_dir: Path, t: int = 800, n: int = 8) -> dict[str, list[float]]:
    """Where does a trained pipeline put "a large red circle <position>" at high noise? The x0 prediction from a gray
    background noised to step t, decoded, its red mass centroid in 64-px canvas units per position word (mean of n
    noise draws). A model that reads position words moves the centroid ~16 px off centre; one that ignores them does
    not move it at all."""
    from ncp.pipelines import load_pipeline

    pipe = load_pipeline(model_dir)
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    size = unet.config.sample_size * pipe.vae_scale_factor
    x = torch.full((1, 3, size, size), 128 / 127.5 - 1.0)
    z0 = vae.encode(x).latents * vae.config.scaling_factor
    a = pipe.scheduler.alphas_cumprod[t]
    eps = torch.randn((n, *z0.shape[1:]), generator=torch.Generator().manual_seed(0))
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    out = {}
    for pos, phrase in (("left", "on the left"), ("right", "on the right"), ("top", "at the top"),
                        ("bottom", "at the bottom"), ("center", "in the center")):  # fmt: skip
        ids = tok([f"a large red circle {phrase}, gray background"] * n, padding="max_length",
                  max_length=tok.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        e = unet(zt, torch.full((n,), t), te(ids)[0]).sample
        img = vae.decode((zt - (1 - a).sqrt() * e) / a.sqrt() / vae.config.scaling_factor).sample.mean(0)
        red = (img[0] - 0.5 * (img[1] + img[2])).clamp(min=0)
        ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        w = red / red.sum()
        out[pos] = [float((w * xs).sum() * 64 / size), float((w * ys).sum() * 64 / size)]
    return out


@torch.no_grad()
def probe_leak(model_dir: Path, n: int = 16) -> dict[str, float]:
    """Does the model read the layout from x_T or from the prompt at the highest training timestep? A left (right)
    object's latent noised to t = T - 1 with the schedule's own alphabar, the prompt saying the opposite side; the x0
    prediction's red centroid x (64-px canvas units) says which one the model followed (left ~16-20, right ~44-48)."""
    from ncp.pipelines import load_pipeline
    from ncp.shapes.grammar import parse
    from ncp.shapes.render import render as draw

    pipe = load_pipeline(model_dir)
    tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    size = unet.config.sample_size * pipe.vae_scale_factor
    t = pipe.scheduler.config.num_train_timesteps - 1
    a = pipe.scheduler.alphas_cumprod[t]
    eps = torch.randn((n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size),
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    xs = torch.arange(size) + 0.5
    out = {"alphabar_T": float(a)}
    for image_side, text_side in (("left", "right"), ("right", "left")):
        x = torch.from_numpy(draw(parse(f"a large red circle on the {image_side}, gray background"), size))
        z0 = vae.encode(x.permute(2, 0, 1)[None].float() / 127.5 - 1).latents * vae.config.scaling_factor
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        ids = tok([f"a large red circle on the {text_side}, gray background"] * n, padding="max_length",
                  max_length=tok.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        e = unet(zt, torch.full((n,), t), te(ids)[0]).sample
        img = vae.decode((zt - (1 - a).sqrt() * e) / a.sqrt() / vae.config.scaling_factor).sample.mean(0)
        red = (img[0] - 0.5 * (img[1] + img[2])).clamp(min=0).sum(0)  # column profile
        out[f"image_{image_side}_text_{text_side}_x"] = float((red * xs).sum() / red.sum() * 64 / size)
    return out


def render(path: Path) -> str:
    rows = json.loads(path.read_text())
    lines = [
        "| variant | what | position | colour | shape | size | judge | pos/colour text separation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['what']} | {r['position']:.2f} | {r['color']:.2f} | {r['shape']:.2f} | "
            f"{r['size']:.2f} | {r['overall']:.3f} | {r['pos_text_sep']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/shapes_layout.json"))
    p.add_argument("--render", type=Path, help="print the table of a results file and exit")
    p.add_argument(
        "--probe", type=Path, nargs="+", help="trained pipelines: print their x0 centroids per position word"
    )
    args = p.parse_args(argv)
    if args.probe:
        for folder in args.probe:
            cents = probe_x0(folder)
            spread = np.mean([np.hypot(*np.subtract(cents[k], cents["center"])) for k in cents if k != "center"])
            leak = probe_leak(folder)
            print(json.dumps({"model": str(folder), "centroids": cents, "mean_offset_px": round(float(spread), 2),
                              "leak": leak}))  # fmt: skip
        return
    if args.render:
        print(render(args.render))
        return
    torch.set_num_threads(1)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for v in args.variants.split(","):
        rows = [r for r in rows if r["variant"] != v] + [run_variant(v, args.steps)]
        args.out.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
