"""LoRA adapters on the UNet: one fixed config per deployment, the reference model as "same UNet, adapters off", and
save/load in the diffusers LoRA format WITH adapter metadata (without it, diffusers loads alpha as r: wrong scale, no
warning; METHOD.md pitfalls).

Use:
    settings = LoraSettings(rank=64, alpha=64)
    add_lora(pipe.unet, settings)
    optimizer = torch.optim.AdamW(lora_parameters(pipe.unet), lr=2e-5)
    with reference_mode(pipe.unet):
        eps_ref = pipe.unet(x_t, t, ehs).sample          # the frozen reference (METHOD.md notation: eps_ref)
    save_adapter(pipe, pipe.unet, "adapters/v3", settings, metadata={"parent": "v2"})
    # anywhere else: pipe.load_lora_weights("adapters/v3")   (stock diffusers, alpha kept)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
CONFIG_NAME = "adapter_config.json"  # LoraSettings + the peft config, for humans and for load_adapter_weights
METADATA_NAME = "metadata.json"  # caller's metadata (lineage, metrics), free form


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters, fixed for the life of a deployment (hot-swap needs the same targets and alpha).

    rank: LoRA rank r (paper: 64). alpha: scale numerator, the update is (alpha / r) * B A (paper: 64).
    target_modules: UNet module names to adapt (paper: attention projections). dropout: LoRA dropout in [0, 1).
    """

    rank: int = 64
    alpha: float = 64
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) or not all(isinstance(m, str) for m in self.target_modules):
            raise ValueError(
                f"target_modules must be a sequence of module names such as ('to_q', 'to_k'), got {self.target_modules!r}."
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules:
            raise ValueError("target_modules is empty; give at least one UNet module name, e.g. ('to_q', 'to_v').")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r} (paper: 64).")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r} (paper: alpha = rank = 64).")
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}.")

    def peft_config(self) -> LoraConfig:
        # Gaussian A and zero B (as diffusers' training scripts): the adapter starts as the identity, so the policy
        # equals the reference at step 0 and the dpo loss is exactly ln 2 (METHOD.md).
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=list(self.target_modules),
            lora_dropout=self.dropout,
            init_lora_weights="gaussian",
        )


def unwrap_unet(model: nn.Module) -> nn.Module:
    """The UNet under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _tuner_layers(unet: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def add_lora(unet: nn.Module, settings: LoraSettings, adapter_name: str = "default") -> None:
    """Freeze the UNet and add a trainable LoRA adapter `adapter_name` (must not exist yet)."""
    base = unwrap_unet(unet)
    if adapter_name in getattr(base, "peft_config", {}):
        raise ValueError(
            f"The UNet already has an adapter named {adapter_name!r}; pick another name or start from a fresh UNet."
        )
    base.add_adapter(settings.peft_config(), adapter_name=adapter_name)  # peft raises if no target module matches
    if len(base.peft_config) > 1:
        base.set_adapter(adapter_name)
    # Only the new adapter trains; explicit, so it does not depend on what a peft version marks trainable.
    base.requires_grad_(False)
    for p in lora_parameters(base, adapter_name):
        p.requires_grad_(True)


def lora_parameters(unet: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The LoRA parameters of `adapter_name` (all adapters when None), in a stable order (module order)."""
    found = []
    for layer in _tuner_layers(unet):
        for attr in ("lora_A", "lora_B"):
            for name, sub in getattr(layer, attr, {}).items():
                if adapter_name is None or name == adapter_name:
                    found.extend(sub.parameters())
    return found


# A UNet that carries a frozen adapter of this name uses it as the DPO reference policy instead of the bare base
# (ncp.trainer's `reference="init"`: the version a round continues from). The NCP encoder stays the base's.
REFERENCE_ADAPTER = "reference"


@contextmanager
def reference_mode(unet: nn.Module, adapter: str | None = None) -> Iterator[nn.Module]:
    """Run the UNet as a frozen reference: every LoRA adapter disabled inside the block, or, with `adapter`, only that
    adapter active.

    On exit, normal or by exception, each layer's previous enabled/disabled state, its active adapters and each adapter
    parameter's `requires_grad` are restored exactly (peft's `enable_adapters` and `set_adapter` would otherwise mark
    the active adapter trainable). Nesting is safe. Yields the UNet.
    """
    layers = _tuner_layers(unet)
    if not layers:
        raise ValueError("reference_mode needs a UNet with a LoRA adapter (add_lora first); this one has none.")
    if adapter is not None and adapter not in getattr(unwrap_unet(unet), "peft_config", {}):
        raise ValueError(f"The UNet has no adapter named {adapter!r} to use as the reference.")
    was_disabled = [layer.disable_adapters for layer in layers]
    was_active = [list(layer.active_adapters) for layer in layers]
    grads = [(p, p.requires_grad) for p in lora_parameters(unet)]
    try:
        for layer in layers:
            if adapter is None:
                layer.enable_adapters(False)
            else:
                layer.set_adapter(adapter)
                layer.enable_adapters(True)
        yield unet
    finally:
        for layer, disabled, active in zip(layers, was_disabled, was_active, strict=True):
            layer.set_adapter(active)
            layer.enable_adapters(not disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


def policy_reference_mode(unet: nn.Module) -> AbstractContextManager[nn.Module]:
    """The DPO reference policy: the frozen `REFERENCE_ADAPTER` when the UNet carries one, else the base (adapters
    off). The NCP perception encoder does not use this: its feature space stays the base's, one fixed metric."""
    has_ref = REFERENCE_ADAPTER in getattr(unwrap_unet(unet), "peft_config", {})
    return reference_mode(unet, REFERENCE_ADAPTER if has_ref else None)


def add_reference_adapter(unet: nn.Module, settings: LoraSettings, folder: str | Path) -> None:
    """Load the adapter in `folder` as the frozen `REFERENCE_ADAPTER` beside the trainable "default" one, which stays
    the active (and only trainable) adapter."""
    base = unwrap_unet(unet)
    add_lora(base, settings, adapter_name=REFERENCE_ADAPTER)
    load_adapter_weights(base, folder, adapter_name=REFERENCE_ADAPTER)
    base.set_adapter("default")
    base.requires_grad_(False)
    for p in lora_parameters(base, "default"):
        p.requires_grad_(True)


def _peft_config_dict(unet: nn.Module, adapter_name: str) -> dict[str, Any]:
    base = unwrap_unet(unet)
    configs = getattr(base, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"The UNet has no adapter {adapter_name!r}; it has {sorted(configs) or 'none'}.")
    return configs[adapter_name].to_dict()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def save_adapter(
    pipe: DiffusionPipeline | type[DiffusionPipeline],
    unet: nn.Module,
    folder: str | Path,
    settings: LoraSettings,
    adapter_name: str = "default",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (diffusers format, loadable by the stock
    `pipe.load_lora_weights(folder)`, WITH `unet_lora_adapter_metadata` so alpha survives), `adapter_config.json`
    and, when given, `metadata.json`. `pipe` (instance or class) picks the format: SD1.5 or SDXL. Returns the folder.
    """
    pipeline_cls = pipe if isinstance(pipe, type) else type(pipe)
    if not hasattr(pipeline_cls, "save_lora_weights"):
        raise TypeError(f"{pipeline_cls.__name__} cannot save LoRA weights; pass an SD1.5 or SDXL pipeline.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    peft_config = _peft_config_dict(unet, adapter_name)
    if peft_config.get("r") != settings.rank or peft_config.get("lora_alpha") != settings.alpha:
        raise ValueError(
            f"settings (rank={settings.rank}, alpha={settings.alpha}) do not match adapter {adapter_name!r} "
            f"(r={peft_config.get('r')}, alpha={peft_config.get('lora_alpha')}); pass the settings it was made with."
        )
    state = get_peft_model_state_dict(unwrap_unet(unet), adapter_name=adapter_name)
    layers = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in convert_state_dict_to_diffusers(state).items()
    }
    pipeline_cls.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=peft_config,
        safe_serialization=True,
    )
    config = {"settings": asdict(settings), "adapter_name": adapter_name, "peft_config": _jsonable(peft_config)}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    if metadata is not None:
        (folder / METADATA_NAME).write_text(json.dumps(_jsonable(metadata), indent=2))
    return folder


def load_adapter_weights(unet: nn.Module, folder: str | Path, adapter_name: str = "default") -> None:
    """Copy a saved adapter's weights into the UNet's existing adapter `adapter_name` (to continue training from it).

    Strict: the key sets must be equal and every shape must match; a saved adapter_config.json with another rank,
    alpha or target list is refused (continuing would silently change the adapter's scale).
    """
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; save_adapter(...) writes it (a diffusers LoRA folder).")
    current = _peft_config_dict(unet, adapter_name)
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        saved = json.loads(config_path.read_text())["peft_config"]
        for key in ("r", "lora_alpha", "target_modules"):
            a, b = _jsonable(saved.get(key)), _jsonable(current.get(key))
            if isinstance(a, list) and isinstance(b, list):
                a, b = sorted(a), sorted(b)
            if a != b:
                raise ValueError(
                    f"Saved adapter has {key}={a!r} but adapter {adapter_name!r} has {b!r}; use the same LoRA settings."
                )
    raw = load_file(str(path))
    unet_state = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    if not unet_state:
        raise ValueError(f"{path} holds no UNet LoRA weights (keys start with {sorted(raw)[:3]}).")
    state = convert_unet_state_dict_to_peft(unet_state)
    base = unwrap_unet(unet)
    expected = get_peft_model_state_dict(base, adapter_name=adapter_name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit adapter {adapter_name!r}: missing {missing[:3]} ({len(missing)}), unexpected "
            f"{unexpected[:3]} ({len(unexpected)}), wrong shape {wrong[:3]} ({len(wrong)}); same LoRA settings and "
            "base model are required."
        )
    set_peft_model_state_dict(base, state, adapter_name=adapter_name)
