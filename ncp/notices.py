"""Third-party notices that tell a user of this project nothing they can act on, dropped where they are emitted.

Each entry names the library logger (or warning) that emits it and why it does not apply here; anything else those
loggers say still gets through. `ncp/__init__.py` installs them, so they are in place before any `ncp` module imports
diffusers, in every process (the app, its generation worker, `python -m ncp.train`, the evaluator, benchmarks).
"""

from __future__ import annotations

import logging
import re
import warnings

# logger name -> messages it emits that are dropped
KNOWN_LOG_NOTICES: dict[str, tuple[re.Pattern[str], ...]] = {
    # diffusers' pipeline modules import transformers' image processors (for safety checkers and IP adapters, which
    # no pipeline here has); without torchvision transformers falls back to its PIL ones and says so, once each.
    "transformers.utils.import_utils": (re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\)"),),
    # The shapes world's VAE is a TAESD-style AutoencoderTiny inside a StableDiffusionPipeline (DESIGN.md). Its saved
    # config carries `block_out_channels` because StableDiffusionPipeline derives its VAE scale factor from it, which
    # AutoencoderTiny's constructor does not take (it keeps it as a config attribute all the same) ...
    "diffusers.configuration_utils": (
        re.compile(r"The config attributes \{'block_out_channels': \[[\d, ]+\]\} were passed to AutoencoderTiny,"),
    ),
    # ... and the pipeline's signature names AutoencoderKL, which AutoencoderTiny replaces (its documented use).
    "diffusers.pipelines.pipeline_utils": (re.compile(r"Expected types for vae: .*AutoencoderKL.*AutoencoderTiny"),),
    # Every adapter here is a UNet LoRA (text encoders stay frozen): loading one with the stock `load_lora_weights`
    # (the evaluator's load test, the app's hot-swap) finds, as it should, no text-encoder keys, and says so each time.
    "diffusers.loaders.lora_base": (
        re.compile(r"No LoRA keys associated to CLIPTextModel(WithProjection)? found with the prefix='text_encoder"),
    ),
}
# peft warns whenever a model gets a second adapter; the project holds several on purpose (the serving slots "live"
# and "battle", the frozen DPO reference beside the trained adapter, the versions the evaluator compares).
KNOWN_WARNINGS = (r"Already found a `peft_config` attribute in the model",)


class _DropKnown(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern[str], ...]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def install() -> None:
    """Drop the known notices (idempotent)."""
    for name, patterns in KNOWN_LOG_NOTICES.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in target.filters):
            target.addFilter(_DropKnown(patterns))
    for message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
