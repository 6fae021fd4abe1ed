"""Training state on disk: atomic folders, resumable checkpoints of the LoRA + optimizer, and the JSON-lines progress
log that the app tails to show a round's live progress. Used by ncp.trainer."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ncp.adapters import unwrap_unet
from ncp.train_config import TrainConfig

logger = logging.getLogger(__name__)


class ProgressLog:
    """Append-only JSON lines, flushed per line so another process can tail it. Non-finite floats become null."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = finite_json({"event": event, "time": time.time(), **fields})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def finite_json(value: Any) -> Any:
    """NaN/inf -> None (recursively), so written JSON is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def atomic_dir(final: Path, write: Any) -> None:
    """Write a folder under a temporary sibling name, then rename it into place."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step-*") if (p / "state.pt").is_file()) if folder.is_dir() else []


def save_checkpoint(
    folder: Path, step: int, unet: torch.nn.Module, optimizer: Any, lr_sched: Any, config: TrainConfig, scaler: Any
) -> None:
    """Write `folder/step-N/state.pt` atomically (LoRA weights, optimizer, lr schedule, fp16 scaler, config); keep the
    latest two."""
    state = {
        "step": step,
        "lora": {n: p.detach().cpu() for n, p in unwrap_unet(unet).named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_sched.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "config": dataclasses.asdict(config),
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_dir(folder / f"step-{step:08d}", lambda tmp: torch.save(state, tmp / "state.pt"))
    for old in checkpoints(folder)[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def resume_path(config: TrainConfig, checkpoint_dir: Path) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        found = checkpoints(checkpoint_dir)
        if not found:
            logger.info("resume=latest: no checkpoint in %s, starting fresh.", checkpoint_dir)
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(
            f"resume={path} holds no state.pt; pass a '<checkpoint_dir>/step-N' folder or 'latest'."
        )
    return path


def load_checkpoint(
    path: Path, unet: torch.nn.Module, optimizer: Any, lr_sched: Any, config: TrainConfig, scaler: Any
) -> int:
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    changed = {k: (v, getattr(config, k)) for k, v in state["config"].items() if getattr(config, k, v) != v}
    for key in ("seed", "batch_size", "gradient_accumulation", "objective", "space", "lr", "beta"):
        if key in changed:
            logger.warning(
                "Resuming with %s changed %r -> %r: the run will differ from an uninterrupted one.", key, *changed[key]
            )
    params = dict(unwrap_unet(unet).named_parameters())
    for name, value in state["lora"].items():
        params[name].data.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])
