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
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

BASE = "base"
PairKind = Literal["on_policy", "cross_version", "control"]


@dataclass(frozen=True)
class SamplingConfig:
    """How every image of the arena is sampled (recorded with each image)."""

    steps: int = 20
    guidance: float = 4.0
    width: int | None = None  # None: the pipeline's native size
    height: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 200:
            raise ValueError(f"steps must be in 1..200, got {self.steps}.")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}.")


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

    def generate(self, prompt: str, seeds: Sequence[int], version: str | None = None) -> list[GeneratedImage]:
        """One batched pipeline call: len(seeds) images of `prompt` made by `version` (default: serving)."""
        if not seeds:
            raise ValueError("generate needs at least one seed.")
        s = self.sampling
        kwargs = {"num_inference_steps": s.steps, "guidance_scale": s.guidance}
        if s.width and s.height:
            kwargs.update(width=s.width, height=s.height)
        with self._lock:
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


class PairPrefetcher:
    """Keeps up to `size` ready pairs so a rater never waits for diffusion; one background thread.

    The queue is flushed on a hot-swap so raters see the new version at once (pairs already issued keep their
    recorded lineage).
    """

    def __init__(
        self,
        service: GenerationService,
        next_prompt: Callable[[random.Random], str],
        battle_versions: Callable[[], Sequence[str]],
        mix: PairMix | None = None,
        size: int = 8,
        seed: int = 0,
        prepare: Callable[[ReadyPair], ReadyPair] | None = None,
    ) -> None:
        self.service = service
        # Runs in the prefetch thread on every pair before it is queued (the arena stores images and rows there, so
        # a rater's request only issues the pair).
        self.prepare = prepare
        self.next_prompt = next_prompt
        self.battle_versions = battle_versions
        self.mix = mix or PairMix()
        self.size = size
        self._queue: queue.Queue[ReadyPair] = queue.Queue(maxsize=size)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def _choose_kind(self) -> PairKind:
        m = self.mix
        return self._rng.choices(["on_policy", "cross_version", "control"], [m.on_policy, m.cross_version, m.control])[
            0
        ]

    def produce_one(self, prompt: str | None = None) -> ReadyPair:
        with self._rng_lock:
            kind = self._choose_kind()
            prompt = prompt or self.next_prompt(self._rng)
            rng = random.Random(self._rng.randrange(2**63))
        return self.service.make_pair(prompt, kind, rng, list(self.battle_versions()))

    def _run(self) -> None:
        torch.set_num_threads(1)
        while not self._stop.is_set():
            if self._queue.full():
                self._stop.wait(0.05)
                continue
            try:
                pair = self.produce_one()
            except Exception:  # keep serving: a failed generation must not kill the prefetch thread
                self.errors += 1
                logger.exception("prefetch generation failed")
                self._stop.wait(1.0)
                continue
            if pair.epoch != self.service.epoch:
                continue  # made before a hot-swap: raters should see the new version
            if self.prepare is not None:
                try:
                    pair = self.prepare(pair)
                except Exception:  # the request path stores it instead
                    logger.exception("preparing a prefetched pair failed")
            try:
                self._queue.put(pair, timeout=1.0)
            except queue.Full:
                continue

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()  # startable again after stop()
            self._thread = threading.Thread(target=self._run, name="pair-prefetch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def get(self, timeout: float = 30.0) -> ReadyPair:
        """A ready pair. When the queue is empty, waits for the prefetch thread's next pair (one generator: request
        threads generating side by side would only queue on the pipeline lock and slow every request through the
        GIL); generates synchronously if the thread is not running or nothing arrives within `timeout` seconds."""
        if self._thread is None or not self._thread.is_alive():
            timeout = 0.0
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = deadline - time.monotonic()
                pair = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return self.produce_one()
            if pair.epoch == self.service.epoch:
                return pair

    def try_get(self, timeout: float) -> ReadyPair | None:
        """A ready pair of the current version if one is queued or arrives within `timeout` seconds; None otherwise
        (never generates: the caller decides what a rater gets instead of waiting)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                pair = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return None
            if pair.epoch == self.service.epoch:
                return pair

    def flush(self) -> int:
        n = 0
        while True:
            try:
                self._queue.get_nowait()
                n += 1
            except queue.Empty:
                return n

    def qsize(self) -> int:
        return self._queue.qsize()
