"""Training on the model's own samples: do the re-encoded PNGs or the guidance explain where it stops?

    python -m bench.self_training --model runs/shapes-headroom --prompts 1500 --steps 600
    python -m bench.self_training --render docs/benchmarks/self_training.json

Every preference run on the shapes world levels off near +0.05 judge (DPO) or loses score (SFT on the winners), and
the alignment sweeps named a likely reason without testing it: the arena stores PNGs, and the trainer VAE-encodes them
again (`ncp.data.encode_pairs`), so it may learn latents the sampler never produces. A second candidate: the sampler
draws with classifier-free guidance (w = 4) but the objectives score the conditional branch alone, so imitating
guided samples with the conditional branch would be guided twice at sampling time. This run tests both, side by side
on ONE set of on-policy pairs (two images per prompt from the shipped sampler, labelled by the loop's simulated
rater), each arm a LoRA (rank 8, attention) trained from the base with t >= 0.3 T and batches of 8 pairs:

- `ncp-dpo`, re-encoded PNGs (what the loop trains on) and the sampler's own latents;
- `latent-sft` on the winners, re-encoded and own latents;
- `latent-sft guided`: the winners' error of eps_u + w (eps_c - eps_u), the denoiser the sampler integrates.

Each checkpoint is judged on the loop's probe prompts x seeds, paired with the base's images of the same seeds.
Writes docs/benchmarks/self_training.json, docs/self_training.png and the `self-training` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from bench.curves import plot_gain_curves
from bench.docs import write_section
from ncp.adapters import LoraSettings, add_lora, lora_parameters
from ncp.data import EncodedPair, PreferencePair, collate_pairs, encode_pairs
from ncp.evaluate import PROBE_SEED, mean_ci
from ncp.losses import timestep_bounds
from ncp.perception import noisy_latents
from ncp.pipelines import encode_prompts, load_pipeline, uncond_conditioning
from ncp.shapes.grammar import probe_prompts
from ncp.shapes.judge import score
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_TIMESTEP_LOW
from ncp.shapes.rater import SimulatedRater
from ncp.trainer import TrainConfig, batch_indices, pair_loss

ROOT = Path(__file__).resolve().parents[1]
# name -> (objective, latents, guided): the arms, in table order.
ARMS = {
    "ncp-dpo, re-encoded": ("dpo", "reencoded", False),
    "ncp-dpo, own latents": ("dpo", "own", False),
    "latent-sft, re-encoded": ("sft", "reencoded", False),
    "latent-sft, own latents": ("sft", "own", False),
    "latent-sft guided, own latents": ("sft", "own", True),
}
DATA_SEED, IMAGE_SEED = 4242, 10_000_000  # training prompts and image seeds, disjoint from the probes
LORA = LoraSettings(rank=8, alpha=8, target_modules=("to_q", "to_k", "to_v", "to_out.0"))


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], batch: int = 32) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The shipped sampler's final latents (scaled, as the UNet sees them) and their decoded uint8 images."""
    lats, images = [], []
    sf = pipe.vae.config.scaling_factor
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        z = pipe(prompt=prompts[i : i + batch], generator=gens, num_inference_steps=DEFAULT_STEPS,
                 guidance_scale=DEFAULT_GUIDANCE, output_type="latent").images  # fmt: skip
        x = pipe.image_processor.postprocess(pipe.vae.decode(z / sf).sample, output_type="np")
        lats.append(z.float().cpu())
        images += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in x]
    return torch.cat(lats), images


def probe_scores(pipe, probes: list[str], seeds: int) -> np.ndarray:
    """(prompts, seeds) judge scores, the evaluator's seed convention (ncp.evaluate.judge_probe)."""
    cols = []
    for s in range(seeds):
        _, images = sample(pipe, probes, [s * 100003 + i for i in range(len(probes))])
        cols.append([score(im, p).overall for im, p in zip(images, probes, strict=True)])
    return np.asarray(cols).T


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_data(args: argparse.Namespace, work: Path) -> dict:
    """Two images per training prompt, the rater's strict preferences, both latent sources, the base's probe scores."""
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    probes = probe_prompts(args.probes, seed=PROBE_SEED, two_object_prob=0.3)
    pool = probe_prompts(args.prompts + len(probes), seed=DATA_SEED, two_object_prob=0.3)
    prompts = [p for p in dict.fromkeys(pool) if p not in set(probes)][: args.prompts]
    t0 = time.time()
    z, images = sample(pipe, [p for p in prompts for _ in range(2)], [IMAGE_SEED + i for i in range(2 * len(prompts))])
    rater = SimulatedRater(noise=0.05, seed=11)  # the live loop benchmark's rater
    keep = []  # (prompt index, chosen image, rejected image)
    for i, p in enumerate(prompts):
        vote = rater.decide(score(images[2 * i], p).overall, score(images[2 * i + 1], p).overall)
        if vote in ("left", "right"):
            keep.append((i, 2 * i, 2 * i + 1) if vote == "left" else (i, 2 * i + 1, 2 * i))
    size = (images[0].shape[0], images[0].shape[1])
    pref = [PreferencePair(prompts[i], _png(images[w]), _png(images[r]), size, size) for i, w, r in keep]
    re = encode_pairs(pref, pipe.vae, resolution=size[0], model_key="self-training")
    own_chosen = z[[w for _, w, _ in keep]]
    data = {
        "prompts": prompts, "keep": keep, "own": z, "reencoded": [(e.chosen, e.rejected) for e in re],
        "probes": probes, "base": probe_scores(pipe, probes, args.probe_seeds), "size": size,
        "relative_latent_error": float((torch.stack([e.chosen for e in re]) - own_chosen).norm() / own_chosen.norm()),
        "data_s": time.time() - t0,
    }  # fmt: skip
    torch.save(data, work / "data.pt")
    return data


def pairs(data: dict, source: str) -> list[EncodedPair]:
    size = tuple(data["size"])
    latents = [(data["own"][w], data["own"][r]) for _, w, r in data["keep"]] if source == "own" else data["reencoded"]
    return [EncodedPair(data["prompts"][i], c, r, size, (0, 0), size)
            for (i, _, _), (c, r) in zip(data["keep"], latents, strict=True)]  # fmt: skip


def guided_sft_loss(
    unet, sched, batch, cond, uncond, cfg: TrainConfig, gen: torch.Generator, w: float
) -> torch.Tensor:
    """The chosen images' eps-MSE of the guided prediction eps_u + w (eps_c - eps_u), t and eps drawn as pair_loss."""
    x0 = batch.chosen
    eps = torch.randn(x0.shape, generator=gen)
    lo, hi = timestep_bounds(cfg, sched.config.num_train_timesteps)
    t = torch.randint(lo, hi, (len(x0),), generator=gen)
    x_t = noisy_latents(sched, x0, eps, t)
    states = torch.cat([uncond.encoder_hidden_states.expand(len(x0), -1, -1), cond.encoder_hidden_states])
    e_u, e_c = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), states).sample.chunk(2)
    return ((e_u + w * (e_c - e_u) - eps) ** 2).mean()


def train_arm(args: argparse.Namespace, work: Path, name: str) -> list[dict]:
    """Train one arm from the base, judging it at every checkpoint (one process, one thread)."""
    torch.set_num_threads(1)
    objective, source, guided = ARMS[name]
    data = torch.load(work / "data.pt", weights_only=False)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    base_unet = pipe.unet.requires_grad_(False)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    uncond = uncond_conditioning(pipe)
    cfg = TrainConfig(objective=objective, space="ncp" if objective == "dpo" else "latent", beta=args.beta,
                      lr=args.lr if objective == "dpo" else args.sft_lr, batch_size=8, max_steps=args.steps,
                      lora_rank=LORA.rank, lora_alpha=LORA.alpha, timestep_low=DEFAULT_TIMESTEP_LOW)  # fmt: skip
    ds = pairs(data, source)
    torch.manual_seed(0)  # the same LoRA init and data order in every arm
    unet = copy.deepcopy(base_unet)
    add_lora(unet, LORA)
    params = lora_parameters(unet)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpoints = {round(args.steps * k / args.checkpoints) for k in range(1, args.checkpoints + 1)}
    rows, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        unet.train()
        batch = collate_pairs([ds[i] for i in batch_indices(len(ds), 8, step - 1, 0, 1, 0)])
        gen = torch.Generator().manual_seed(step)
        cond = encode_prompts(pipe, list(batch.prompts))
        if guided:
            loss = guided_sft_loss(unet, sched, batch, cond, uncond, cfg, gen, DEFAULT_GUIDANCE)
        else:
            loss = pair_loss(unet, sched, batch, cond, cfg, gen, sdxl=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step in checkpoints:
            unet.eval()
            pipe.unet = unet
            s = probe_scores(pipe, data["probes"], data["base"].shape[1])
            pipe.unet = base_unet
            gain, ci = mean_ci(s - data["base"])
            rows.append({"steps": step, "judge": float(s.mean()), "gain": gain, "ci": ci, "seconds": time.time() - t0})
    return rows


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ncp-self-training-"))
    t0 = time.time()
    data = make_data(args, work)

    def one(name: str) -> list[dict]:
        out = work / f"arm{list(ARMS).index(name)}.json"
        cmd = [sys.executable, "-m", "bench.self_training", "--arm", name, "--work", str(work), "--model", args.model,
               "--steps", str(args.steps), "--checkpoints", str(args.checkpoints), "--lr", str(args.lr),
               "--sft-lr", str(args.sft_lr), "--beta", str(args.beta), "--arm-out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"arm {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())

    with ThreadPoolExecutor(args.workers) as pool:
        arms = dict(zip(ARMS, pool.map(one, ARMS), strict=True))
    config = {k: v for k, v in vars(args).items() if k in ("model", "prompts", "steps", "probes", "probe_seeds",
                                                            "lr", "sft_lr", "beta", "workers")}  # fmt: skip
    return {"config": config, "pairs": len(data["keep"]), "prompts": len(data["prompts"]),
            "base_judge": float(data["base"].mean()), "relative_latent_error": data["relative_latent_error"],
            "arms": arms, "minutes": (time.time() - t0) / 60}  # fmt: skip


def markdown(res: dict) -> str:
    c = res["config"]
    steps = [r["steps"] for r in next(iter(res["arms"].values()))]
    lines = [
        "## Training on the model's own samples: re-encoded PNGs and guidance (`python -m bench.self_training`)",
        "",
        f"One set of {res['pairs']} on-policy pairs (two images of each of {res['prompts']} prompts from the shipped "
        f"sampler on `{c['model']}`, the loop's simulated rater, ties dropped); each arm a rank-8 attention LoRA "
        f"trained from the base, t >= {DEFAULT_TIMESTEP_LOW:g} T, batches of 8 pairs (ncp-dpo lr {c['lr']:g}, beta "
        f"{c['beta']:g}; sft lr {c['sft_lr']:g}), judged on the loop's {c['probes']} probe prompts x "
        f"{c['probe_seeds']} seeds against the base's images of the same seeds (base {res['base_judge']:.3f}). "
        f"The PNGs re-encoded by the VAE differ from the sampler's latents by {res['relative_latent_error']:.1%} "
        f"(relative L2). {res['minutes']:.1f} min on this 2-core CPU, {c['workers']} worker processes. Rerun: "
        f"`python -m bench.self_training --model {c['model']} --prompts {c['prompts']} --steps {c['steps']}`.",
        "",
        "| arm | " + " | ".join(f"gain at {s} steps" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, rows in res["arms"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['gain']:+.3f} ± {r['ci']:.3f}" for r in rows) + " |")
    lines += ["", "![self training](self_training.png)", "", "**What it shows (generated).**", *findings(res)]
    return "\n".join(lines)


def findings(res: dict) -> list[str]:
    a = {name: rows for name, rows in res["arms"].items()}
    best = {name: max(r["gain"] for r in rows) for name, rows in a.items()}
    last = {name: rows[-1]["gain"] for name, rows in a.items()}
    out = []
    d_re, d_own = "ncp-dpo, re-encoded", "ncp-dpo, own latents"
    out.append(
        f"- DPO on the sampler's own latents: best {best[d_own]:+.3f}, last {last[d_own]:+.3f}; on the re-encoded "
        f"PNGs the loop trains on: best {best[d_re]:+.3f}, last {last[d_re]:+.3f}. "
        + (
            "Re-encoding is not what holds DPO back."
            if best[d_own] < best[d_re] + 0.02
            else "Training on the sampler's latents moves the model further."
        )  # fmt: skip
    )
    sft = [n for n in a if n.startswith("latent-sft")]
    worst = min(last[n] for n in sft)
    out.append(
        "- SFT on the winners, last checkpoint: "
        + "; ".join(f"{n} {last[n]:+.3f}" for n in sft)
        + (
            ". Every variant loses score, on the sampler's own latents and with the guided prediction too, so "
            "neither the re-encoding nor double guidance explains it: imitating the model's own winners (each only "
            "the better of two of its samples) pulls it away from what it does well."
            if max(last[n] for n in sft) < 0
            else f" (worst {worst:+.3f})."
        )
    )
    return out


def publish(res: dict, docs: Path = ROOT / "docs") -> None:
    plot_gain_curves(res["arms"], docs / "self_training.png", title="Training on the model's own samples")
    write_section(docs / "BENCHMARKS.md", "self-training", markdown(res))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/shapes-headroom")
    p.add_argument("--prompts", type=int, default=1500, help="training prompts, two images each")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="ncp-dpo learning rate (the loop's)")
    p.add_argument("--sft-lr", type=float, default=3e-4, help="latent-sft learning rate (the sweeps')")
    p.add_argument("--beta", type=float, default=5e5)
    p.add_argument("--probes", type=int, default=48)
    p.add_argument("--probe-seeds", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads while sampling the data")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "self_training.json")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="where BENCHMARKS.md and the plot go")
    p.add_argument("--render", type=Path, help="only rewrite the plot and the doc section from this result file")
    p.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # internal: one arm in its own process
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--arm-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render:
        publish(json.loads(args.render.read_text()), args.docs)
        return
    if args.arm:
        args.arm_out.write_text(json.dumps(train_arm(args, args.work, args.arm)))
        return
    if args.prompts < 8 or args.steps < 1 or args.checkpoints < 1:
        p.error("--prompts must be >= 8, --steps and --checkpoints >= 1")
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    publish(res, args.docs)


if __name__ == "__main__":
    main()
