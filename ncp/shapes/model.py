"""Architecture of the shapes-world text-to-image model, assembled as a standard `StableDiffusionPipeline`.

A word-level CLIP tokenizer over the grammar's vocabulary, a 2-layer CLIP text encoder, a TAESD-style AutoencoderTiny
(64x64 RGB <-> 16x16x4 latents) and a small UNet2DConditionModel with cross-attention only at 8x8 and 4x4 (attention
backward at higher resolution is slow on CPU) whose conv_in also sees x/y coordinates (`unet.py`). Because it is an
SD1.5-style pipeline, LoRA loading, hot-swap and the NCP encoder follow exactly the SD code path.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import (
    AutoencoderTiny,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ncp.shapes.grammar import VOCABULARY
from ncp.shapes.unet import PositionalUNet2DConditionModel

IMAGE_SIZE = 64  # pixels; the 3-level VAE makes 16x16x4 latents
LATENT_SIZE = IMAGE_SIZE // 4
MAX_TOKENS = 24  # the longest grammar prompt is 13 words + 2 special tokens
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Sampling defaults the model ships with (documented in the model card, measured by bench/shapes_speed.py). 10 Euler-a
# steps keep a 64-px pair under 0.5 s on this 2-core CPU (12 steps: 0.57 s p50); the first, 32-px model scored within
# 0.015 of 20 steps at 12 (docs/research/shapes-pretraining-recipe.md).
DEFAULT_STEPS = 10
DEFAULT_GUIDANCE = 4.0
# Lowest training timestep (fraction of the schedule) of the live loop's preference rounds on this world. Colour, size
# and background are decided at high noise; NCP-DPO on t < 0.5 T alone lowered the judge score, on t >= 0.3 T it gained
# about twice what a uniform t gained (docs/research/preference-training-reach.md,
# sweep headroom-timesteps).
DEFAULT_TIMESTEP_LOW = 0.3
# A round's learning rate and steps on this world, in the app and in `python -m bench.loop` alike: lr 2e-3 met the
# +0.10 goal in 3 of 3 runs on the first world's deficit base (docs/research/live-loop-on-detuned-bases.md), and 100
# steps of 8 pairs, gated on the newest 384 held-out ratings, keep a round (train + gate) within 5 minutes on a 2-core
# CPU while raters vote beside it (72-112 s on the 64-px default base, docs/research/votes-vs-pairs.md). 150 steps
# took 318 s with the base served (20 s snapshot and start, 172 s training at 1.05 s a step, 122 s gate); 120 steps
# and 256 pairs 340 s with a version served (its margins are scored too: 160 s gate, half of it on the pairs).
DEFAULT_ROUND_LR = 2e-3
DEFAULT_ROUND_STEPS = 100
# The gate scores the newest 384 held-out ratings (about 80 prompts with a quarter of the prompts held out): at 128,
# 13-28 prompts, too few to tell a round that drew +0.12 better from noise (docs/research/votes-vs-pairs.md).
DEFAULT_GATE_PAIRS = 384
# What the gate asks of a round in this world (jobs.gate, docs/research/loop-null.md): 100 Adam steps move the LoRA
# +-0.05 on the judge whatever the labels say (coin-flip rounds: -0.066, -0.038, +0.037 on the test probes; the raters'
# labels on the same 1,136 pairs: +0.106), so a gate that promotes on the judge promotes noise. A candidate must predict
# held-out votes better than the base beyond 1.96 standard errors (a prompt one cluster) and no worse than the served
# version, once 100 held-out pairs exist (a round waits for them); the judge only vetoes a fall of more than 0.02; every round starts from the served version
# (a rejected candidate is a step of unknown sign, not progress to continue).
DEFAULT_GATE_MIN_EVAL_PAIRS = 100
DEFAULT_GATE_JUDGE_VETO = -0.02
DEFAULT_CONTINUE_REJECTED = 0
# When a round starts: the schedule looks every 15 s and starts one once 150 votes have come in since the last (a round
# on fewer pairs is mostly rejected). A CPU runs one round at a time; the shapes world has nothing else to wait for.
DEFAULT_ROUND_EVERY_S = 15.0
DEFAULT_ROUND_MIN_VOTES = 150
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
# SD1.5's schedule (the first shapes models'): its terminal SNR of 5e-3 leaves the layout readable in x_T, so a
# model trained on it takes the layout from the noise, not from the prompt (docs/research/shapes-layout.md).
SCALED_LINEAR = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
)
# DDPM's own linear schedule (Ho et al. 2020): terminal SNR 4e-5, a hundred times below SD1.5's 5e-3. At SD1.5's, a
# large object still shows faintly in x_t at the highest training timesteps, so the model learns to read where it is
# from x_t instead of from the prompt, and at sampling, where x_T is pure noise, places objects at random or in the
# centre (Lin et al. 2023, sec. 3; docs/research/shapes-layout.md). Low enough that nothing of the layout survives,
# nonzero so eps-prediction still has a signal at t = T.
LINEAR = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon"
)
SCHEDULES = {"squaredcos_cap_v2": NOISE_SCHEDULE, "scaled_linear": SCALED_LINEAR, "linear": LINEAR}


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    rank = {m: i for i, m in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer whose merges build every grammar word into one token, then load it.

    Single characters stay in the vocabulary so an unknown word still tokenizes (into characters) instead of failing;
    the app validates prompts against the grammar before they reach the model anyway.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").unlink(missing_ok=True)  # a stale fast-tokenizer file would override the merges
    chars = sorted({ch for w in VOCABULARY for ch in w} | set("abcdefghijklmnopqrstuvwxyz,"))
    tokens = [BOS, EOS] + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in VOCABULARY:
        # Add the merge of the first two pieces that BPE leaves, until the word is one token. A new merge has the
        # lowest priority, so words already handled keep tokenizing to one token.
        while len(pieces := _bpe(word, merges)) > 1:
            merges.append((pieces[0], pieces[1]))
            if pieces[0] + pieces[1] not in tokens:
                tokens.append(pieces[0] + pieces[1])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS, pad_token=EOS)
    tok.save_pretrained(str(folder))
    return tok


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderTiny:
    """A TAESD-style autoencoder (diffusers `AutoencoderTiny`): 64x64 RGB <-> 16x16x4 latents (two 2x levels).

    Chosen over AutoencoderKL because its plain conv+ReLU blocks have no GroupNorm: at 16 channels GroupNorm acts as
    instance norm and erases the absolute colours this world is about, and it learns them in minutes on a CPU.
    """
    vae = AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32),
        decoder_block_out_channels=(32, 32, 32),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        latent_channels=4,
    )
    # StableDiffusionPipeline derives its VAE scale factor (4 here) from `vae.config.block_out_channels`.
    vae.register_to_config(block_out_channels=(32, 32, 32))
    return vae


def build_unet() -> PositionalUNet2DConditionModel:
    """The UNet at 16x16 latents, cross-attention at 8x8 and 4x4; its conv_in also sees x/y coordinates (unet.py)."""
    return PositionalUNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def train_scheduler(beta_schedule: str = "squaredcos_cap_v2") -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULES[beta_schedule])


def assemble_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderTiny,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    beta_schedule: str = "squaredcos_cap_v2",
) -> StableDiffusionPipeline:
    # Euler ancestral with guidance 4 scored best on the judge among DDIM / DPM++ / Euler-a x 20 / 40 steps x guidance
    # 1 / 2 / 4 (48 probe prompts, first model); DEFAULT_STEPS above is its step count.
    scheduler = EulerAncestralDiscreteScheduler(**SCHEDULES[beta_schedule], steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
