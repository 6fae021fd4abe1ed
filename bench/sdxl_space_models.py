"""bench/sdxl_space.py's models and round: the SDXL pipeline built from its configs with random weights (or the
tiny one), and a round as the trainer runs it (its own step, on its own UNet, with the GPU plan's options).

    python bench/sdxl_space.py --tiny --device cpu      # uses these
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from types import SimpleNamespace

from bench.sdxl_space_report import LORA_RANK
from bench.step_cost_gpu import SDXL_UNET


def _log(msg: str) -> None:
    print(f"[sdxl_space] {msg}", file=sys.stderr, flush=True)


# -- models from configs ----------------------------------------------------------------------------------------------
def text_configs(tiny: bool) -> tuple[dict, dict]:
    if tiny:
        small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        return {**small, "projection_dim": 32}, {**small, "projection_dim": 32}
    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
    big_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)  # fmt: skip
    return clip_l, big_g


def build_text_encoders(tiny: bool, device, dtype):  # noqa: ANN001, ANN201
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokens = 512 if tiny else 77
    one, two = text_configs(tiny)
    common = dict(vocab_size=49408, max_position_embeddings=tokens, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device(device):
        enc = CLIPTextModel(CLIPTextConfig(**common, **one)).to(dtype)
        enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **two)).to(dtype)
    return enc.requires_grad_(False), enc2.requires_grad_(False)


def build_pipeline(tiny: bool, device):  # noqa: ANN001, ANN201
    """The serving pipeline: tiny SDXL (ncp.pipelines) or the full SDXL architecture in fp16, random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from ncp.pipelines import _SD_SCHEDULE, _tiny_tokenizer, build_tiny_sdxl

    if tiny:
        return build_tiny_sdxl().to(device)
    dtype = torch.float16
    tokenizer = _tiny_tokenizer()  # character-level; SDXL's 77-token window
    tokenizer.model_max_length = 77
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
            sample_size=1024, scaling_factor=0.13025, force_upcast=True,
        ).to(dtype)  # fmt: skip
    enc, enc2 = build_text_encoders(False, device, dtype)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=enc, text_encoder_2=enc2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the round: the trainer's own step on its own UNet ----------------------------------------------------------------
class Round:
    """A round as the trainer runs it, with the plan's options; `run()` in a thread, results in `record`."""

    def __init__(self, tiny: bool, device, rung, micro_steps: int, unet_config: dict, px: int) -> None:  # noqa: ANN001
        self.tiny, self.device, self.rung, self.micro_steps = tiny, device, rung, micro_steps
        self.unet_config, self.px = unet_config, px  # the serving UNet's architecture: its adapter hot-swaps in
        self.record: dict = {}
        self.unet = None

    def run(self) -> None:
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel

        from ncp.latents import PairBatch
        from ncp.pipelines import _SD_SCHEDULE, Conditioning
        from ncp.trainer import TrainConfig, _optimizer, _prepare_models, pair_loss

        started = time.perf_counter()
        try:
            r, dev = self.rung, self.device
            cfg = TrainConfig(objective="dpo", space="ncp", beta=5e5, lora_rank=LORA_RANK, lora_alpha=LORA_RANK,
                              mixed_precision=r.precision, gradient_checkpointing=r.checkpointing,
                              batch_size=r.micro_batch, gradient_accumulation=r.accumulation)  # fmt: skip
            with torch.device(dev):
                unet = UNet2DConditionModel.from_config(self.unet_config)
            half = torch.bfloat16 if r.precision == "bf16" else torch.float16
            enc, enc2 = build_text_encoders(self.tiny, dev, half if r.precision != "no" else torch.float32)
            unet, params = _prepare_models(SimpleNamespace(unet=unet), cfg, SimpleNamespace(device=dev))
            self.unet = unet
            optimizer = _optimizer(params, cfg)
            scheduler = DDPMScheduler(**_SD_SCHEDULE)
            side, b, px = self.unet_config["sample_size"], r.micro_batch, self.px
            g = torch.Generator().manual_seed(0)
            batch = PairBatch(
                prompts=("a photo",) * b,
                chosen=torch.randn(b, 4, side, side, generator=g),
                rejected=torch.randn(b, 4, side, side, generator=g),
                time_ids=torch.tensor([[px, px, 0, 0, px, px]] * b, dtype=torch.float32),  # the served images'
            )
            ids = torch.randint(2, 1000, (b, 77), generator=g).to(dev)
            self.record["setup_s"] = time.perf_counter() - started
            times = []
            for i in range(self.micro_steps + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                with torch.no_grad():  # the trainer encodes each batch's prompts with its frozen encoders
                    h1 = enc(ids, output_hidden_states=True).hidden_states[-2]
                    out2 = enc2(ids, output_hidden_states=True)
                    cond = Conditioning(torch.cat([h1, out2.hidden_states[-2]], -1), out2.text_embeds)
                with torch.autocast(dev.type, dtype=half, enabled=r.precision != "no"):
                    result = pair_loss(unet, scheduler, batch, cond, cfg, torch.Generator().manual_seed(i), sdxl=True)
                (result.loss / r.accumulation).backward()
                if (i + 1) % r.accumulation == 0 or i == self.micro_steps:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i:
                    times.append(time.perf_counter() - t0)
            micro = statistics.median(times)
            self.record.update(micro_step_s=micro, micro_steps_s=times, step_s=micro * r.accumulation,
                               round_200_steps_s=200 * micro * r.accumulation)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - a benchmark records the failure (OOM included) and goes on
            self.record["error"] = f"{type(err).__name__}: {err}"[:1500]
            self.record["traceback"] = traceback.format_exc()[-3000:]
            _log(f"round failed: {self.record['error'][:300]}")
        self.record["wall_s"] = time.perf_counter() - started
