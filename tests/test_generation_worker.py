"""The generation service in a child process: the same images and lineage as in process, clear errors, a restart
after the child dies, and no orphan when the app is killed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.registry import BASE
from ncp.adapters import LoraSettings
from ncp.generation_worker import GenerationWorker, WorkerDied, load_serving_pipeline
from ncp.pipelines import build_tiny_sd15, load_pipeline
from ncp.serving import GenerationService, SamplingConfig
from tests.test_serving_slots import adapter

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = SamplingConfig(steps=2, width=32, height=32)
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("worker") / "model"
    build_tiny_sd15().save_pretrained(folder)
    return folder


def pixels(service, version: str | None, seed: int = 7) -> np.ndarray:  # noqa: ANN001 - either service
    return np.asarray(service.generate(PROMPT, [seed], version=version)[0].image, dtype=np.int16)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
        return f.read().split()[2] != "Z"


def test_worker_matches_the_in_process_service_and_restarts_after_a_crash(model: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = adapter(tmp_path)
    local = GenerationService(load_pipeline(model), "tiny", SAMPLING, lora_rank=8)
    worker = GenerationWorker(str(model), "tiny", SAMPLING, lora_rank=8, device="cpu")
    try:
        for service in (local, worker):
            service.warm_slots(LoraSettings().target_modules, alpha=8)
            service.register_version("v1", folder)
        base = pixels(local, BASE)
        assert np.array_equal(pixels(worker, BASE), base)
        # Lineage fields travel with the image; the PNG bytes are the in-process service's, byte for byte.
        a, b = local.generate(PROMPT, [7, 8])[1], worker.generate(PROMPT, [7, 8])[1]
        assert (a.sha256, a.seed, a.adapter_version, a.scheduler, a.steps) == (
            b.sha256, b.seed, b.adapter_version, b.scheduler, b.steps,
        )  # fmt: skip
        epoch = worker.epoch
        local.swap_adapter("v1")
        worker.swap_adapter("v1")
        assert worker.serving_version == "v1" and worker.epoch == epoch + 1
        served = pixels(local, None)
        assert not np.array_equal(served, base)
        assert np.array_equal(pixels(worker, None), served)
        assert np.array_equal(pixels(worker, BASE), base), "a battle image of base while v1 is served"
        pair = worker.make_pair(PROMPT, "cross_version", random.Random(0), [BASE])
        assert {pair.left.adapter_version, pair.right.adapter_version} == {"v1", BASE}

        with pytest.raises(KeyError, match="Unknown adapter version 'v9'"):
            worker.swap_adapter("v9")
        with pytest.raises(ValueError, match="at least one seed"):
            worker.generate(PROMPT, [])
        with pytest.raises(KeyError, match="v9"):  # the child's own error, raised in the parent
            worker.generate(PROMPT, [1], version="v9")

        first = worker.pid
        os.kill(first, signal.SIGKILL)
        with pytest.raises(WorkerDied, match="exited"):
            worker.generate(PROMPT, [7])
        # The next call starts a fresh child in the same state: v1 still served, base still reachable.
        assert np.array_equal(pixels(worker, None), served)
        assert worker.pid != first and worker.restarts == 1 and worker.serving_version == "v1"
        assert np.array_equal(pixels(worker, BASE), base)
        # A SIGTERM to the whole process group (docker stop) is the app's to handle: the child keeps serving.
        os.kill(worker.pid, signal.SIGTERM)
        assert np.array_equal(pixels(worker, None), served) and worker.restarts == 1
        second = worker.pid
    finally:
        worker.close()
    assert worker.pid is None and not alive(first) and not alive(second)
    with pytest.raises(RuntimeError, match="closed"):  # no fresh child during the app's shutdown
        worker.generate(PROMPT, [7])
    assert worker.pid is None


def test_a_bad_model_is_a_clear_start_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        GenerationWorker(str(tmp_path), "tiny", SAMPLING, device="cpu")


def test_a_cuda_device_torch_cannot_see_is_a_clear_start_error(model: Path) -> None:
    """NCP_DEVICE=cuda on CPU hardware (or cuda:N past the last GPU) names the setting at start-up, in the app's
    process and, through the child's start-up reply, in the worker's."""
    with pytest.raises(ValueError, match=r"NCP_DEVICE='cuda:99' but torch sees \d+ CUDA device"):
        load_serving_pipeline(str(model), "cuda:99")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use NCP_DEVICE=auto or cpu"):
            GenerationWorker(str(model), "tiny", SAMPLING, device="cuda")
    assert load_serving_pipeline(str(model), "auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_child_exits_when_the_app_is_killed(model: Path) -> None:
    """SIGKILL gives the app no chance to clean up: the child must notice on its own (its socket reads EOF)."""
    code = (
        "import sys, time\n"
        "from ncp.generation_worker import GenerationWorker\n"
        "from ncp.serving import SamplingConfig\n"
        f"w = GenerationWorker({str(model)!r}, 'tiny', SamplingConfig(steps=1, width=32, height=32), device='cpu')\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    app = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child = int(app.stdout.readline())
        assert alive(child)
        app.kill()
        app.wait(timeout=30)
        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(child), "the generation process outlived the killed app"
    finally:
        app.kill()
