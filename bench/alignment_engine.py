"""The engine of `bench/alignment.py` (issue 7): probe sets, judge-labelled on-policy pair data, in-process LoRA
training of one method with the trainer's own loss, checkpoint evaluation by the pixel judge, and the resumable state.
Run it through `python bench/alignment.py` (see its docstring for the method and the modes).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import gc
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import DDPMScheduler
from PIL import Image
from tqdm import tqdm

from ncp.adapters import LoraSettings, add_lora, lora_parameters
from ncp.data import PairBatch, collate_pairs, encode_pairs, load_pairs
from ncp.evaluate import PROBE_SEED
from ncp.pipelines import encode_prompts, load_pipeline, uncond_conditioning
from ncp.shapes.grammar import probe_prompts
from ncp.shapes.judge import ATTRIBUTES, score
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, IMAGE_SIZE
from ncp.shapes.rater import SimulatedRater, judge_preference
from ncp.trainer import TrainConfig, batch_indices, pair_loss

# Who labels the training pairs: the judge's sign (default), or the loop benchmark's simulated rater (bench/raters.py:
# logistic choice at temperature 0.05, both_bad when both images score under 0.3), to compare the two on one set.
LABELS: dict[str, SimulatedRater | None] = {"judge": None, "rater": SimulatedRater(noise=0.05, seed=11)}
DATA_SEED = 4242  # training/validation prompts; the test probes use ncp.evaluate.PROBE_SEED
DATA_IMAGE_SEED = 10_000_000  # image j of training prompt i: DATA_IMAGE_SEED + 3 i + j (disjoint from probe seeds)
TWO_OBJECT_PROB = 0.3
TIE_MARGIN = 0.01  # judge differences up to this are ties (dropped, as the reference DPO code drops ties)
CPO_LAMBDA = 1.0  # weight of the chosen-image error in cpo (paper eq. 9-11)
LORA_RANK = 8  # = alpha, the deployment's (jobs/loop.py LoopConfig)
TARGETS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn+conv": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
}
METHODS = [(o, s) for s in ("latent", "ncp") for o in ("dpo", "cpo", "sft")]
# The one-point grid of --quick (lr 1e-3): METHOD.md's latent reference beta, the deployment's ncp-dpo beta (5e5, about
# 100x: PL differences are ~c_t^2 x the latent ones); sft has no beta.
NOMINAL = {("dpo", "latent"): 5e3, ("cpo", "latent"): 1e3, ("sft", "latent"): None,
           ("dpo", "ncp"): 5e5, ("cpo", "ncp"): 1e6, ("sft", "ncp"): None}  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """Sizes of one mode. Prompts are counts; each training prompt gives one pair (two images)."""

    train_prompts: int
    pool_prompts: int  # training prompts that get a third image (data ablation pool); 0 = no data ablation
    val_prompts: int
    test_prompts: int
    heldout_prompts: int
    probe_seeds: int  # image seeds per validation/test/held-out prompt
    steps: int
    checkpoints: int  # evaluations along training (evenly spaced, the last at `steps`)
    batch: int  # pairs per optimizer step
    seeds: int  # seeds of each method at its best setting
    ablation_seeds: int  # seeds of each ablation run (0 = no ablations)
    sample_steps: int = DEFAULT_STEPS  # DDIM steps of every generated image (shipped default)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name in ("pool_prompts", "val_prompts", "ablation_seeds") else 1
            if not isinstance(value, int) or value < low:
                raise ValueError(f"Budget.{f.name}={value!r} must be an integer >= {low}.")
        if self.pool_prompts > self.train_prompts or self.checkpoints > self.steps or self.ablation_seeds > self.seeds:
            raise ValueError("Need pool_prompts <= train_prompts, checkpoints <= steps, ablation_seeds <= seeds.")


@dataclass(frozen=True)
class RunSpec:
    """One training run; `key` identifies it in the resumable state."""

    objective: str
    space: str
    lr: float
    beta: float | None
    seed: int
    data: str = "all"  # all | pool-all | pool-aw
    include_mid: bool = False
    targets: str = "attn"
    rank: int = LORA_RANK  # LoRA rank = alpha (the deployment's unless a sweep config asks for another)
    anchor: float = 0.0  # DPO-Positive lambda (ncp.objectives; 0 = plain DPO)
    draws: int = 1  # (t, eps) draws per pair per step
    uncond: float = 0.0  # weight holding the empty-prompt prediction at the reference's (ncp.losses.uncond_drift)
    trange: tuple[float, float] = (0.0, 1.0)  # training timesteps as fractions of the schedule (ncp.losses)

    @property
    def method(self) -> str:
        return f"{self.space}-{self.objective}"

    @property
    def key(self) -> str:
        beta = "-" if self.beta is None else f"{self.beta:g}"
        return (f"{self.method}|lr={self.lr:g}|beta={beta}|seed={self.seed}|data={self.data}"
                f"|mid={int(self.include_mid)}|lora={self.targets}"
                + ("" if self.rank == LORA_RANK else f"|r={self.rank}")
                + (f"|anchor={self.anchor:g}" if self.anchor else "") + (f"|draws={self.draws}" if self.draws > 1 else "") + (f"|uncond={self.uncond:g}" if self.uncond else "")
                + ("" if tuple(self.trange) == (0.0, 1.0) else f"|t={self.trange[0]:g}-{self.trange[1]:g}"))  # fmt: skip

    def config(self, budget: Budget) -> TrainConfig:
        return TrainConfig(
            objective=self.objective, space=self.space, beta=self.beta or 1.0, lr=self.lr, seed=self.seed,
            sft_weight=CPO_LAMBDA if self.objective == "cpo" else 0.0, batch_size=budget.batch,
            max_steps=budget.steps, lora_rank=self.rank, lora_alpha=self.rank, lora_targets=TARGETS[self.targets],
            include_mid=self.include_mid, dpo_anchor=self.anchor, noise_draws=self.draws, uncond_weight=self.uncond,
            timestep_low=self.trange[0], timestep_high=self.trange[1],
        )  # fmt: skip


class Bench:
    """The loaded model, data and probe sets, and the resumable state (`work/state.json`)."""

    def __init__(
        self,
        mode: str,
        budget: Budget,
        grid: dict,
        work: Path,
        model: Path,
        device: str,
        labels: str = "judge",
        pairs_file: Path | None = None,
    ) -> None:
        if labels not in LABELS:
            raise ValueError(f"labels must be one of {sorted(LABELS)}, got {labels!r}.")
        self.mode, self.b, self.work, self.device, self.labels = mode, budget, work, device, labels
        self.pairs_file = pairs_file  # train on these Pick-a-Pic rows (e.g. a loop snapshot) instead of sampling
        self.grid = grid  # (objective, space) -> [(lr, beta)]
        self.checkpoints = sorted(
            {round(budget.steps * k / budget.checkpoints) for k in range(1, budget.checkpoints + 1)}
        )
        self.pipe = load_pipeline(model, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_unet = self.pipe.unet.requires_grad_(False)
        self.scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.uncond = uncond_conditioning(self.pipe)  # for runs that hold the empty-prompt branch (RunSpec.uncond)
        self.state_path = work / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        test = probe_prompts(budget.test_prompts, seed=PROBE_SEED, two_object_prob=TWO_OBJECT_PROB)
        held = probe_prompts(budget.heldout_prompts, seed=PROBE_SEED, two_object_prob=TWO_OBJECT_PROB, held_out=True)
        n = budget.train_prompts + budget.val_prompts
        pool = probe_prompts(n + len(test), seed=DATA_SEED, two_object_prob=TWO_OBJECT_PROB)
        pool = [p for p in dict.fromkeys(pool) if p not in set(test)]  # prompt-disjoint from the test probes
        if len(pool) < n:
            raise ValueError(f"Only {len(pool)} distinct training/validation prompts (asked {n}); lower the budget.")
        self.val_prompts, self.train_prompts = pool[: budget.val_prompts], pool[budget.val_prompts : n]
        self.sets = {
            name: [(p, s * 100003 + i) for s in range(budget.probe_seeds) for i, p in enumerate(prompts)]
            for name, prompts in (("val", self.val_prompts), ("test", test), ("heldout", held))
        }
        self.base_images: dict[str, list[np.ndarray]] = {}
        self.datasets: dict[str, list] = {}
        self.eval_unets: dict[tuple[str, int], torch.nn.Module] = {}

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, allow_nan=True))
        tmp.replace(self.state_path)

    # ----------------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, items: list[tuple[str, int]], desc: str, batch: int = 32) -> list[np.ndarray]:
        """One uint8 image per (prompt, generator seed), the shipped guidance, `sample_steps` DDIM steps."""
        images: list[np.ndarray] = []
        for start in tqdm(range(0, len(items), batch), desc=desc, leave=False, disable=len(items) <= batch):
            chunk = items[start : start + batch]
            out = self.pipe(
                prompt=[p for p, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                num_inference_steps=self.b.sample_steps, guidance_scale=DEFAULT_GUIDANCE, height=IMAGE_SIZE,
                width=IMAGE_SIZE, output_type="np",
            ).images  # fmt: skip
            images += [np.clip(np.rint(im * 255), 0, 255).astype(np.uint8) for im in out]
        return images

    def judge(self, images: list[np.ndarray], name: str, base: bool = False) -> dict[str, Any]:
        """Judge scores of a probe set's images; vs the base images of the same probes unless `base`."""
        results = [score(img, p) for img, (p, _) in zip(images, self.sets[name], strict=True)]
        overall = np.array([r.overall for r in results])
        rec: dict[str, Any] = {
            "judge": float(overall.mean()),
            "accuracy": {a: float(np.mean([r.attributes_correct[a] for r in results])) for a in ATTRIBUTES},
            "all_correct": float(np.mean([r.all_correct for r in results])),
            "cleanliness": float(np.mean([r.cleanliness for r in results])),
            "overall": [round(float(x), 5) for x in overall],
        }
        if not base:
            d = overall - np.array(self.state["evals"][f"base@0@{name}"]["overall"])
            rec["win_rate"] = float(np.mean((d > 1e-5) + 0.5 * (np.abs(d) <= 1e-5)))
            pix = [
                np.abs(a.astype(np.float32) - b).mean() / 255
                for a, b in zip(images, self.base_images[name], strict=True)
            ]
            rec["pixel_change"] = float(np.mean(pix))
        return rec

    def base_eval(self, name: str) -> None:
        path = self.work / f"base_{name}.npz"
        if f"base@0@{name}" in self.state["evals"] and path.exists():
            self.base_images[name] = list(np.load(path)["images"])
            return
        images = self.generate(self.sets[name], f"base {name}")
        np.savez_compressed(path, images=np.stack(images))
        self.base_images[name] = images
        self.state["evals"][f"base@0@{name}"] = self.judge(images, name, base=True)
        self.save()

    # ----------------------------------------------------------------------------------------------- data

    def make_data(self) -> None:
        """Pick-a-Pic v2 Parquet of judge-labelled on-policy pairs (cached in work/data), then the encoded datasets."""
        folder = self.work / "data"
        if "data" not in self.state and self.pairs_file is not None:
            folder.mkdir(parents=True, exist_ok=True)
            rows = pq.read_table(self.pairs_file)
            pq.write_table(rows, folder / "train.parquet")
            ties = sum(x == 0.5 for x in rows.column("label_0").to_pylist())
            self.state["data"] = {"train": {"rows": rows.num_rows, "ties": ties, "from": str(self.pairs_file)}}
            self.save()
        if "data" not in self.state:
            k = [3 if i < self.b.pool_prompts else 2 for i in range(len(self.train_prompts))]
            items = [(p, DATA_IMAGE_SEED + 3 * i + j) for i, p in enumerate(self.train_prompts) for j in range(k[i])]
            flat = iter(self.generate(items, "sample pairs"))
            images = [[next(flat) for _ in range(n)] for n in k]
            pairs = {"train": [(i, 0, 1) for i in range(len(k))]}
            if self.b.pool_prompts:
                pairs["pool"] = [(i, a, b) for i in range(self.b.pool_prompts) for a, b in ((0, 1), (0, 2), (1, 2))]
            folder.mkdir(parents=True, exist_ok=True)
            rater = LABELS[self.labels]
            self.state["data"] = {n: _write_pairs(folder / f"{n}.parquet", rows, self.train_prompts, images, rater)
                                  for n, rows in pairs.items()}  # fmt: skip
            self.save()
        sources = {"all": ("train", False), "pool-all": ("pool", False), "pool-aw": ("pool", True)}
        for name, (file, aw) in sources.items():
            if (folder / f"{file}.parquet").exists():
                loaded, report = load_pairs(folder / f"{file}.parquet", absolute_winners=aw)
                self.state["data"][f"loaded:{name}"] = {k: v for k, v in report.to_dict().items() if k != "files"}
                self.datasets[name] = encode_pairs(loaded, self.pipe.vae, resolution=IMAGE_SIZE, model_key="bench")

    # ----------------------------------------------------------------------------------------------- training

    def _unet(self, spec: RunSpec) -> torch.nn.Module:
        torch.manual_seed(spec.seed)  # the LoRA init (A Gaussian, B zero: the run starts at the base model)
        unet = copy.deepcopy(self.base_unet)
        add_lora(unet, LoraSettings(rank=spec.rank, alpha=spec.rank, target_modules=TARGETS[spec.targets]))
        return unet

    def train(self, spec: RunSpec) -> dict[str, Any]:
        """Train one run (or return its stored record); LoRA weights saved at every checkpoint."""
        if spec.key in self.state["runs"]:
            return self.state["runs"][spec.key]
        data, b = self.datasets.get(spec.data, []), self.b
        rec: dict[str, Any] = {"spec": dataclasses.asdict(spec), "method": spec.method, "checkpoints": {}}
        if len(data) < 1:
            rec["skipped"] = f"dataset {spec.data!r} has no pairs"
        else:
            unet, cfg = self._unet(spec).train(), spec.config(b)
            params = lora_parameters(unet)
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            folder = self.work / "ckpt" / f"run{len(self.state['runs']):04d}"
            folder.mkdir(parents=True, exist_ok=True)
            wall, cpu, hist = [], [], []
            for step in tqdm(range(1, b.steps + 1), desc=spec.method, leave=False):
                batch = collate_pairs([data[i] for i in batch_indices(len(data), b.batch, step - 1, spec.seed, 1, 0)])
                gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + step)
                mem0 = _mem_begin(self.device) if step == 1 else 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                cond = encode_prompts(self.pipe, list(batch.prompts))
                out = pair_loss(unet, self.scheduler, batch, cond, cfg, gen, sdxl=False, uncond=self.uncond)
                peak = _mem_now(self.device) if step == 1 else 0.0
                if not math.isfinite(out.metrics["loss"]):
                    rec["diverged_at"] = step
                    break
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if step == 1:
                    rec["peak_mem_mb"] = max(peak, _mem_now(self.device)) - mem0
                hist.append(out.metrics)
                if step in self.checkpoints:
                    path = folder / f"step-{step}.pt"
                    torch.save({n: p.detach().cpu() for n, p in unet.named_parameters() if p.requires_grad}, path)
                    rec["checkpoints"][str(step)] = {"path": str(path.relative_to(self.work)), "seconds": sum(wall),
                                                     "cpu_seconds": sum(cpu)}  # fmt: skip
            tail = hist[-10:]
            final = {k: float(np.mean([h[k] for h in tail])) for k in (tail[0] if tail else {})}  # last 10 steps
            rec |= {"steps": len(hist), "step_s": float(np.median(wall)) if wall else math.nan,
                    "step_cpu_s": float(np.median(cpu)) if cpu else math.nan, "train_s": sum(wall),
                    "threads": torch.get_num_threads(), "loadavg_after": os.getloadavg()[0],
                    "final_metrics": final}  # fmt: skip
        self.state["runs"][spec.key] = rec
        self.save()
        return rec

    def evaluate(self, spec: RunSpec, step: int, name: str) -> dict[str, Any]:
        """Judge a run's checkpoint on a probe set (stored; step 0 is the base model)."""
        key = f"{spec.key}@{step}@{name}"
        if step == 0 or key in self.state["evals"]:
            return self.state["evals"][f"base@0@{name}" if step == 0 else key]
        ckpt = self.state["runs"][spec.key]["checkpoints"].get(str(step))
        if ckpt is None:  # diverged or skipped run
            rec: dict[str, Any] = {"judge": math.nan, "win_rate": math.nan, "missing": True}
        else:
            weights = torch.load(self.work / ckpt["path"], map_location="cpu", weights_only=True)
            # One LoRA UNet per target set and rank; a checkpoint holds all its weights.
            shape = (spec.targets, spec.rank)
            if shape not in self.eval_unets:
                self.eval_unets[shape] = self._unet(spec).eval()
            params = dict(self.eval_unets[shape].named_parameters())
            for n, value in weights.items():
                params[n].data.copy_(value)
            self.pipe.unet = self.eval_unets[shape]
            try:
                rec = self.judge(self.generate(self.sets[name], f"eval {spec.method} {name}"), name)
            finally:
                self.pipe.unet = self.base_unet
        self.state["evals"][key] = rec
        self.save()
        return rec

    # ----------------------------------------------------------------------------------------------- phases

    def best(self, method: tuple[str, str]) -> tuple[float, float | None]:
        """The grid point with the best validation judge score at the last step (seed 0)."""
        grid, last = self.grid[method], self.b.steps
        if len(grid) == 1 or not self.sets["val"]:
            return grid[0]
        vals = {g: self.evaluate(RunSpec(*method, *g, seed=0), last, "val")["judge"] for g in grid}
        name = f"{method[1]}-{method[0]}"
        self.state.setdefault("selection", {})[name] = {"val_judge": [[*g, v] for g, v in vals.items()]}
        return max(grid, key=lambda g: -math.inf if math.isnan(vals[g]) else vals[g])

    def ablations(self, best: dict[tuple[str, str], tuple[float, float | None]]) -> list[dict[str, Any]]:
        """Ablation rows {name, seed, variant, baseline} at the methods' best settings."""
        rows = []
        for seed in range(self.b.ablation_seeds):
            ncp = RunSpec("dpo", "ncp", *best[("dpo", "ncp")], seed)
            lat = RunSpec("dpo", "latent", *best[("dpo", "latent")], seed)
            pairs = [
                ("encoder down+mid vs down (ncp-dpo)", dataclasses.replace(ncp, include_mid=True), ncp),
                ("LoRA attn+conv vs attn (latent-dpo)", dataclasses.replace(lat, targets="attn+conv"), lat),
                ("LoRA attn+conv vs attn (ncp-dpo)", dataclasses.replace(ncp, targets="attn+conv"), ncp),
            ]
            if self.b.pool_prompts:
                aw, pool = dataclasses.replace(ncp, data="pool-aw"), dataclasses.replace(ncp, data="pool-all")
                pairs.insert(0, ("absolute winners vs all pairs of the pool (ncp-dpo)", aw, pool))
            rows += [{"name": n, "seed": seed, "variant": v, "baseline": c} for n, v, c in pairs]
        return rows

    def plan(self) -> dict[str, float]:
        """Remaining images and training steps per space (the grid's seed-0 runs are reused as final seed 0)."""
        b, sizes = self.b, {k: len(v) for k, v in self.sets.items()}
        images = 0 if "data" in self.state else b.train_prompts * 2 + b.pool_prompts
        images += sum(n for k, n in sizes.items() if f"base@0@{k}" not in self.state.get("evals", {}))
        runs = {"latent": 0, "ncp": 0}
        for (_, space), grid in self.grid.items():
            runs[space] += len(grid) + b.seeds - 1
            images += (len(grid) if len(grid) > 1 else 0) * sizes["val"]
            images += b.seeds * (len(self.checkpoints) * sizes["test"] + sizes["heldout"])
        n_abl = 3 + 2 * (b.pool_prompts > 0)  # new runs per ablation seed, one of them in latent space
        runs["latent"] += b.ablation_seeds
        runs["ncp"] += b.ablation_seeds * (n_abl - 1)
        images += b.ablation_seeds * n_abl * sizes["test"]
        for rec in self.state.get("runs", {}).values():
            runs[rec["spec"]["space"]] -= 1
        images -= sum(
            len(r.get("overall", [])) for k, r in self.state.get("evals", {}).items() if not k.startswith("base@")
        )
        return {
            "images": max(0, images),
            "latent": max(0, runs["latent"]) * b.steps,
            "ncp": max(0, runs["ncp"]) * b.steps,
        }

    def calibrate(self) -> dict[str, float]:
        """Seconds per probe image and per optimizer step (dpo, the costliest objective, in each space)."""
        items = self.sets["test"][:8]
        t0 = time.perf_counter()
        self.generate(items, "calibrate")
        out = {"image_s": (time.perf_counter() - t0) / len(items)}
        g = torch.Generator().manual_seed(0)
        lat = torch.randn(self.b.batch, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2, generator=g)
        prompts = tuple((self.train_prompts * self.b.batch)[: self.b.batch])
        batch = PairBatch(prompts, lat, lat.flip(0), torch.zeros(self.b.batch, 6))
        for space in ("latent", "ncp"):
            spec = RunSpec("dpo", space, 1e-4, NOMINAL[("dpo", space)], 0)
            unet, times = self._unet(spec).train(), []
            for _ in range(3):
                t0 = time.perf_counter()
                cond = encode_prompts(self.pipe, list(prompts))
                pair_loss(unet, self.scheduler, batch, cond, spec.config(self.b), g, sdxl=False).loss.backward()
                times.append(time.perf_counter() - t0)
            out[f"{space}_step_s"] = float(np.median(times[1:]))  # the first step pays one-off allocations
        return out


def _write_pairs(
    path: Path, rows: list[tuple[int, int, int]], prompts: list[str], images: list, rater: SimulatedRater | None = None
) -> dict[str, int]:
    """Labelled pairs as Pick-a-Pic v2 columns: by the judge's sign, or by a simulated rater's vote when `rater` is
    given (ties and both_bad written as 0.5/0.5, which the loader drops, as the arena's export does)."""
    cols: dict[str, list] = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "score_0", "score_1")}
    for i, a, b in rows:
        winner, s0, s1 = judge_preference(prompts[i], images[i][a], images[i][b], tie_margin=TIE_MARGIN)
        winner = winner if rater is None else rater.decide(s0, s1)
        labels = {"left": (1.0, 0.0), "right": (0.0, 1.0)}.get(winner, (0.5, 0.5))
        for col, value in zip(
            cols, (prompts[i], _png(images[i][a]), _png(images[i][b]), *labels, s0, s1), strict=True
        ):
            cols[col].append(value)
    pq.write_table(pa.table(cols), path)
    return {"rows": len(rows), "ties": int(sum(x == 0.5 for x in cols["label_0"]))}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mem_begin(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory goes back to the OS, so the step's growth shows in RSS
    return _rss_mb()


def _mem_now(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mb()
