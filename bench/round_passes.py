"""Does a round's gain depend on how many passes it makes over its pairs, and differently in NCP and latent space?
The loop's NCP-DPO round and its latent-DPO arm on the same pairs, seeds and noise as bench.round_space (commit
5ff69d4), run to 200 steps with the LoRA saved at 50, 100 and 200 (0.7, 1.4 and 2.9 passes over about 550 pairs)
(docs/research/round-space.md).

    python -m bench.round_passes           # about 16 min on this 2-core CPU; raw numbers in --out; --table prints

bench.ncp_vs_latent (300 pairs, 120 steps) found NCP-DPO peaking near one pass and falling after it while latent DPO
kept rising, and bench.round_space (1.4 passes) found them level: this reads both arms at three lengths at once.
Judged on the gate's 96 probe prompts at image seeds 7000-7001 (nothing here is served or selected on them).
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

from bench.docs import ROOT
from bench.ncp_vs_latent import TIE_MARGIN, training_prompts
from ncp.adapters import LoraSettings, add_lora, lora_parameters, save_adapter
from ncp.objectives import preference_loss
from ncp.perception import per_sample_errors, random_encoder
from ncp.pipelines import encode_prompts, load_pipeline
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_ROUND_LR, DEFAULT_STEPS, DEFAULT_TIMESTEP_LOW
from ncp.shapes.rater import judge_preference

MODEL = "models/shapes-base"
PROMPTS_PER_DRAW, DRAWS, SEEDS, STEPS, BATCH = 600, 3, (0, 1), 200, 8
IMAGE_SEED, EVAL_SEED_OFFSET = 20_000_000, 7000
LORA = LoraSettings(rank=8, alpha=8.0, target_modules=("to_q", "to_k", "to_v", "to_out.0"), dropout=0.0)
WEIGHTS = "pytorch_lora_weights.safetensors"
# arm: (space, encoder = down + mid, encoder = a random-initialised UNet, beta; None: matched to ncp's on the base)
ARMS = {
    "ncp": ("ncp", False, False, 5e5),
    "latent": ("latent", False, False, 5000.0),
}
CHECKPOINTS = (50, 100, 200)  # optimizer steps at which a round's LoRA is saved: 0.7, 1.4 and 2.9 passes
ATTRS = ("color", "size", "position", "shape", "background", "count")


def fresh_pipeline():
    pipe = load_pipeline(ROOT / MODEL)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.text_encoder, pipe.vae, pipe.unet):
        m.requires_grad_(False)
    return pipe


def make_pairs(pipe, prompts: list[str], draw: int) -> list[dict]:
    """Two images per prompt (the shipped sampler), judge-labelled, ties dropped: {prompt, x0: (chosen, rejected)}."""
    pairs = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i : i + 16]
        gens = [torch.Generator().manual_seed(IMAGE_SEED + 10_000 * draw + 2 * (i + k) + j)
                for k in range(len(chunk)) for j in range(2)]  # fmt: skip
        with torch.inference_mode():
            x0 = pipe(prompt=[p for p in chunk for _ in range(2)], generator=gens, output_type="latent",
                      num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE).images  # fmt: skip
            imgs = pipe.image_processor.postprocess(pipe.vae.decode(x0 / pipe.vae.config.scaling_factor).sample)
        for k, p in enumerate(chunk):
            winner = judge_preference(p, imgs[2 * k], imgs[2 * k + 1], tie_margin=TIE_MARGIN)[0]
            if winner != "tie":
                w, lo = (2 * k, 2 * k + 1) if winner == "left" else (2 * k + 1, 2 * k)
                pairs.append({"prompt": p, "x0": (x0[w], x0[lo])})
    return pairs


def batches(pairs: list[dict], seed: int, abar_len: int):
    """The loop's round's draws, identical for every arm: (batch of pairs, t, eps, z) per step."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    low = int(DEFAULT_TIMESTEP_LOW * abar_len)
    for _ in range(STEPS):
        if len(order) < BATCH:
            order += torch.randperm(len(pairs), generator=g).tolist()
        batch, order = [pairs[i] for i in order[:BATCH]], order[BATCH:]
        x0 = torch.stack([p["x0"][0] for p in batch] + [p["x0"][1] for p in batch])
        t = torch.randint(low, abar_len, (BATCH,), generator=g).repeat(2)
        eps = torch.randn((BATCH, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        z = torch.randn((BATCH, *x0.shape[1:]), generator=g).repeat(2, 1, 1, 1)
        yield batch, x0, t, eps, z


def errors(pipe, sched, batch, x0, t, eps, z, arm: str, reference: bool, encoder=None):
    space, mid, _, _ = ARMS[arm]
    cond = encode_prompts(pipe, [p["prompt"] for p in batch]).repeat(2)
    return per_sample_errors(pipe.unet, sched, x0, eps, t, (cond.encoder_hidden_states, None), space=space,
                             include_mid=mid, with_reference=reference, variance_noise=z, encoder=encoder)  # fmt: skip


def matched_beta(pairs: list[dict], arm: str) -> float:
    """5e5 x mean PL_ncp / mean PL_arm of the base over the first 10 batches of seed 0: the same DPO logit scale."""
    pipe = fresh_pipeline()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    add_lora(pipe.unet, LORA)  # B = 0: the policy is the base
    enc = random_encoder(pipe.unet, 0) if ARMS[arm][2] else None
    ref, own = [], []
    with torch.no_grad():
        for k, (batch, x0, t, eps, z) in enumerate(batches(pairs, 0, len(sched.alphas_cumprod))):
            if k == 10:
                break
            ref.append(errors(pipe, sched, batch, x0, t, eps, z, "ncp", False).policy.mean().item())
            own.append(errors(pipe, sched, batch, x0, t, eps, z, arm, False, enc).policy.mean().item())
    return 5e5 * float(np.mean(ref) / np.mean(own))


def train_round(pairs: list[dict], arm: str, beta: float, seed: int, out: Path) -> None:
    """One DPO round from the base in `arm`'s space; everything else is the loop's round."""
    pipe = fresh_pipeline()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(seed)
    add_lora(pipe.unet, LORA)
    enc = random_encoder(pipe.unet, 0) if ARMS[arm][2] else None
    params = lora_parameters(pipe.unet, "default")
    opt = torch.optim.AdamW(params, lr=DEFAULT_ROUND_LR, weight_decay=0.01)
    pipe.unet.train()
    for k, (batch, x0, t, eps, z) in enumerate(batches(pairs, seed, len(sched.alphas_cumprod)), 1):
        err = errors(pipe, sched, batch, x0, t, eps, z, arm, True, enc)
        (pc, pr), (rc, rr) = err.policy.chunk(2), err.reference.chunk(2)
        loss = preference_loss("dpo", pc, pr, rc, rr, beta=beta).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if k in CHECKPOINTS:
            save_adapter(pipe, pipe.unet, out.parent / f"{out.name}_{k}", LORA)


def summary(judge: dict, names: list[str]) -> dict:
    """Per arm and checkpoint: the six rounds' gains, mean and SE; latent minus ncp paired by draw, seed and step."""
    gain = {n: judge["versions"][n]["judge_gain_vs_base"] for n in names}
    out = {}
    for arm in ARMS:
        for k in CHECKPOINTS:
            g = [gain[f"{arm}_{d}_{s}_{k}"] for d in range(DRAWS) for s in SEEDS]
            out[f"{arm}@{k}"] = {
                "gains": g,
                "mean": float(np.mean(g)),
                "se": float(np.std(g, ddof=1) / np.sqrt(len(g))),
            }
    for k in CHECKPOINTS:
        dd = [gain[f"latent_{d}_{s}_{k}"] - gain[f"ncp_{d}_{s}_{k}"] for d in range(DRAWS) for s in SEEDS]
        out[f"latent_minus_ncp@{k}"] = {"diffs": dd, "mean": float(np.mean(dd)),
                                        "se": float(np.std(dd, ddof=1) / np.sqrt(len(dd)))}  # fmt: skip
    return out


def table(result: dict) -> str:
    v, s, rows = result["versions"], result["summary"], []
    passes = [k * BATCH / np.mean(result["pairs_per_draw"]) for k in CHECKPOINTS]
    rows.append(
        "| arm | steps (passes) | mean gain (SE) | latent minus ncp, paired (SE) | " + " | ".join(ATTRS) + " |"
    )
    rows.append("|---" * (4 + len(ATTRS)) + "|")
    for arm in ARMS:
        for k, n_pass in zip(CHECKPOINTS, passes, strict=True):
            names = [f"{arm}_{d}_{sd}_{k}" for d in range(DRAWS) for sd in SEEDS]
            attrs = [np.mean([v[n]["attributes"][a] for n in names]) for a in ATTRS]
            m, paired = s[f"{arm}@{k}"], s[f"latent_minus_ncp@{k}"]
            vs = f"{paired['mean']:+.3f} ({paired['se']:.3f})" if arm == "latent" else ""
            rows.append(f"| {arm} | {k} ({n_pass:.1f}) | {m['mean']:+.3f} ({m['se']:.3f}) | {vs} | "
                        + " | ".join(f"{x:.2f}" for x in attrs) + " |")  # fmt: skip
    base = result["base_attributes"]
    rows.append("| base | | | | " + " | ".join(f"{base[a]:.2f}" for a in ATTRS) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "round-space")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "round_space.json")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(args.threads)
    t0, arms = time.time(), args.work / "arms"
    pipe = fresh_pipeline()
    prompts = training_prompts(PROMPTS_PER_DRAW * DRAWS)
    names, counts, betas = [], [], {a: b for a, (*_, b) in ARMS.items()}
    for d in range(DRAWS):
        pairs = make_pairs(pipe, prompts[d * PROMPTS_PER_DRAW : (d + 1) * PROMPTS_PER_DRAW], d)
        counts.append(len(pairs))
        for arm in ARMS:
            betas[arm] = betas[arm] or matched_beta(pairs, arm)
        print(f"draw {d}: {len(pairs)} pairs, betas {betas}, {time.time() - t0:.0f} s", flush=True)
        for arm in ARMS:
            for s in SEEDS:
                name = f"{arm}_{d}_{s}"
                if not (arms / f"{name}_{CHECKPOINTS[-1]}" / WEIGHTS).exists():
                    train_round(pairs, arm, betas[arm], s, arms / name)
                names += [f"{name}_{k}" for k in CHECKPOINTS]
                print(f"  {name} trained, {time.time() - t0:.0f} s", flush=True)
    judge_file = args.work / "eval_judge.json"
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", MODEL, "--threads", str(args.threads), "--probe-set",
           "gate", "--shapes-probes", "96", "--probe-seeds", "2", "--probe-seed-offset", str(EVAL_SEED_OFFSET),
           "--steps", str(DEFAULT_STEPS), "--guidance", str(DEFAULT_GUIDANCE), "--attributes", "--out",
           str(judge_file), *[f"--version={n}={arms / n}" for n in names]]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    judge = json.loads(judge_file.read_text())
    result = {"model": MODEL, "pairs_per_draw": counts, "betas": betas, "base_judge": judge["base_judge"],
              "base_attributes": judge["base_attributes"], "probes": "gate prompts, image seeds 7000-7001",
              "summary": summary(judge, names), "minutes": round((time.time() - t0) / 60, 1),
              "versions": {n: {k: judge["versions"][n][k] for k in ("judge_gain_vs_base", "judge_gain_ci", "attributes")}
                           for n in names}}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
