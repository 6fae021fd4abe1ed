"""What a model needs in memory, read without loading it, and what the card offers: the inputs of the GPU plan.

    fp = model_footprint("models/shapes-base")   # parameters per component from the safetensors headers
    card = cuda_card("cuda")                      # None without CUDA

`model_footprint` reads each component's `*.safetensors` header (a JSON table of tensor shapes at the start of the
file), so a 7 GB SDXL folder is sized in milliseconds; a hub id is looked up in the local cache only (never
downloads). `jobs.gpu_plan` turns these figures into a plan (serve and train together, or pause generation for the
round, and which memory options the trainer runs with).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
GIB = 2**30


@dataclass(frozen=True)
class ModelFootprint:
    """Parameter counts of a pipeline's components and its native image side (pixels)."""

    params: dict[str, int]  # component -> parameters (missing components absent)
    native_px: int  # unet sample_size x the VAE's downsampling factor (SDXL: 128 x 8 = 1024)
    sdxl: bool  # the UNet takes SDXL's text_time micro-conditioning

    @property
    def unet_params(self) -> int:
        return self.params.get("unet", 0)

    @property
    def text_params(self) -> int:
        return self.params.get("text_encoder", 0) + self.params.get("text_encoder_2", 0)

    @property
    def vae_params(self) -> int:
        return self.params.get("vae", 0)


def safetensors_params(path: Path) -> int:
    """Number of parameters in one safetensors file, from its header alone (8-byte length + JSON)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in entry["shape"]:
            n *= int(dim)
        total += n
    return total


def _component_params(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    full = [f for f in files if ".fp16." not in f.name]  # a folder with both: count one variant
    return sum(safetensors_params(f) for f in (full or files))


def _resolve(model: str | Path) -> Path | None:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if str(model).count("/") != 1 or str(model).startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - not in the cache (or no hub at all): the caller falls back to presets
        logger.info("no local snapshot of %s (%s): the GPU plan uses preset figures", model, type(err).__name__)
        return None


def model_footprint(model: str | Path) -> ModelFootprint | None:
    """Parameters per component (safetensors headers) and native size of a diffusers pipeline folder or cached hub
    id; None when it cannot be read (not local, no safetensors weights)."""
    folder = _resolve(model)
    if folder is None or not (folder / "unet" / "config.json").is_file():
        return None
    params = {c: n for c in COMPONENTS if (folder / c).is_dir() and (n := _component_params(folder / c)) > 0}
    if "unet" not in params:
        return None
    unet = json.loads((folder / "unet" / "config.json").read_text())
    sample = unet.get("sample_size") or 64
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    factor = 8
    vae_config = folder / "vae" / "config.json"
    if vae_config.is_file():
        blocks = json.loads(vae_config.read_text()).get("block_out_channels")
        factor = 2 ** (len(blocks) - 1) if blocks else factor
    return ModelFootprint(params, int(sample) * factor, unet.get("addition_embed_type") == "text_time")


@dataclass(frozen=True)
class CardInfo:
    """A CUDA card as the plan sees it."""

    name: str
    total_gib: float
    bf16: bool


def cuda_card(device: str = "auto") -> CardInfo | None:
    """The card `device` names ("auto": cuda:0 when CUDA is available); None on a CPU-only machine or "cpu"."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    props = torch.cuda.get_device_properties(index)
    return CardInfo(props.name, props.total_memory / GIB, torch.cuda.is_bf16_supported())
