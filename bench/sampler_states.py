"""Does a round transfer further when it trains on the states the sampler visits? NCP-DPO on forward-noised images
against NCP-DPO on each image's own 10-step trajectory, same pairs and settings (docs/research/round-transfer.md).

    python -m bench.sampler_states            # about 12 min on this 2-core CPU; raw numbers in --out

round-transfer.md left one route open: a round learns which of two fixed images the model denoises better at a random
timestep (x_t = sqrt(abar) x0 + sqrt(1 - abar) eps with a FRESH eps), while the sampler only ever visits the states
of its own trajectory. Here each pair's two images are drawn with the shipped sampler (Euler ancestral, 10 steps,
guidance 4) while a forward pre-hook on the UNet records the state it is called on at every step (the VP-scaled
input x_k at timestep t_k). The `sampler` arm trains at those states: for a pair it picks one step k with
t_k >= 0.3 T (the loop's slice) and uses eps*_k = (x_k - sqrt(abar_k) x0) / sqrt(1 - abar_k), the noise that puts the
image's own final latent x0 at exactly the sampler's state, so the loss (ncp.perception.per_sample_errors, eq. 12-17,
and ncp.objectives, eq. 18) is the loop's with only the states changed. The `forward` arm is the loop's round: fresh
eps and t ~ U[0.3 T, T), shared by a pair's two images. Both train the same way (rank-8 attention LoRA, AdamW lr 2e-3,
100 steps of 8 pairs, beta 5e5, from the default base).

Each draw is 600 training prompts (none a probe) x 2 images labelled by the judge, ties dropped, about the pairs of a
loop's first round; two training seeds per arm and draw. Also scored without training: the forward round's LoRA at
0.75x and 1.5x its length, and the average of its two seeds' deltas. All scored by the judge on the gate's probe
prompts at image seeds no gate used (96 prompts x 2 seeds from 7000): nothing here is served, so the test probes stay
unused, and nothing was selected on these images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.docs import ROOT
from bench.ncp_vs_latent import TIE_MARGIN, training_prompts
from ncp.adapters import LoraSettings, add_lora, lora_parameters, save_adapter
from ncp.objectives import preference_loss
from ncp.perception import per_sample_errors
from ncp.pipelines import encode_prompts, load_pipeline
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_ROUND_LR, DEFAULT_STEPS, DEFAULT_TIMESTEP_LOW
from ncp.shapes.rater import judge_preference

MODEL = "models/shapes-base"
PROMPTS_PER_DRAW, DRAWS, SEEDS, STEPS, BATCH, BETA = 600, 3, (0, 1), 100, 8, 5e5
IMAGE_SEED, EVAL_SEED_OFFSET = 20_000_000, 7000
LORA = LoraSettings(rank=8, alpha=8.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"), dropout=0.0)
WEIGHTS = "pytorch_lora_weights.safetensors"
# Scored, not trained: (name, its arm's seed LoRAs it is made of, their weights). Two seeds' deltas averaged keep the
# direction the labels set and halve the variance of the part they do not; the scaled ones walk along a direction.
DERIVED = [("forward-avg", [0.5, 0.5]), ("sampler-avg", [0.5, 0.5]), ("forward-x0.75", [0.75]),
           ("forward-x1.5", [1.5]), ("forward-avg-x1.5", [0.75, 0.75]), ("forward-avg-x2", [1.0, 1.0])]  # fmt: skip


def fresh_pipeline():
    pipe = load_pipeline(ROOT / MODEL)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.text_encoder, pipe.vae, pipe.unet):
        m.requires_grad_(False)
    return pipe


def make_pairs(pipe, prompts: list[str], draw: int) -> list[dict]:
    """Two images per prompt with their trajectories: states (K, C, h, w), timesteps (K,), final latent x0."""
    states: list[torch.Tensor] = []
    steps: list[float] = []

    def record(_module, args, kwargs):  # the pipeline calls the UNet on [uncond; cond] copies of the same state
        x = args[0] if args else kwargs["sample"]
        states.append(x[: x.shape[0] // 2].detach().clone())
        steps.append(float(args[1] if len(args) > 1 else kwargs["timestep"]))

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    pairs, decode = [], pipe.vae.decode
    try:
        for i in range(0, len(prompts), 16):
            chunk = prompts[i : i + 16]
            gens = [torch.Generator().manual_seed(IMAGE_SEED + 10_000 * draw + 2 * (i + k) + j)
                    for k in range(len(chunk)) for j in range(2)]  # fmt: skip
            states.clear()
            steps.clear()
            with torch.inference_mode():
                x0 = pipe(prompt=[p for p in chunk for _ in range(2)], generator=gens, output_type="latent",
                          num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE).images  # fmt: skip
                imgs = pipe.image_processor.postprocess(decode(x0 / pipe.vae.config.scaling_factor).sample)
            traj = torch.stack(states, 1)
            for k, p in enumerate(chunk):
                winner = judge_preference(p, imgs[2 * k], imgs[2 * k + 1], tie_margin=TIE_MARGIN)[0]
                if winner == "tie":
                    continue
                w, lo = (2 * k, 2 * k + 1) if winner == "left" else (2 * k + 1, 2 * k)
                pairs.append({"prompt": p, "x0": (x0[w], x0[lo]), "states": (traj[w], traj[lo])})
    finally:
        hook.remove()
    for p in pairs:
        p["timesteps"] = torch.tensor(steps)
    return pairs


def train_round(pairs: list[dict], arm: str, seed: int, out: Path) -> None:
    """One NCP-DPO round from the base; `arm` decides only which noisy states the errors are measured at."""
    pipe = fresh_pipeline()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    abar, T = sched.alphas_cumprod, sched.config.num_train_timesteps
    t_k = pairs[0]["timesteps"]
    eligible = [k for k, t in enumerate(t_k.tolist()) if t >= DEFAULT_TIMESTEP_LOW * T]
    torch.manual_seed(seed)
    add_lora(pipe.unet, LORA)
    params = lora_parameters(pipe.unet, "default")
    opt = torch.optim.AdamW(params, lr=DEFAULT_ROUND_LR, weight_decay=0.01)
    pipe.unet.train()
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(STEPS):
        if len(order) < BATCH:
            order += torch.randperm(len(pairs), generator=g).tolist()
        batch, order = [pairs[i] for i in order[:BATCH]], order[BATCH:]
        x0 = torch.stack([p["x0"][0] for p in batch] + [p["x0"][1] for p in batch])
        if arm == "forward":  # the loop's round: one fresh (t, eps) per pair, shared by both images
            t = torch.randint(int(DEFAULT_TIMESTEP_LOW * T), T, (BATCH,), generator=g).repeat(2)
            eps = torch.randn((BATCH, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        else:  # one sampler step per pair, shared by both images; eps* puts x0 at that image's own state
            ks = [eligible[j] for j in torch.randint(0, len(eligible), (BATCH,), generator=g).tolist()]
            t = torch.tensor([int(round(t_k[k].item())) for k in ks]).repeat(2)
            x_t = torch.stack([p["states"][0][k] for p, k in zip(batch, ks, strict=True)] + [p["states"][1][k] for p, k in zip(batch, ks, strict=True)])  # fmt: skip
            a = abar[t].view(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        z = torch.randn((BATCH, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        cond = encode_prompts(pipe, [p["prompt"] for p in batch]).repeat(2)
        err = per_sample_errors(pipe.unet, sched, x0, eps, t, (cond.encoder_hidden_states, None), space="ncp",
                                with_reference=True, variance_noise=z)  # fmt: skip
        (pc, pr), (rc, rr) = err.policy.chunk(2), err.reference.chunk(2)
        loss = preference_loss("dpo", pc, pr, rc, rr, beta=BETA, sft_weight=0.0, anchor=0.0).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    save_adapter(pipe, pipe.unet, out, LORA)


def derived(folder: Path, sources: list[Path], weights: list[float]) -> None:
    """A LoRA whose delta is sum_i w_i B_i A_i: the sources' factors concatenated along the rank (alpha = rank)."""
    tensors = [load_file(str(s / WEIGHTS)) for s in sources]
    meta = safe_open(str(sources[0] / WEIGHTS), "pt").metadata()
    cfg = json.loads(meta["lora_adapter_metadata"])
    r = cfg["unet.r"] * len(sources)
    cfg.update({"unet.r": r, "unet.lora_alpha": float(r)})
    out = {k: torch.cat([t[k] for t in tensors], 0) if ".down." in k else
           torch.cat([t[k] * w for t, w in zip(tensors, weights, strict=True)], 1) for k in tensors[0]}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / WEIGHTS),
              metadata={"lora_adapter_metadata": json.dumps(cfg), "format": "pt"})  # fmt: skip


def summary(judge: dict, names: list[str]) -> dict:
    """Per arm: gain per draw and seed, mean, and the SE of the mean over those runs."""
    out = {}
    for arm in ("forward", "sampler", *(name for name, _ in DERIVED)):
        gains = [judge["versions"][n]["judge_gain_vs_base"] for n in names if n.split("_")[0] == arm]
        out[arm] = {"gains": gains, "mean": float(np.mean(gains)),
                    "se": float(np.std(gains, ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else None}  # fmt: skip
    diffs = [judge["versions"][f"sampler_{d}_{s}"]["judge_gain_vs_base"] - judge["versions"][f"forward_{d}_{s}"]["judge_gain_vs_base"]
             for d in range(DRAWS) for s in SEEDS]  # fmt: skip
    out["sampler_minus_forward"] = {"diffs": diffs, "mean": float(np.mean(diffs)),
                                    "se": float(np.std(diffs, ddof=1) / np.sqrt(len(diffs)))}  # fmt: skip
    return out


ATTRS = ("color", "size", "position", "shape", "background", "count")


def table(result: dict) -> str:
    """The research page's table: each arm's judge gain per draw (its seeds' runs, or the one derived LoRA), the mean
    over all with its SE, and the mean share of probe images right per attribute."""
    v, rows = result["versions"], []
    rows.append("| arm | draw 0 | draw 1 | draw 2 | mean (SE) | " + " | ".join(ATTRS) + " |")
    rows.append("|---" * (5 + len(ATTRS)) + "|")
    for arm, s in result["summary"].items():
        if arm == "sampler_minus_forward":
            continue
        names = [n for n in v if n.split("_")[0] == arm]
        per_draw = [" / ".join(f"{v[n]['judge_gain_vs_base']:+.3f}" for n in names if n.split("_")[1] == str(d))
                    for d in range(DRAWS)]  # fmt: skip
        attrs = [np.mean([v[n]["attributes"][a] for n in names]) for a in ATTRS]
        se = "" if s["se"] is None else f" ({s['se']:.3f})"
        rows.append(f"| {arm} | " + " | ".join(per_draw) + f" | {s['mean']:+.3f}{se} | "
                    + " | ".join(f"{x:.2f}" for x in attrs) + " |")  # fmt: skip
    base = result["base_attributes"]
    rows.append("| base | | | | | " + " | ".join(f"{base[a]:.2f}" for a in ATTRS) + " |")
    d = result["summary"]["sampler_minus_forward"]
    return "\n".join(rows) + f"\n\nsampler minus forward, paired by draw and seed: {d['mean']:+.3f} (SE {d['se']:.3f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "sampler-states")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "sampler_states.json")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    t0, arms = time.time(), args.work / "arms"
    pipe = fresh_pipeline()
    prompts = training_prompts(PROMPTS_PER_DRAW * DRAWS)
    names, counts = [], []
    for d in range(DRAWS):
        pairs = make_pairs(pipe, prompts[d * PROMPTS_PER_DRAW : (d + 1) * PROMPTS_PER_DRAW], d)
        counts.append(len(pairs))
        print(f"draw {d}: {len(pairs)} pairs, {time.time() - t0:.0f} s", flush=True)
        for arm in ("forward", "sampler"):
            for s in SEEDS:
                name = f"{arm}_{d}_{s}"
                if not (arms / name / WEIGHTS).exists():
                    train_round(pairs, arm, s, arms / name)
                names.append(name)
                print(f"  {name} trained, {time.time() - t0:.0f} s", flush=True)
        seeds = {arm: [arms / f"{arm}_{d}_{s}" for s in SEEDS] for arm in ("forward", "sampler")}
        for name, w in DERIVED:
            derived(arms / f"{name}_{d}", seeds[name.split("-")[0]][: len(w)], w)
            names.append(f"{name}_{d}")
    judge_file = args.work / "eval_judge.json"
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", MODEL, "--threads", str(args.threads), "--probe-set",
           "gate", "--shapes-probes", "96", "--probe-seeds", "2", "--probe-seed-offset", str(EVAL_SEED_OFFSET),
           "--steps", str(DEFAULT_STEPS), "--guidance", str(DEFAULT_GUIDANCE), "--attributes", "--out",
           str(judge_file), *[f"--version={n}={arms / n}" for n in names]]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    judge = json.loads(judge_file.read_text())
    result = {"model": MODEL, "pairs_per_draw": counts, "base_judge": judge["base_judge"],
              "base_attributes": judge["base_attributes"], "probes": "gate prompts, image seeds 7000-7001",
              "summary": summary(judge, names), "minutes": round((time.time() - t0) / 60, 1),
              "versions": {n: {k: judge["versions"][n][k] for k in ("judge_gain_vs_base", "judge_gain_ci", "attributes")}
                           for n in names}}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
