"""NCP-DPO against latent Diffusion-DPO on the default base, taken apart: which timesteps count vs which metric vs
which beta (issue 25; METHOD.md "Reading results").

    python -m bench.ncp_vs_latent --quick     # < 5 min on 1 thread: every phase on a tiny budget
    python -m bench.ncp_vs_latent             # full: 5 seeds, tuned betas; prints its time estimate first

Arms, all DPO with the loop's settings (LoRA rank 8 on attention, lr 2e-3, batch 8 pairs, t >= 0.3 T, fp32 in every
arm so step costs compare at the same precision):
  latent     latent Diffusion-DPO (paper eq. 8)
  ncp        NCP-DPO (eq. 12-18): PL through the pretrained reference encoder
  latent-w   latent DPO with each sample's errors scaled by w(t) = E[PL/L | t] / mean (TrainConfig.timestep_weights):
             NCP's timestep weighting without its metric; the table of PL/L by t is measured here on the training pairs
  ncp-rand   NCP-DPO through a random-initialised copy of the UNet (TrainConfig.random_encoder): learned perception
             or any fixed feature map?
each at its own beta (tuned on validation prompts: a 3-point grid around its scale, seed 0, final step) and at the
same nominal beta 5000 (the paper's release uses DPO's beta for NCP too).

Data: on-policy pairs of the default base (two images per training prompt), labelled by the judge, ties dropped.
Training and validation prompts exclude EVERY gate probe (`gate_probe_prompts(256)`, the most any gate draws) and
every test probe (`test_probe_prompts(TEST_PROBES)`). Results: judge gains over the base image of the same
(prompt, seed) on the test probes (ncp.evaluate's --probe-set test, seeds from TEST_SEED_OFFSET), pooled over
training seeds, with a bootstrap interval over prompts (a prompt's images form one cluster); steps, training seconds
and votes (pairs drawn: steps x batch) to reach latent DPO's final mean gain. The report is bench/ncp_vs_latent_report.py.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import DDPMScheduler
from PIL import Image

from bench.docs import ROOT, write_section
from bench.ncp_vs_latent_report import markdown, summarize
from ncp.adapters import add_lora, lora_parameters
from ncp.data import load_pairs
from ncp.evaluate import TEST_PROBES, TEST_SEED_OFFSET, gate_probe_prompts, judge_probe, test_probe_prompts
from ncp.latents import collate_pairs, encode_pairs
from ncp.losses import pair_loss
from ncp.perception import per_sample_errors, random_encoder
from ncp.pipelines import encode_prompts, load_pipeline
from ncp.shapes.grammar import probe_prompts
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_ROUND_LR, DEFAULT_STEPS, DEFAULT_TIMESTEP_LOW
from ncp.shapes.rater import judge_preference
from ncp.train_config import TrainConfig
from ncp.trainer import batch_indices

DATA_SEED, DATA_IMAGE_SEED, TIE_MARGIN = 4242, 10_000_000, 0.01
NOMINAL_BETA = 5000.0  # METHOD.md's latent reference beta; the paper's release uses it for NCP too
SCALE = {"latent": 5e3, "ncp": 5e5, "latent-w": 5e3}  # each arm's beta scale (ncp-rand: scaled by its PL/L, below)
ARMS = ("latent", "ncp", "latent-w", "ncp-rand")
BINS = 20  # PL/L is measured in 20 equal bins of the schedule


@dataclass(frozen=True)
class Mode:
    train_prompts: int
    val_prompts: int
    test_prompts: int
    test_seeds: int
    steps: int
    checkpoints: tuple[int, ...]
    seeds: int
    grid: tuple[float, ...]  # multiples of each arm's scale tried on validation (one point: no tuning)
    ratio_pairs: int  # pairs per timestep bin for the PL/L table
    batch: int = 8


MODES = {
    "quick": Mode(40, 8, 12, 1, 12, (6, 12), 1, (1.0,), 4),
    "full": Mode(320, 32, 48, 2, 120, (40, 80, 120), 5, (0.1, 1.0, 10.0), 16),
}


def training_prompts(n: int, *, skip: int = 0) -> list[str]:
    """n held-in grammar prompts (30% two-object) from DATA_SEED, none of them a gate probe (any gate's: the first
    256) or a test probe (all TEST_PROBES). `skip` drops the first ones (validation prompts come first)."""
    excluded = set(gate_probe_prompts(256)) | set(test_probe_prompts(TEST_PROBES))
    drawn = probe_prompts(4 * (n + skip) + 64, seed=DATA_SEED, two_object_prob=0.3)
    kept = [p for p in dict.fromkeys(drawn) if p not in excluded]
    if len(kept) < n + skip:
        raise ValueError(f"only {len(kept)} probe-free prompts can be drawn, {n + skip} asked for")
    return kept[skip : skip + n]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Bench:
    def __init__(self, model: str, mode: Mode, work: Path) -> None:
        self.m, self.work = mode, work
        self.pipe = load_pipeline(model)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_unet = self.pipe.unet.requires_grad_(False)
        self.sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        prompts = training_prompts(mode.train_prompts + mode.val_prompts)
        self.val, self.train_prompts = prompts[: mode.val_prompts], prompts[mode.val_prompts :]
        self.test = test_probe_prompts(mode.test_prompts)
        self.test_seeds = list(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + mode.test_seeds))
        self.eval_unet = self._lora_unet(0)
        self.timing: dict[str, float] = {}

    def _lora_unet(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # the LoRA init (B = 0: every run starts at the base)
        unet = copy.deepcopy(self.base_unet)
        add_lora(unet, TrainConfig(lora_rank=8, lora_alpha=8).lora_settings())
        return unet

    def make_data(self) -> dict:
        """Two base images per training prompt, labelled by the judge, as Pick-a-Pic v2 Parquet; then VAE latents."""
        t0, cols = time.process_time(), {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1")}
        for i in range(0, len(self.train_prompts), 32):
            chunk = self.train_prompts[i : i + 32]
            gens = [torch.Generator().manual_seed(DATA_IMAGE_SEED + 2 * (i + k) + j) for k in range(len(chunk))
                    for j in range(2)]  # fmt: skip
            imgs = self.pipe(prompt=[p for p in chunk for _ in range(2)], generator=gens,
                             num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE).images  # fmt: skip
            for k, p in enumerate(chunk):
                a, b = imgs[2 * k], imgs[2 * k + 1]
                winner = judge_preference(p, a, b, tie_margin=TIE_MARGIN)[0]
                labels = {"left": (1.0, 0.0), "right": (0.0, 1.0)}.get(winner, (0.5, 0.5))
                for col, v in zip(cols, (p, _png(a), _png(b), *labels), strict=True):
                    cols[col].append(v)
        self.timing["image_s"] = (time.process_time() - t0) / (2 * len(self.train_prompts))
        path = self.work / "train.parquet"
        pq.write_table(pa.table(cols), path)
        pairs, report = load_pairs(path)  # ties dropped, as the trainer does
        size = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        self.data = encode_pairs(pairs, self.pipe.vae, resolution=size, model_key="ncp-vs-latent")
        kept = {k: v for k, v in report.to_dict().items() if k != "files"}
        return {"prompts": len(self.train_prompts), "pairs": len(self.data), "load": kept}

    @torch.no_grad()
    def ratio_table(self) -> dict:
        """E[PL/L | t] per bin for the pretrained and the random encoder: the base's errors (LoRA B = 0) on training
        pairs' chosen images, per-sample ratios averaged in each of BINS equal bins of the schedule."""
        T, n = self.sched.config.num_train_timesteps, self.m.ratio_pairs
        rand = random_encoder(self.eval_unet, 0)
        g = torch.Generator().manual_seed(1)
        out = {"bins": BINS, "pl_over_l": [], "rand_pl_over_l": []}
        for k in range(BINS):
            idx = torch.randint(0, len(self.data), (n,), generator=g).tolist()
            lat = torch.stack([self.data[i].chosen for i in idx])
            eps, z = torch.randn(lat.shape, generator=g), torch.randn(lat.shape, generator=g)
            t = torch.randint(k * T // BINS, (k + 1) * T // BINS, (n,), generator=g)
            cond = (encode_prompts(self.pipe, [self.data[i].prompt for i in idx]).encoder_hidden_states, None)
            kw = dict(with_reference=False, variance_noise=z)
            lat_err = per_sample_errors(self.eval_unet, self.sched, lat, eps, t, cond, space="latent", **kw).policy
            for key, enc in (("pl_over_l", None), ("rand_pl_over_l", rand)):
                pl = per_sample_errors(self.eval_unet, self.sched, lat, eps, t, cond, space="ncp", encoder=enc, **kw)
                out[key].append(float((pl.policy / lat_err).mean()))
        lo = int(DEFAULT_TIMESTEP_LOW * BINS)  # weights have mean 1 over the bins the arms train on
        r = np.asarray(out["pl_over_l"])
        out["weights"] = (r / r[lo:].mean()).tolist()
        out["rand_scale"] = float(np.mean(out["rand_pl_over_l"][lo:]) / r[lo:].mean())
        (self.work / "timestep_weights.json").write_text(json.dumps({"weights": out["weights"]}))
        return out

    def config(self, arm: str, beta: float, seed: int) -> TrainConfig:
        return TrainConfig(
            objective="dpo", space="latent" if arm.startswith("latent") else "ncp", beta=beta, lr=DEFAULT_ROUND_LR,
            seed=seed, batch_size=self.m.batch, max_steps=self.m.steps, lora_rank=8, lora_alpha=8,
            timestep_low=DEFAULT_TIMESTEP_LOW, random_encoder=arm == "ncp-rand",
            timestep_weights=str(self.work / "timestep_weights.json") if arm == "latent-w" else "",
        )  # fmt: skip

    def train(self, arm: str, beta: float, seed: int) -> dict:
        """One run with the trainer's own loss and batch order; LoRA weights kept at each checkpoint."""
        cfg = self.config(arm, beta, seed)
        unet = self._lora_unet(seed).train()
        params = lora_parameters(unet)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        encoder = random_encoder(unet, seed) if cfg.random_encoder else None
        rec: dict = {"arm": arm, "beta": beta, "seed": seed, "step_s": [], "acc": [], "ckpt": {}}
        for step in range(cfg.max_steps):
            t0 = (
                time.process_time()
            )  # CPU s of this 1-thread process: wall time on a busy machine times the neighbours
            batch = collate_pairs(
                [self.data[i] for i in batch_indices(len(self.data), cfg.batch_size, step, seed, 1, 0)]
            )
            cond = encode_prompts(self.pipe, list(batch.prompts))
            g = torch.Generator().manual_seed(seed * 100_003 + step)
            out = pair_loss(unet, self.sched, batch, cond, cfg, g, sdxl=False, encoder=encoder)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec["step_s"].append(time.process_time() - t0)
            rec["acc"].append(out.metrics["implicit_acc"])
            if step + 1 in self.m.checkpoints:
                rec["ckpt"][step + 1] = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}
        return rec

    def judge(self, weights: dict | None, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """(prompts, seeds) judge scores of the base (None) or of a checkpoint's LoRA weights."""
        if weights is not None:
            params = dict(self.eval_unet.named_parameters())
            for n, v in weights.items():
                params[n].data.copy_(v)
        self.pipe.unet = self.eval_unet
        try:
            name = None if weights is None else "default"
            return judge_probe(self.pipe, name, prompts, seeds, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE)
        finally:
            self.pipe.unet = self.base_unet


def run(mode_name: str, model: str, work: Path, out_json: Path, doc: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    m, t_start, cpu_start = MODES[mode_name], time.perf_counter(), time.process_time()
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(model, m, work)
    shown = Path(model).resolve()
    shown = str(shown.relative_to(ROOT)) if shown.is_relative_to(ROOT) else model
    res: dict = {"mode": mode_name, "model": shown, "threads": threads, "settings": dict(m.__dict__)}
    res["data"] = bench.make_data()
    print(f"[ncp_vs_latent] data: {res['data']['pairs']} pairs, {time.perf_counter() - t_start:.0f} s", flush=True)
    res["ratios"] = bench.ratio_table()
    scale = SCALE | {"ncp-rand": SCALE["ncp"] / res["ratios"]["rand_scale"]}
    t0 = time.process_time()
    base_val = bench.judge(None, bench.val, [0]) if len(m.grid) > 1 else None
    res["base_test"] = bench.judge(None, bench.test, bench.test_seeds).tolist()
    bench.timing["eval_image_s"] = (time.process_time() - t0) / (len(bench.test) * m.test_seeds + len(bench.val))
    runs: dict[tuple, dict] = {}
    tuned, res["grid"] = {}, {}
    for arm in ARMS:  # each arm's own beta: the grid point with the best validation judge gain (seed 0, last step)
        betas = [float(f"{scale[arm] * k:.3g}") for k in m.grid]
        if len(betas) == 1:
            tuned[arm] = betas[0]
            continue
        vals = {}
        for b in betas:
            runs[(arm, b, 0)] = rec = bench.train(arm, b, 0)
            vals[b] = float((bench.judge(rec["ckpt"][m.steps], bench.val, [0]) - base_val).mean())
        tuned[arm] = max(vals, key=vals.get)
        res["grid"][arm] = vals
    res["tuned_beta"] = tuned
    res["runs"], evals = [], {}
    for seed in range(m.seeds):
        for arm in ARMS:
            for regime, beta in (("tuned", tuned[arm]), ("nominal", NOMINAL_BETA)):
                key = (arm, beta, seed)  # an arm whose tuned beta is the nominal one trains and is judged once
                rec = runs[key] = runs.get(key) or bench.train(arm, beta, seed)
                if key not in evals:
                    evals[key] = {
                        s: bench.judge(w, bench.test, bench.test_seeds).tolist() for s, w in rec["ckpt"].items()
                    }
                print(
                    f"[ncp_vs_latent] {arm} beta {beta:g} seed {seed}: {time.perf_counter() - t_start:.0f} s",
                    flush=True,
                )
                res["runs"].append({k: rec[k] for k in ("arm", "beta", "seed", "step_s", "acc")}
                                   | {"regime": regime, "test": evals[key]})  # fmt: skip
    bench.timing["train_step_s"] = {a: float(np.median([s for r in runs.values() if r["arm"] == a
                                                        for s in r["step_s"][1:]])) for a in ARMS}  # fmt: skip
    res["timing"], res["wall_s"] = bench.timing, time.perf_counter() - t_start
    res["cpu_s"] = time.process_time() - cpu_start  # on a shared machine the wall time says more about the neighbours
    res["estimate_full_min"] = estimate_full(bench.timing, res["data"]["pairs"] / max(1, m.train_prompts))
    res["summary"] = summarize(res)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    write_section(doc, "ncp-vs-latent", markdown(res))
    return res


def estimate_full(timing: dict, pair_yield: float) -> float:
    """Minutes the full mode takes on this machine, from the measured seconds per generated image, per judged probe
    image and per training step of each arm (the PL/L table is a few seconds)."""
    f = MODES["full"]
    images = 2 * f.train_prompts * timing["image_s"]
    runs = {a: len(f.grid) + f.seeds * 2 - 1 for a in ARMS}  # grid runs + seeds x regimes, grid seed 0 reused once
    train = sum(n * f.steps * timing["train_step_s"][a] for a, n in runs.items())
    evals = sum(runs.values()) * len(f.checkpoints) * f.test_prompts * f.test_seeds + len(ARMS) * len(f.grid) * 32
    return (images + train + evals * timing["eval_image_s"]) / 60


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every phase on a tiny budget (< 5 min on 1 thread)")
    p.add_argument("--model", default=str(ROOT / "models" / "shapes-base"), help="the base (default: the default)")
    p.add_argument("--work", type=Path, default=None, help="work dir (default runs/ncp-vs-latent-MODE)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "ncp_vs_latent.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md", help="file the section goes into")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 beside any other busy process)")
    p.add_argument("--render", type=Path, help="only rewrite the section from this result JSON")
    args = p.parse_args(argv)
    if args.render:
        res = json.loads(args.render.read_text())
        res["summary"] = summarize(res)
        write_section(args.doc, "ncp-vs-latent", markdown(res))
        return
    mode = "quick" if args.quick else "full"
    work = args.work or ROOT / "runs" / f"ncp-vs-latent-{mode}"
    res = run(mode, args.model, work, args.out, args.doc, args.threads)
    print(f"[ncp_vs_latent] {mode}: {res['wall_s'] / 60:.1f} min; full mode estimated at "
          f"{res['estimate_full_min']:.0f} min on this machine: python -m bench.ncp_vs_latent --threads 1")  # fmt: skip


if __name__ == "__main__":
    main()
