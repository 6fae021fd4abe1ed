"""What every benchmark repeats, in one place: start the app as its own process and wait for it, a free port, the
simulated raters, LoRA versions published before a start, memory readings, and publishing a result as a section of docs/BENCHMARKS.md.

    from bench.harness import AppServer, free_port, write_section
    server = AppServer(data_dir, free_port(), env)        # `python app.py` in its own process group
    server.start(); server.wait_ready(300)                # ... drive it over HTTP ...; server.stop()
    write_section(ROOT / "docs" / "BENCHMARKS.md", "my-bench", markdown)

The simulated raters are `bench/raters.py` (`run_raters`: they vote through the app's real HTTP API).
`bench/docs.py` and `bench/net.py` re-export this module's names for the scripts that import them from there.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Benchmarks\n\nEvery figure below comes from a script in `bench/` that anyone can rerun.\n"


# -- publishing ------------------------------------------------------------------------------------------------------
def write_section(path: Path, name: str, markdown: str) -> None:
    """Write one benchmark's section of `path` between `<!-- BEGIN name -->` / `<!-- END name -->` markers, leaving
    every other section as it is (several benchmarks write the same file); atomic (temporary file + rename)."""
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def fmt(x: float | None, spec: str = ".3f") -> str:
    """A number for a results table; empty when it was not measured."""
    return "" if x is None else format(x, spec)


def yes_no(ok: bool | None) -> str:
    """A goal's verdict for a results table."""
    return "not measurable" if ok is None else ("**yes**" if ok else "**no**")


def ms_cell(d: dict) -> str:
    """p50 / p95 / p99 / max of a latency summary with those keys (and `n`), in ms; empty without samples."""
    return "" if not d.get("n") else f"{d['p50']:.0f} / {d['p95']:.0f} / {d['p99']:.0f} / {d['max']:.0f}"


def repo_path(path: str | Path) -> str:
    """`path` relative to the repository when it lies inside it (as docs and rerun commands name models), else absolute."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


# -- the app as a process --------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free localhost port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` (or bench/reliability_server.py) in its own process group, logging to the data dir."""

    def __init__(self, data_dir: Path, port: int, env: dict[str, str], use_wrapper: bool = False) -> None:
        self.data_dir, self.port, self.env = data_dir, port, env
        self.cmd = [sys.executable, "-m", "bench.reliability_server"] if use_wrapper else [sys.executable, "app.py"]
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.data_dir / f"server-{self.starts}.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def wait_ready(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with {self.proc.returncode} at start; see {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/config", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the app did not answer within {timeout_s:.0f} s; see {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.data_dir / f"server-{self.starts}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def kill(self) -> None:
        """SIGKILL the whole process group (the app and a training or evaluation child, if one runs)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM (a clean shutdown: the app stops its runtime and closes the store), SIGKILL if it hangs."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def publish_versions(data_dir: Path, n: int = 2, std: float = 0.02) -> list[str]:
    """Publish `n` LoRA versions of the shapes model (random B matrices, LoopConfig's rank and alpha) into the data
    dir's registry and register them in the store, as the loop would; the registry keeps pointing at base."""
    # Imported here: the rest of the harness also serves GPU scripts on machines without the app's dependencies.
    from feedback_store import FeedbackStore
    from jobs.loop_config import LoopConfig
    from jobs.registry import BASE, AdapterRegistry
    from jobs.runtime import SHAPES_MODEL
    from ncp.adapters import LoraSettings, add_lora, save_adapter
    from ncp.pipelines import load_pipeline

    loop = LoopConfig()
    registry = AdapterRegistry(data_dir / "adapters", keep=loop.keep_versions)
    versions = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, n + 1):
            pipe = load_pipeline(SHAPES_MODEL)
            settings = LoraSettings(rank=loop.lora_rank, alpha=loop.lora_alpha)
            add_lora(pipe.unet, settings)
            torch.manual_seed(seed)
            with torch.no_grad():
                for name, p in pipe.unet.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, std)
            folder = save_adapter(pipe, pipe.unet, Path(tmp) / f"adapter-{seed}", settings)
            versions.append(registry.publish(folder, parent=BASE, snapshot_id=None, metrics={"bench": True}).version)
    with FeedbackStore(data_dir / "arena.duckdb") as store:
        for v in versions:
            store.register_adapter_version(v, BASE, None, {"bench": "reliability"}, status="published")
    return versions


# -- measurements ----------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mem_begin(device: str) -> float:
    """Start a memory reading: CUDA's allocated MiB (peak reset), or the RSS after returning freed memory to the OS."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory goes back to the OS, so a step's growth shows in RSS
    return rss_mb()


def mem_now(device: str) -> float:
    """CUDA's peak allocated MiB since `mem_begin`, or the RSS now."""
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else rss_mb()


def write_json(data: dict, out: Path) -> None:
    """A result file: non-finite numbers as null (`ncp.checkpoints.finite_json`), indented."""
    from ncp.checkpoints import finite_json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite_json(data), indent=2))


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes (the arena's export stores PNGs)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
