"""The GPU memory plan: does a training round fit beside the serving pipeline on this card, and with which options?

A pure function of memory figures (`plan_gpu`), so every card size is testable on a CPU:

    figures = estimate_figures(model_footprint("/models/sdxl"), px=1024, space="ncp")
    plan = plan_gpu(figures, card_gib=22.0, batch_size=8, requested="auto", bf16=True)
    plan.mode          # "shared": generation goes on during a round | "exclusive": it pauses (jobs/gpu_round.py)
    plan.train_args()  # ("--batch-size", "1", "--gradient-accumulation", "8", "--mixed-precision", "bf16", ...)

The round's trainer options are tried from the cheapest to the leanest (`RUNGS`): fp32 at the full batch; bf16
autocast (the trainer keeps LoRA weights and, for NCP, the UNet in fp32); a smaller micro-batch with gradient
accumulation (same effective batch, same result up to float order); then gradient checkpointing (about +30% step
time) from the largest micro-batch down. "auto" serves and trains together with the first rung that fits beside the
serving peak; if none does, the round trains alone (generation paused, the serving weights moved off the card) with
the first rung that fits the card. `NCP_GPU_PLAN=shared|exclusive` forces the mode (the app's entry point reads it).

Figures: SDXL's training activations are measured (docs/BENCHMARKS.md, `bench/step_cost_gpu.py`: ncp-dpo 18.7 GiB
peak with 10.0 GiB of fp32 UNet weights, 1 pair at 1024 px, bf16 autocast, gradient checkpointing; latent dpo 7.6 of
5.2); the rest are estimates that `bench/sdxl_space.py` measures on a GPU (serving activations, checkpointing's
saving). Other models scale them by latent area and the square root of UNet parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from ncp.memory import GIB, CardInfo, ModelFootprint, model_footprint

PlanMode = Literal["auto", "shared", "exclusive"]
PLAN_MODES: tuple[str, ...] = ("auto", "shared", "exclusive")

SDXL_UNET_PARAMS = 2_567_000_000  # the SDXL base UNet (bench/step_cost_gpu.py's 2567M)
SDXL_TEXT_PARAMS = 817_000_000  # CLIP ViT-L (123M) + OpenCLIP bigG text tower (694M)
SDXL_VAE_PARAMS = 84_000_000
REF_PX = 1024  # the anchors below are at 1024 x 1024 (128 x 128 x 4 latents)
# Training activations per pair at REF_PX, bf16 autocast, gradient checkpointing (measured, see module docstring).
TRAIN_ACT_CKPT_GIB = {"ncp": 8.7, "latent": 2.4}
CKPT_SAVING = 3.0  # activations without checkpointing / with it (estimate; bench/sdxl_space.py measures)
SERVE_ACT_GIB = 3.0  # one SDXL pair at REF_PX: UNet at batch 4 (2 images x CFG) + fp32 VAE decode (estimate)
CONTEXT_GIB = 0.5  # a CUDA context (and allocator slack) per process: the generation worker's and the trainer's


@dataclass(frozen=True)
class MemoryFigures:
    """GiB figures of one model at one serving size, the plan's only inputs besides the card."""

    serve_weights_gib: float  # the serving pipeline in fp16
    serve_act_gib: float  # one pair's activations (UNet passes and the VAE decode)
    train_weights_fp32_gib: float  # the trainer's weights on the card without mixed precision
    train_weights_mixed_gib: float  # with bf16/fp16 mixed precision (text encoders cast; NCP keeps the UNet fp32)
    train_act_gib: float  # per pair per micro-step, mixed precision, no checkpointing (fp32: twice)
    train_act_ckpt_gib: float  # the same with gradient checkpointing
    context_gib: float = CONTEXT_GIB
    source: str = "estimate"

    @property
    def serve_gib(self) -> float:
        return self.serve_weights_gib + self.serve_act_gib + self.context_gib


def estimate_figures(fp: ModelFootprint | None, px: int, space: str = "ncp", lora_rank: int = 8) -> MemoryFigures:
    """Figures for a model (None: SDXL's, the target model) served and trained at `px` x `px`."""
    if space not in ("ncp", "latent"):
        raise ValueError(f"space must be ncp or latent, got {space!r}.")
    unet = fp.unet_params if fp else SDXL_UNET_PARAMS
    text = fp.text_params if fp else SDXL_TEXT_PARAMS
    vae = fp.vae_params if fp else SDXL_VAE_PARAMS
    scale = (px / REF_PX) ** 2 * math.sqrt(unet / SDXL_UNET_PARAMS)
    # LoRA on the attention projections: 3.6% of SDXL's UNet at rank 64 (93M, bench/step_cost_gpu.py), linear in
    # the rank. Weights, gradients and AdamW's two moments in fp32: 16 bytes a parameter.
    lora = unet * 0.036 * lora_rank / 64 * 16
    unet_mixed = 4 if space == "ncp" else 2  # NCP keeps the UNet fp32 (the encoder's PL differences, METHOD.md)
    act_ckpt = TRAIN_ACT_CKPT_GIB[space] * scale
    source = "SDXL presets (the model's files were not readable)" if fp is None else "estimate from the model's files"
    return MemoryFigures(
        serve_weights_gib=(unet + text + vae) * 2 / GIB,
        serve_act_gib=SERVE_ACT_GIB * scale,
        train_weights_fp32_gib=((unet + text + vae) * 4 + lora) / GIB,
        train_weights_mixed_gib=(unet * unet_mixed + text * 2 + vae * 4 + lora) / GIB,
        train_act_gib=act_ckpt * CKPT_SAVING,
        train_act_ckpt_gib=act_ckpt,
        source=source,
    )


@dataclass(frozen=True)
class TrainRung:
    """One set of trainer memory options (ncp.train flags)."""

    micro_batch: int
    accumulation: int
    checkpointing: bool
    precision: Literal["no", "bf16", "fp16"]

    def gib(self, f: MemoryFigures) -> float:
        weights = f.train_weights_fp32_gib if self.precision == "no" else f.train_weights_mixed_gib
        act = (f.train_act_ckpt_gib if self.checkpointing else f.train_act_gib) * (2 if self.precision == "no" else 1)
        return weights + self.micro_batch * act + f.context_gib

    def describe(self) -> str:
        precision = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[self.precision]
        batch = f"{self.micro_batch} pair(s) x {self.accumulation} accumulation"
        return f"{precision}, {batch}" + (", gradient checkpointing" if self.checkpointing else "")


def rungs(batch_size: int, half: Literal["bf16", "fp16"]) -> list[TrainRung]:
    """The trainer's options from the cheapest (fastest) to the leanest, at a fixed effective batch."""
    sizes = [d for d in range(batch_size, 0, -1) if batch_size % d == 0]
    out = [TrainRung(batch_size, 1, False, "no")]
    out += [TrainRung(d, batch_size // d, False, half) for d in sizes]
    out += [TrainRung(d, batch_size // d, True, half) for d in sizes]
    return out


@dataclass(frozen=True)
class GpuPlan:
    """What the app does with the card during a round, and why (shown in the admin status and the Progress tab)."""

    requested: str
    mode: Literal["shared", "exclusive"]
    device: Literal["cpu", "cuda"]
    card: str = ""
    card_gib: float = 0.0
    budget_gib: float = 0.0
    serve_gib: float = 0.0
    train_gib: float = 0.0
    rung: TrainRung | None = None
    fits: bool = True
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def pauses_generation(self) -> bool:
        return self.mode == "exclusive"

    def train_args(self) -> tuple[str, ...]:
        """ncp.train options of the plan's rung (appended to the round's command; later options win)."""
        if self.rung is None:
            return ()
        r = self.rung
        args = ("--batch-size", str(r.micro_batch), "--gradient-accumulation", str(r.accumulation))
        args += ("--mixed-precision", r.precision)
        return args + (("--gradient-checkpointing",) if r.checkpointing else ())

    def summary(self) -> str:
        """One line for the round status."""
        if self.mode == "shared":
            what = "generation goes on during a round"
        else:
            what = "generation pauses during a round; raters vote on the prefetched queue"
        where = "CPU" if self.device == "cpu" else f"{self.card or 'GPU'} {self.card_gib:.0f} GiB"
        train = "" if self.rung is None else f"; training {self.rung.describe()}"
        memory = "" if self.device == "cpu" else f" (est. {self._peak():.1f} of {self.budget_gib:.1f} GiB)"
        warn = "" if self.fits else " — may not fit: see the reasons"
        return f"{self.mode} ({self.requested}) on {where}: {what}{train}{memory}{warn}"

    def _peak(self) -> float:
        return self.serve_gib + self.train_gib if self.mode == "shared" else max(self.serve_gib, self.train_gib)

    def as_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary(), "train_args": list(self.train_args())}


def plan_gpu(
    figures: MemoryFigures,
    *,
    card_gib: float | None,
    batch_size: int,
    requested: PlanMode = "auto",
    bf16: bool = True,
    card: str = "",
    headroom: float = 0.04,
) -> GpuPlan:
    """The plan for a card of `card_gib` GiB (None: no GPU, CPU memory). Pure: same figures, same plan."""
    if requested not in PLAN_MODES:
        raise ValueError(f"requested must be one of {PLAN_MODES}, got {requested!r} (NCP_GPU_PLAN).")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if card_gib is None:
        mode = "exclusive" if requested == "exclusive" else "shared"
        why = (
            "no GPU: generation and training share the CPU and its memory; the trainer's own defaults apply",
            "exclusive requested: generation pauses during a round, so training gets the cores"
            if mode == "exclusive"
            else "generation goes on during a round (NCP_GPU_PLAN=exclusive pauses it to give training the cores)",
        )
        return GpuPlan(requested, mode, "cpu", reasons=why)
    if card_gib <= 0:
        raise ValueError(f"card_gib must be positive, got {card_gib}.")
    budget = card_gib * (1 - headroom)
    serve = figures.serve_gib
    ladder = rungs(batch_size, "bf16" if bf16 else "fp16")
    shared = next((r for r in ladder if serve + r.gib(figures) <= budget), None)
    # Paused, the serving weights leave the card; the generation process keeps its CUDA context.
    alone = next((r for r in ladder if figures.context_gib + r.gib(figures) <= budget), None)
    reasons = [
        f"card {card or 'GPU'}: {card_gib:.1f} GiB, plan budget {budget:.1f} GiB ({headroom:.0%} headroom); "
        f"figures: {figures.source}",
        f"serving: {figures.serve_weights_gib:.1f} GiB fp16 weights + {figures.serve_act_gib:.1f} GiB per pair "
        f"+ {figures.context_gib:.1f} GiB context = {serve:.1f} GiB",
        f"training at the cheapest options ({ladder[0].describe()}): {ladder[0].gib(figures):.1f} GiB; "
        f"at the leanest ({ladder[-1].describe()}): {ladder[-1].gib(figures):.1f} GiB",
    ]
    if requested == "shared" or (requested == "auto" and shared is not None):
        rung, fits = (shared, True) if shared is not None else (ladder[-1], False)
        if fits:
            reasons.append(
                f"serve and train together: {serve:.1f} + {rung.gib(figures):.1f} GiB fits {budget:.1f} GiB "
                f"with {rung.describe()}"
            )
        else:
            reasons.append(
                f"shared was requested but even the leanest round ({rung.gib(figures):.1f} GiB) beside serving "
                f"({serve:.1f} GiB) exceeds {budget:.1f} GiB: expect out-of-memory; use NCP_GPU_PLAN=auto"
            )
        return GpuPlan(requested, "shared", "cuda", card, card_gib, budget, serve, rung.gib(figures), rung, fits,
                       tuple(reasons))  # fmt: skip
    rung, fits = (alone, True) if alone is not None else (ladder[-1], False)
    if requested == "auto":
        reasons.append(
            f"serving ({serve:.1f} GiB) and the leanest round ({ladder[-1].gib(figures):.1f} GiB) exceed "
            f"{budget:.1f} GiB together: the round trains alone"
        )
    if fits:
        reasons.append(
            f"exclusive: generation pauses and the serving weights leave the card for the round; training "
            f"{rung.gib(figures) + figures.context_gib:.1f} GiB (with the paused generator's context) with "
            f"{rung.describe()}; the prefetch queue is sized to the round"
        )
    else:
        reasons.append(
            f"even alone the leanest round needs {rung.gib(figures):.1f} GiB > {budget:.1f} GiB: expect "
            "out-of-memory; serve a smaller size or train elsewhere (the round's snapshot is a Parquet folder)"
        )
    train = rung.gib(figures) + figures.context_gib  # the paused generation process keeps its context
    return GpuPlan(requested, "exclusive", "cuda", card, card_gib, budget, serve, train, rung, fits, tuple(reasons))


def training_size_args(width: int | None, height: int | None, native_px: int) -> tuple[tuple[str, ...], str]:
    """ncp.train options that make a round train on the served images' own conditions, and a note.

    The trainer's time ids are (decoded size, crop, (R, R)); the pipeline generates with (size, (0, 0), size). They
    are equal when R is the served side: square images need `--resolution` = that side (0, the native size, when the
    app serves the native size). Non-square images are centre-cropped to squares of the shorter side, and the crop is
    recorded in the time ids, as SDXL's own training did."""
    if width is None or height is None or (width == height == native_px):
        return (), f"training at the served size {native_px}x{native_px} (native)"
    side = min(width, height)
    note = f"training at the served size {width}x{height}"
    if width != height:
        note = f"served {width}x{height}: training centre-crops {side}x{side} squares (the crop is in the time ids)"
    return ("--resolution", str(side)), note


def app_plan(
    model: str,
    card: CardInfo | None,
    *,
    width: int | None,
    height: int | None,
    space: str,
    batch_size: int,
    lora_rank: int,
    requested: PlanMode = "auto",
) -> tuple[GpuPlan, tuple[str, ...]]:
    """The plan for the app's model on the card it found, and the ncp.train options every round adds (memory options
    and the served size)."""
    fp = model_footprint(model)
    native = fp.native_px if fp is not None else REF_PX
    px = round(math.sqrt(width * height)) if width and height else native
    figures = estimate_figures(fp, px, space if space in ("ncp", "latent") else "ncp", lora_rank)
    plan = plan_gpu(
        figures,
        card_gib=None if card is None else card.total_gib,
        batch_size=batch_size,
        requested=requested,
        bf16=True if card is None else card.bf16,
        card="" if card is None else card.name,
    )
    size_args, note = training_size_args(width, height, native)
    plan = replace(plan, reasons=(*plan.reasons, note))
    return plan, (*plan.train_args(), *size_args)
