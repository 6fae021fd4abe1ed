"""Pipeline loading (SDXL / SD1.5, local folder or hub cache, offline), tiny random builders for tests, and prompt
conditioning in the exact form the UNet takes it (SDXL: pooled text embeds + `add_time_ids` micro-conditioning).

Use:
    pipe = load_pipeline("/models/sdxl-base")            # or a hub id already in the local cache
    cond = encode_prompts(pipe, ["a red circle", "a blue square"])
    ids = sdxl_time_ids((1024, 1024), (0, 0), (1024, 1024), n=2) if is_sdxl(pipe) else None
    eps = pipe.unet(x_t, t, cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs(ids)).sample

Tiny pipelines (random weights, 64x64 images, 16x16x4 latents; SDXL builds in well under a second), the ones the tests
use, saved as diffusers folders so the SDXL (or SD1.5) path runs on a CPU (`python app.py` with NCP_MODEL=DIR, or
`python -m ncp.train --model DIR ...`):
    python -m ncp.pipelines save-tiny --kind sdxl --out models/tiny-sdxl [--seed 0]
Their character-level tokenizer takes TINY_MAX_TOKENS tokens: a whole arena prompt (300 characters), never cut.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import diffusers.utils.logging
import torch
import transformers.utils.logging
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import ncp.shapes.unet  # noqa: F401 - diffusers loads the shapes UNet by its module path only once it is imported

logger = logging.getLogger(__name__)

TINY_IMAGE_SIZE = 64  # pixels; the 3-level VAE makes 16x16x4 latents
# One token per non-space character plus BOS/EOS: covers the arena's longest prompt (jobs.prompts.MAX_PROMPT_CHARS =
# 300), so two captions never collapse into one conditioning by truncation. A power of two: with 304 or 320 tokens a
# saved and reloaded SDXL pipeline's images differed from the built one's by 2e-6 (CPU attention kernels); 256 and 512
# give identical images.
TINY_MAX_TOKENS = 512
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# The SD/SDXL training noise schedule (scaled_linear 0.00085..0.012, 1000 steps): the tiny models use the real one so
# NCP's step coefficients (METHOD.md: c_t^2 in 1e-5..1e-3) have realistic magnitudes.
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning of a batch of prompts, as the UNet consumes it.

    encoder_hidden_states: (B, tokens, cross_attention_dim). pooled: (B, projection_dim), SDXL's `text_embeds`
    (None for SD1.5).
    """

    encoder_hidden_states: Tensor
    pooled: Tensor | None = None

    def __post_init__(self) -> None:
        if self.encoder_hidden_states.ndim != 3:
            raise ValueError(
                f"encoder_hidden_states must be (B, tokens, dim), got {tuple(self.encoder_hidden_states.shape)}."
            )
        if self.pooled is not None and self.pooled.shape[0] != self.encoder_hidden_states.shape[0]:
            raise ValueError(
                f"pooled has batch {self.pooled.shape[0]} but encoder_hidden_states has "
                f"{self.encoder_hidden_states.shape[0]}; build both from the same prompts."
            )

    @property
    def batch_size(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def added_cond_kwargs(self, time_ids: Tensor | None) -> dict[str, Tensor] | None:
        """The UNet's `added_cond_kwargs`: None for SD1.5; for SDXL `{"text_embeds", "time_ids"}`.

        time_ids: (B, 6) from `sdxl_time_ids` (a (1, 6) or (6,) row is broadcast to the batch). SDXL needs them;
        SD1.5 takes none.
        """
        if self.pooled is None:
            if time_ids is not None:
                raise ValueError(
                    "time_ids were given but this conditioning has no pooled embeds (not SDXL); pass None."
                )
            return None
        if time_ids is None:
            raise ValueError("SDXL conditioning needs time_ids (B, 6): build them with sdxl_time_ids(...).")
        time_ids = time_ids.reshape(-1, 6) if time_ids.ndim == 1 else time_ids
        if time_ids.ndim != 2 or time_ids.shape[1] != 6 or time_ids.shape[0] not in (1, self.batch_size):
            raise ValueError(
                f"time_ids must be (B, 6) or (1, 6) with B={self.batch_size}, got {tuple(time_ids.shape)}."
            )
        time_ids = time_ids.to(device=self.pooled.device, dtype=self.pooled.dtype).expand(self.batch_size, 6)
        return {"text_embeds": self.pooled, "time_ids": time_ids}

    def repeat(self, times: int) -> Conditioning:
        """The batch concatenated `times` times (order [all prompts, all prompts, ...]), e.g. 2 for the chosen and
        rejected halves of a `torch.cat([chosen, rejected])` batch."""
        pooled = None if self.pooled is None else self.pooled.repeat(times, 1)
        return Conditioning(self.encoder_hidden_states.repeat(times, 1, 1), pooled)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return Conditioning(self.encoder_hidden_states.to(device=device, dtype=dtype), pooled)


def load_pipeline(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DiffusionPipeline:
    """Load a diffusers pipeline (SDXL, SD1.5 or the shapes model) from a local folder, or a hub id that is already in
    the local Hugging Face cache. Never downloads."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no model_index.json, so it is not a diffusers pipeline; point at the "
                "folder written by `pipe.save_pretrained(...)` (or a downloaded hub snapshot)."
            )
        source = str(path)
    elif str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:  # a path, not "org/name"
        raise FileNotFoundError(f"Pipeline folder {path} does not exist; pass an existing folder or a cached hub id.")
    else:
        source = str(model)
    try:
        with _no_loading_bars():
            pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=True)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError and missing files are OSErrors
        raise FileNotFoundError(
            f"Could not load pipeline {source!r} offline: {err}. Pass a local folder, or download the hub id on a "
            f"machine with internet first (`hf download {source}`) so it is in the local cache."
        ) from err
    logger.info("loaded %s (%s) on %s as %s", source, type(pipe).__name__, device, dtype)
    return pipe.to(device)


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """No "Loading pipeline components" / "Loading weights" progress bars: a local load takes about a second, and in
    the app's log (or a training run's) a bar is noise. The libraries' own switches, restored afterwards."""
    libs = [lib for lib in (diffusers.utils.logging, transformers.utils.logging) if lib.is_progress_bar_enabled()]
    for lib in libs:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libs:
            lib.enable_progress_bar()


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    """True when the UNet takes SDXL conditioning (pooled text embeds + time ids)."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time"


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int], n: int
) -> Tensor:
    """SDXL micro-conditioning `add_time_ids` (Podell et al. sec. 2.2): (n, 6) rows of
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w), float32. One pair shares one row (METHOD.md pitfalls).
    """
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6 or n < 1:
        raise ValueError(
            "sdxl_time_ids takes (h, w) original_size, (top, left) crop_top_left, (h, w) target_size and n >= 1; "
            f"got {original_size}, {crop_top_left}, {target_size}, n={n}."
        )
    return torch.tensor([values], dtype=torch.float32).repeat(n, 1)


@torch.no_grad()
def encode_prompts(pipe: DiffusionPipeline, prompts: list[str]) -> Conditioning:
    """Encode prompts with the pipeline's own `encode_prompt` (no classifier-free guidance), so training sees exactly
    the conditioning that generation uses (SDXL: penultimate hidden states of both encoders + pooled embeds)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
    device = pipe.unet.device
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning(embeds, pooled)
    embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return Conditioning(embeds, None)


def uncond_conditioning(pipe: DiffusionPipeline) -> Conditioning:
    """The conditioning classifier-free guidance samples against for a missing negative prompt, batch 1: zeros where
    an SDXL pipeline sets `force_zeros_for_empty_prompt` (its default), else the empty prompt's embeddings."""
    cond = encode_prompts(pipe, [""])
    if is_sdxl(pipe) and pipe.config.get("force_zeros_for_empty_prompt", False):
        return Conditioning(torch.zeros_like(cond.encoder_hidden_states), torch.zeros_like(cond.pooled))
    return cond


# ---------------------------------------------------------------------------------------------------------------
# Tiny random pipelines (tests, benchmarks): stock diffusers classes, so every code path of the real models runs.


def _tiny_tokenizer() -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer, written as vocab.json + merges.txt and loaded from that folder.

    transformers 5 silently ignores `CLIPTokenizer(vocab_file=..., merges_file=...)` (every token becomes unknown),
    so it must come from `from_pretrained(folder)`; the folder is fresh, so no stale tokenizer.json overrides merges.
    """
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.-'"))
    tokens = [_BOS, _EOS] + chars + [c + "</w>" for c in chars]
    with tempfile.TemporaryDirectory(prefix="ncp-tokenizer-") as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=TINY_MAX_TOKENS, pad_token=_EOS)


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden,
    )


def _tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )


def _tiny_unet(cross_attention_dim: int, sdxl: bool) -> UNet2DConditionModel:
    """Two levels (16x16 then 8x8), cross-attention in the second down block, so `to_q/to_k/to_v/to_out.0` exist in
    the encoder that NCP uses, in the mid block and in the decoder."""
    extra = {}
    if sdxl:
        # SDXL micro-conditioning: 6 time ids x 8 sinusoidal dims + the pooled text embedding (= cross_attention_dim
        # / 2, the projection size of text_encoder_2).
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + cross_attention_dim // 2,
            transformer_layers_per_block=(1, 1),
            use_linear_projection=True,
        )
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        **extra,
    )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL-architecture pipeline: two CLIP text encoders (32 + 32 -> 64-dim cross-attention, 32-dim pooled
    projection), `text_time` micro-conditioning, a 3-level VAE, EulerDiscreteScheduler (as SDXL ships)."""
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, 32))
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_tiny_unet(cross_attention_dim=64, sdxl=True),
        scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    """A random SD1.5-architecture pipeline: one CLIP text encoder (32-dim), a 3-level VAE, DDIMScheduler."""
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_text_config(tokenizer, 32)),
        tokenizer=tokenizer,
        unet=_tiny_unet(cross_attention_dim=32, sdxl=False),
        scheduler=DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_BUILDERS = {"sdxl": build_tiny_sdxl, "sd15": build_tiny_sd15}


def main(argv: list[str] | None = None) -> int:
    """`save-tiny`: write a tiny random pipeline as a diffusers folder (one line and exit status 2 on a bad --out)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ncp.pipelines", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("save-tiny", help="save a tiny random SDXL or SD1.5 pipeline (the tests' builders)")
    tiny.add_argument("--kind", choices=sorted(TINY_BUILDERS), required=True)
    tiny.add_argument("--out", type=Path, required=True, help="new folder (must not exist or be empty)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        logger.error("%s already exists and is not an empty folder; pass a new --out folder.", out)
        return 2
    TINY_BUILDERS[args.kind](seed=args.seed).save_pretrained(out)
    sys.stdout.write(json.dumps({"kind": args.kind, "out": str(out), "max_tokens": TINY_MAX_TOKENS}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
