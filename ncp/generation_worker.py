"""The generation service in its own process: diffusion off the HTTP handlers' GIL, at a CPU priority of its own,
and its faults (and GPU memory) out of the app's process.

A diffusers sampling loop on a small model is Python-bound: in the app's process it holds the GIL much of the time,
and vote handlers wait for it (bench/serving.py compares this with the in-process thread in one run). `GenerationWorker` has the
interface of `ncp.serving.GenerationService` (generate, make_pair, swap_adapter, warm_slots, register_version, ...)
and forwards each call to a `GenerationService` in a child process (`python -m ncp.generation_worker --fd N`) over
a socket pair. Calls are serialised by one lock, exactly like the in-process pipeline lock, so the lineage rules are
unchanged: an image is made by one adapter version, and a swap waits for the generation in flight.

The child exits when the app dies (even by SIGKILL): its socket then reads end-of-file. If the child dies, the call
in flight raises `WorkerDied`; the next call starts a fresh child and replays the registered versions, the warm slots
and the serving version, so the arena keeps serving.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import multiprocessing.connection as mpc
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ncp.serving import BASE, GeneratedImage, PairMaker, SamplingConfig

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


class WorkerDied(RuntimeError):
    """The generation process exited during a call (the next call restarts it)."""


def load_serving_pipeline(model: str, device: str = "auto"):  # noqa: ANN201 - a diffusers pipeline
    """The arena's pipeline, in either mode: on CUDA in fp16 when `device` is "auto" and torch sees a GPU (a Space on
    GPU hardware; the SDXL VAE upcasts itself to decode), else float32 on the CPU; no progress bars."""
    import torch

    from ncp.pipelines import load_pipeline

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda"):  # fail at start-up with the reason, not in the first generation's stack trace
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"NCP_DEVICE={device!r} but torch sees {torch.cuda.device_count()} CUDA device(s) (CUDA build: "
                f"{torch.version.cuda or 'none'}); use NCP_DEVICE=auto or cpu, or a GPU Space with CUDA torch."
            )
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    vae = getattr(pipe, "vae", None)
    if dtype == torch.float16 and vae is not None and getattr(pipe.unet.config, "addition_embed_type", None):
        # SDXL's stock VAE overflows in fp16 (METHOD.md pitfalls): its config says force_upcast, and the pipeline
        # decodes in fp32 (about +1-2 GiB at 1024 px). The fp16-fix VAE (config force_upcast false) decodes in fp16.
        how = "in fp32 (force_upcast)" if getattr(vae.config, "force_upcast", False) else "in fp16 (no force_upcast)"
        logger.info("SDXL VAE decodes %s; to decode in fp16 put the fp16-fix VAE in %s/vae", how, model)
    return pipe


class GenerationWorker(PairMaker):
    """A GenerationService in a child process, with the same interface."""

    def __init__(
        self,
        model: str,
        base_model: str,
        sampling: SamplingConfig | None = None,
        lora_rank: int = 64,
        device: str = "auto",
        threads: int = 1,
        nice: int = 0,
        start_timeout_s: float = 600.0,
    ) -> None:
        self.model, self.base_model = str(model), base_model
        self.sampling = sampling or SamplingConfig()
        self._lora_rank, self._device, self._threads, self._nice = lora_rank, device, threads, nice
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._folders: dict[str, Path] = {}
        self._warm: tuple[list[str], float] | None = None
        self._serving = BASE
        self.last_swap_s = 0.0
        self.epoch = 0
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._conn: mpc.Connection | None = None
        self._closed = False
        with self._lock:
            self._start()

    # -- the child process ----------------------------------------------------------------------------------------------
    def _start(self) -> None:
        ours, theirs = mpc.Pipe(duplex=True)
        spec = {
            "model": self.model,
            "base_model": self.base_model,
            "sampling": dataclasses.asdict(self.sampling),
            "lora_rank": self._lora_rank,
            "device": self._device,
            "threads": self._threads,
            "nice": self._nice,
        }
        cmd = [sys.executable, "-m", "ncp.generation_worker", "--fd", str(theirs.fileno())]
        # No stdin: the child must not read the app's terminal; its logs go to the app's stderr.
        self._proc = subprocess.Popen(cmd, cwd=ROOT, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()  # only the child holds its end now: our reads see EOF when it exits
        self._conn = ours
        ours.send(spec)
        if not ours.poll(self._start_timeout_s):
            self._kill()
            raise RuntimeError(
                f"the generation process did not load {self.model} within {self._start_timeout_s:.0f} s"
            )
        try:
            self._receive()  # "ready", or the child's load error (e.g. a missing model folder) raised here
        except Exception:
            self._kill()
            raise

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _restart(self) -> None:
        """A fresh child in the parent's state: every registered version, the warm slots, the serving version."""
        self._kill()
        self.restarts += 1
        logger.error("generation process died; restarting it (restart %d)", self.restarts)
        self._start()
        for version, folder in self._folders.items():
            self._request("register", version, str(folder))
        if self._warm is not None:
            self._request("warm", *self._warm)
        if self._serving != BASE:
            self._request("swap", self._serving)

    def _receive(self):  # noqa: ANN202 - whatever the child returned
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as err:
            try:
                code = self._proc.wait(timeout=5) if self._proc is not None else None
            except subprocess.TimeoutExpired:  # its socket closed but it lives on: end it
                code = "still running, killed"
            self._kill()
            raise WorkerDied(f"the generation process exited (code {code}) during a call") from err
        if status == "error":
            raise value
        return value

    def _request(self, op: str, *args):  # noqa: ANN202 - call with the lock held
        try:
            self._conn.send((op, args))
        except (OSError, ValueError) as err:
            self._kill()
            raise WorkerDied("the generation process is gone") from err
        return self._receive()

    def _call(self, op: str, *args):  # noqa: ANN202 - call with the lock held
        if self._closed:
            raise RuntimeError("the generation service is closed (the app is shutting down).")
        if self._conn is None:
            self._restart()
        return self._request(op, *args)

    # -- the GenerationService interface --------------------------------------------------------------------------------
    @property
    def serving_version(self) -> str:
        return self._serving

    def register_version(self, version: str, folder: Path) -> None:
        with self._lock:
            self._call("register", version, str(folder))
            self._folders[version] = Path(folder)

    def known_versions(self) -> list[str]:
        return [BASE, *self._folders]

    def warm_slots(self, target_modules: Sequence[str], alpha: float) -> float:
        with self._lock:
            self._warm = (list(target_modules), float(alpha))
            return self._call("warm", *self._warm)

    def swap_adapter(self, version: str) -> float:
        if version != BASE and version not in self._folders:
            raise KeyError(f"Unknown adapter version {version!r}; known: {', '.join(self.known_versions())}.")
        with self._lock:
            self.last_swap_s = self._call("swap", version)
            self._serving = version
            self.epoch += 1
        logger.info("now serving %s (swap took %.1f ms)", version, 1000 * self.last_swap_s)
        return self.last_swap_s

    def card_info(self):  # noqa: ANN201 - ncp.memory.CardInfo | None
        """The child's CUDA card (None on the CPU); asked of the child, so the app process opens no CUDA context."""
        with self._lock:
            return self._call("card")

    def release_device(self) -> float:
        """The child's weights off the GPU for a round that trains alone (GenerationService.release_device)."""
        with self._lock:
            return self._call("release")

    def restore_device(self) -> float:
        with self._lock:
            return self._call("restore")

    def generate(self, prompt: str, seeds: Sequence[int], version: str | None = None) -> list[GeneratedImage]:
        if not seeds:
            raise ValueError("generate needs at least one seed.")
        with self._lock:
            used = self._serving if version is None else version
            records = self._call("generate", prompt, [int(s) for s in seeds], used)
        out = []
        for rec in records:
            image = Image.open(io.BytesIO(rec["png"]))
            image.load()
            out.append(GeneratedImage(image=image, **rec))
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True  # a prefetch call after this must not start a fresh child
            if self._conn is not None:
                try:
                    self._conn.send(("stop", ()))
                    self._proc.wait(timeout=30)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    pass
            self._kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


# -- the child ------------------------------------------------------------------------------------------------------------
def picklable(err: Exception) -> Exception:
    """The error itself when it survives pickling (KeyError, ValueError, ...), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def serve(conn: mpc.Connection) -> None:
    """Load the pipeline, then answer calls until the parent says stop or goes away."""
    import torch

    from ncp.serving import GenerationService

    # The parent owns this process's life: a SIGTERM or Ctrl-C sent to the whole process group (docker stop, a
    # terminal) must not kill it under a running app, which would restart it during its own shutdown. It exits when
    # the parent says stop or its socket closes (the parent exited, even by SIGKILL).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = conn.recv()
    # A lower CPU priority: when request handling and diffusion compete for the cores, the rater's request goes first
    # and generation takes what is left (the prefetch queue absorbs the slowdown). Idle cores still go to diffusion.
    os.nice(spec["nice"])
    try:
        torch.set_num_threads(spec["threads"])
        pipe = load_serving_pipeline(spec["model"], spec["device"])
        service = GenerationService(pipe, spec["base_model"], SamplingConfig(**spec["sampling"]), spec["lora_rank"])
    except Exception as err:  # the parent raises it: a clear start-up error, not a hang
        conn.send(("error", picklable(err)))
        return
    conn.send(("ok", "ready"))
    handlers = {
        "register": lambda version, folder: service.register_version(version, Path(folder)),
        "warm": service.warm_slots,
        "swap": service.swap_adapter,
        "card": service.card_info,
        "release": service.release_device,
        "restore": service.restore_device,
        "generate": lambda prompt, seeds, version: [
            {f.name: getattr(img, f.name) for f in dataclasses.fields(img) if f.name != "image"}
            for img in service.generate(prompt, seeds, version=version)
        ],
    }
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return  # the app exited (or was killed): so do we
        if op == "stop":
            return
        try:
            reply = ("ok", handlers[op](*args))
        except Exception as err:
            reply = ("error", picklable(err))
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair (passed by the parent)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s generation-worker: %(message)s")
    serve(mpc.Connection(args.fd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
