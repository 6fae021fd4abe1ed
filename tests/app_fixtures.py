"""Shared setup of the app tests: a started Runtime on a tiny random SD1.5 pipeline, a launched demo, a LoRA version.

Used by tests/test_app_api.py and tests/test_app_browser.py (real pipeline, real DuckDB file, real HTTP server)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from jobs.registry import BASE, AdapterRegistry
from jobs.runtime import ArenaConfig, Runtime
from ncp.adapters import LoraSettings, add_lora, save_adapter
from ncp.pipelines import build_tiny_sd15
from ncp.serving import PairMix, SamplingConfig

ADMIN_TOKEN = "test-admin-token-0123456789"
# Control pairs are left out until their broken image can be stored: serving.py names its version "<v>+broken",
# which the store's VERSION_RE refuses (test_app_api.py::test_control_pairs_reach_the_rater shows it).
MIX = PairMix()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_runtime(
    tmp: Path,
    *,
    steps: int = 1,
    size: int | None = 32,
    prefetch: int = 4,
    mix: PairMix | None = None,
    serve_adapter: bool = False,
    overflow_wait_s: float | None = 0.05,
) -> Runtime:
    """A started Runtime (schedule off) on a tiny SD1.5 pipeline saved to and loaded from `tmp/model`.

    serve_adapter: publish a LoRA version and point the registry at it before the start (the restart path), so the
    runtime serves it from its first pair."""
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
        overflow_wait_s=overflow_wait_s,
        admin_token=ADMIN_TOKEN,
        rater_salt="test-salt-0123456789abcdef",
    )
    registry = AdapterRegistry(cfg.data_dir / "adapters", keep=cfg.loop.keep_versions)
    version = make_adapter_version(registry, tmp, cfg.loop.lora_rank, cfg.loop.lora_alpha) if serve_adapter else None
    if version is not None:
        registry.set_current(version, reason="test fixture")
    runtime = Runtime(cfg)
    runtime.start()
    if version is not None:
        runtime.store.register_adapter_version(version, BASE, None, {"test": True}, status="published")
    return runtime


def make_adapter_version(registry: AdapterRegistry, tmp: Path, rank: int = 8, alpha: int = 8, seed: int = 1) -> str:
    """Publish a LoRA (random non-zero weights, so its images differ from base) as the registry's next version."""
    pipe = build_tiny_sd15()
    torch.manual_seed(seed)  # after the build, which seeds torch itself: distinct seeds give distinct adapters
    settings = LoraSettings(rank=rank, alpha=alpha)
    add_lora(pipe.unet, settings)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    folder = save_adapter(pipe, pipe.unet, tmp / f"adapter-{seed}", settings)
    return registry.publish(folder, parent=BASE, snapshot_id=None, metrics={"test": True}).version
