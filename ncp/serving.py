"""Generation service for the live arena: pairs of images, a prefetch queue, and LoRA hot-swap.

A diffusers pipeline is not thread-safe (STACK_NOTES): one lock is held around each whole pipeline call and each whole
adapter swap, so an image is always produced by exactly one adapter version, and that version is what its record says.

Adapter slots: "live" holds the serving version (hot-swapped in place with diffusers' `load_lora_weights(...,
hotswap=True)`; `enable_lora_hotswap` is called before the first load), "battle" holds another version for a
cross-version pair. "base" means adapters disabled (the reference model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

BASE = "base"
PairKind = Literal["on_policy", "cross_version", "control"]


SchedulerChoice = Literal["model", "dpmpp-2m"]
SCHEDULERS: tuple[str, ...] = ("model", "dpmpp-2m")


class GenerationPaused(RuntimeError):
    """Generation is paused for a training round that has the card to itself (jobs/gpu_plan.py, "exclusive")."""


@dataclass(frozen=True)
class SamplingConfig:
    """How every image of the arena is sampled (recorded with each image).

    scheduler: "model" keeps the pipeline's own (the shapes model's tuned sampler); "dpmpp-2m" is DPM-Solver++ 2M
    with Karras sigmas, the usual fast choice for SDXL / SD1.5 Spaces: at 20 steps about what Euler gives at 30-40
    (Lu et al. 2022; Karras et al. 2022), so a 1024 px pair costs two thirds of it. Fewer steps (12-15) soften fine
    detail first; more than 30 gains little."""

    steps: int = 20
    guidance: float = 4.0
    width: int | None = None  # None: the pipeline's native size (SDXL: 1024)
    height: int | None = None
    scheduler: SchedulerChoice = "model"

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be in 1..200, got {self.steps}.")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}.")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}.")


def apply_scheduler(pipe, choice: str) -> None:  # noqa: ANN001 - a diffusers pipeline
    """Switch the pipeline's sampler to `choice` (SamplingConfig.scheduler); the training schedule is unchanged."""
    if choice == "dpmpp-2m":
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    prompt: str
    seed: int
    base_model: str
    adapter_version: str
    scheduler: str
    steps: int
    guidance: float
    width: int
    height: int
    png: bytes = field(repr=False)
    sha256: str = ""


@dataclass(frozen=True)
class PairMix:
    """Share of each pair kind the prefetcher produces (normalised)."""

    on_policy: float = 0.6
    cross_version: float = 0.3
    control: float = 0.1

    def __post_init__(self) -> None:
        vals = (self.on_policy, self.cross_version, self.control)
        if min(vals) < 0 or sum(vals) <= 0:
            raise ValueError(f"PairMix shares must be >= 0 with a positive sum, got {vals}.")


@dataclass(frozen=True)
class ReadyPair:
    prompt: str
    left: GeneratedImage
    right: GeneratedImage
    kind: PairKind
    broken_side: Literal["left", "right"] | None = None  # control pairs only
    made_at: float = 0.0
    epoch: int = 0  # the service's swap counter when the pair was made: pairs of an older epoch are stale
    stored: object = None  # what the prefetcher's `prepare` hook recorded (e.g. the store's row ids), if any


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def corrupt(image: Image.Image, seed: int) -> Image.Image:
    """A deliberately broken image for attention checks: tiles shuffled and heavy noise, obvious to any rater."""
    rng = np.random.default_rng(seed)
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = a.shape[:2]
    t = max(4, min(h, w) // 4)
    tiles = [a[y : y + t, x : x + t].copy() for y in range(0, h - h % t, t) for x in range(0, w - w % t, t)]
    order = rng.permutation(len(tiles))
    out = a.copy()
    i = 0
    for y in range(0, h - h % t, t):
        for x in range(0, w - w % t, t):
            out[y : y + t, x : x + t] = tiles[order[i]]
            i += 1
    out = out + rng.normal(0, 60, out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


ZERO_ADAPTER = "<zero>"  # what a warmed slot holds before its first real version


class PairMaker:
    """make_pair for any service with `generate`, `serving_version` and `epoch` (in process or in a worker process)."""

    serving_version: str
    epoch: int

    def generate(self, prompt: str, seeds: Sequence[int], version: str | None = None) -> list[GeneratedImage]:
        raise NotImplementedError

    def make_pair(
        self, prompt: str, kind: PairKind, rng: random.Random, battle_versions: Sequence[str] = ()
    ) -> ReadyPair:
        """Generate one pair of `kind`; sides are shuffled so raters cannot learn a position.

        The serving version is read once and passed explicitly to every generate call, so a hot-swap in the middle
        cannot turn a cross-version pair into a pair of one version (the store would refuse it)."""
        serving = self.serving_version
        seeds = [rng.randrange(2**31), rng.randrange(2**31)]
        broken: Literal["left", "right"] | None = None
        others = [v for v in battle_versions if v != serving]
        if kind == "cross_version" and not others:
            kind = "on_policy"
        if kind == "cross_version":
            imgs = [
                self.generate(prompt, seeds[:1], version=serving)[0],
                self.generate(prompt, seeds[1:], version=rng.choice(others))[0],
            ]
        elif kind == "on_policy":
            imgs = self.generate(prompt, seeds, version=serving)
        else:  # control: an attention check with one deliberately broken image (same version, so only quality differs)
            good = self.generate(prompt, seeds[:1], version=serving)[0]
            bad_img = corrupt(good.image, seeds[1])
            png = _png(bad_img)
            bad = dataclasses.replace(good, image=bad_img, png=png, sha256=hashlib.sha256(png).hexdigest())
            imgs = [good, bad]
        swapped = rng.random() < 0.5
        if swapped:
            imgs.reverse()
        if kind == "control":
            broken = "left" if swapped else "right"
        return ReadyPair(prompt, imgs[0], imgs[1], kind, broken, time.time(), self.epoch)


class GenerationService(PairMaker):
    """Owns a pipeline; generates batches under one lock; swaps LoRA versions in place."""

    def __init__(self, pipe, base_model: str, sampling: SamplingConfig | None = None, lora_rank: int = 64) -> None:
        self.pipe = pipe
        self.base_model = base_model
        self.sampling = sampling or SamplingConfig()
        self._lock = threading.Lock()
        self._lora_rank = lora_rank
        self._slots: dict[str, str] = {}  # slot name -> version loaded there
        self._folders: dict[str, Path] = {}
        self._serving = BASE
        self._hotswap_enabled = False
        self.last_swap_s = 0.0
        self.epoch = 0  # incremented by every swap
        self._released: torch.device | None = None  # where the weights were before release_device()
        apply_scheduler(pipe, self.sampling.scheduler)

    @property
    def serving_version(self) -> str:
        return self._serving

    def register_version(self, version: str, folder: Path) -> None:
        """Make a version's adapter folder known, so it can be served or battled."""
        self._folders[version] = Path(folder)

    def known_versions(self) -> list[str]:
        return [BASE, *self._folders]

    def warm_slots(self, target_modules: Sequence[str], alpha: float) -> float:
        """Create both adapter slots now as zero (identity) LoRAs of the deployment's rank, so that every later load,
        the first one included, is an in-place hot-swap: creating LoRA layers takes ~5x longer than copying weights
        into them, and would otherwise stall generation on the first swap. Returns the seconds it took."""
        from peft import LoraConfig

        t0 = time.perf_counter()
        with self._lock:
            if self._slots:
                return 0.0
            self.pipe.enable_lora_hotswap(target_rank=self._lora_rank)
            self._hotswap_enabled = True
            for slot in ("live", "battle"):
                config = LoraConfig(r=self._lora_rank, lora_alpha=alpha, target_modules=list(target_modules))
                self.pipe.unet.add_adapter(config, adapter_name=slot)  # lora_B = 0: the base model's output
                self._slots[slot] = ZERO_ADAPTER
            self._activate(self._serving)
        return time.perf_counter() - t0

    # -- adapter slots (call with the lock held) --------------------------------------------------------------------
    def _load_into(self, slot: str, version: str) -> None:
        if self._slots.get(slot) == version:
            return
        folder = self._folders.get(version)
        if folder is None:
            raise KeyError(f"Unknown adapter version {version!r}; known: {', '.join(self.known_versions())}.")
        if not self._hotswap_enabled:
            # Must happen before the first adapter is loaded; smaller ranks are padded up to target_rank.
            self.pipe.enable_lora_hotswap(target_rank=self._lora_rank)
            self._hotswap_enabled = True
        self.pipe.load_lora_weights(str(folder), adapter_name=slot, hotswap=slot in self._slots)
        self._slots[slot] = version

    def _activate(self, version: str) -> None:
        if version == BASE:
            if self._slots:
                self.pipe.disable_lora()
            return
        slot = "live" if version == self._serving else "battle"
        self._load_into(slot, version)
        self.pipe.enable_lora()
        self.pipe.set_adapters([slot])

    def swap_adapter(self, version: str) -> float:
        """Serve `version` (a registered version or "base") from now on; returns the seconds the swap held the lock
        (generation pauses that long; waiting for the call in flight is not counted)."""
        if version != BASE and version not in self._folders:
            raise KeyError(f"Unknown adapter version {version!r}; known: {', '.join(self.known_versions())}.")
        with self._lock:  # waits for the generation in flight; the stall is the time held below
            t0 = time.perf_counter()
            if version != BASE:
                self._load_into("live", version)
            self._serving = version
            self.epoch += 1
            self.last_swap_s = time.perf_counter() - t0
        logger.info("now serving %s (swap took %.1f ms)", version, 1000 * self.last_swap_s)
        return self.last_swap_s

    def card_info(self):  # noqa: ANN201 - ncp.memory.CardInfo | None
        """The CUDA card the pipeline runs on (None on the CPU): the GPU plan's input (jobs/gpu_plan.py)."""
        from ncp.memory import cuda_card

        device = self.pipe.device
        return cuda_card(str(device)) if device.type == "cuda" else None

    def release_device(self) -> float:
        """Move the weights off the GPU for a round that trains alone on the card (jobs/gpu_round.py); generation
        refuses (GenerationPaused) until `restore_device`. Nothing to do on the CPU. Returns the seconds it took."""
        with self._lock:
            device = self.pipe.device
            if device.type != "cuda" or self._released is not None:
                return 0.0
            t0 = time.perf_counter()
            self.pipe.to("cpu")
            torch.cuda.empty_cache()
            self._released = device
            return time.perf_counter() - t0

    def restore_device(self) -> float:
        """Bring the weights back to the GPU after `release_device`; returns the seconds it took."""
        with self._lock:
            if self._released is None:
                return 0.0
            t0 = time.perf_counter()
            self.pipe.to(self._released)
            self._released = None
            return time.perf_counter() - t0

    def generate(self, prompt: str, seeds: Sequence[int], version: str | None = None) -> list[GeneratedImage]:
        """One batched pipeline call: len(seeds) images of `prompt` made by `version` (default: serving)."""
        if not seeds:
            raise ValueError("generate needs at least one seed.")
        s = self.sampling
        kwargs = {"num_inference_steps": s.steps, "guidance_scale": s.guidance}
        if s.width and s.height:
            kwargs.update(width=s.width, height=s.height)
        with self._lock:
            if self._released is not None:
                raise GenerationPaused("the pipeline is off the GPU while a training round has the card")
            used = self._serving if version is None else version
            self._activate(used)
            gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
            with torch.inference_mode():
                images = self.pipe(prompt=[prompt] * len(seeds), generator=gens, **kwargs).images
            if used != self._serving:
                self._activate(self._serving)
        out = []
        for img, seed in zip(images, seeds, strict=True):
            png = _png(img)
            out.append(
                GeneratedImage(
                    image=img,
                    prompt=prompt,
                    seed=int(seed),
                    base_model=self.base_model,
                    adapter_version=used,
                    scheduler=type(self.pipe.scheduler).__name__,
                    steps=s.steps,
                    guidance=s.guidance,
                    width=img.width,
                    height=img.height,
                    png=png,
                    sha256=hashlib.sha256(png).hexdigest(),
                )
            )
        return out

    def close(self) -> None:
        """Nothing to release in process (the worker-process service stops its process here)."""
