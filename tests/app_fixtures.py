"""Shared setup of the app tests: a started Runtime on a tiny random SD1.5 pipeline, a launched demo, a LoRA version.

Used by tests/test_app_api.py and tests/test_app_browser.py (real pipeline, real DuckDB file, real HTTP server)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from jobs.registry import BASE
from jobs.runtime import ArenaConfig, Runtime
from ncp.adapters import LoraSettings, add_lora, save_adapter
from ncp.pipelines import build_tiny_sd15
from ncp.serving import PairMix, SamplingConfig

ADMIN_TOKEN = "test-admin-token-0123456789"
# Control pairs are left out until their broken image can be stored: serving.py names its version "<v>+broken",
# which the store's VERSION_RE refuses (test_app_api.py::test_control_pairs_reach_the_rater shows it).
MIX = PairMix(on_policy=0.6, cross_version=0.4, control=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_runtime(
    tmp: Path, *, steps: int = 1, size: int | None = 32, prefetch: int = 4, mix: PairMix | None = None
) -> Runtime:
    """A started Runtime (schedule off) on a tiny SD1.5 pipeline saved to and loaded from `tmp/model`."""
    model = tmp / "model"
    if not model.exists():
        build_tiny_sd15().save_pretrained(model)
    cfg = ArenaConfig(
        data_dir=tmp / "data",
        model=str(model),
        sampling=SamplingConfig(steps=steps, width=size, height=size),
        mix=mix or MIX,
        schedule=False,
        prefetch=prefetch,
        admin_token=ADMIN_TOKEN,
        rater_salt="test-salt-0123456789abcdef",
    )
    runtime = Runtime(cfg)
    runtime.start()
    return runtime


def make_adapter_version(runtime: Runtime, tmp: Path, seed: int = 1) -> str:
    """Publish a LoRA (random non-zero weights, so its images differ from base) as the registry's next version."""
    torch.manual_seed(seed)
    pipe = build_tiny_sd15()
    rank = runtime.config.loop.lora_rank
    add_lora(pipe.unet, LoraSettings(rank=rank, alpha=runtime.config.loop.lora_alpha))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    folder = save_adapter(
        pipe, pipe.unet, tmp / f"adapter-{seed}", LoraSettings(rank=rank, alpha=runtime.config.loop.lora_alpha)
    )
    info = runtime.registry.publish(folder, parent=BASE, snapshot_id=None, metrics={"test": True})
    runtime.store.register_adapter_version(info.version, BASE, None, {"test": True}, status="published")
    return info.version
