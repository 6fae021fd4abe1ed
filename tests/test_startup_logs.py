"""Starting the app on the shipped model prints only lines a user can use: no third-party notices, no warnings.

The app runs as `scripts/run.sh` starts it (`python app.py` with the same environment), on a free port and a fresh
data folder, until it serves its page and its generation worker has warmed its adapter slots; then it is stopped the
way `docker stop` stops it (SIGTERM); what it printed up to then is read. Training a LoRA on the shipped model
(`python -m ncp.train`, two steps) is held to the same rule."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app_fixtures import free_port
from tests.helpers.logs import warning_lines

ROOT = Path(__file__).resolve().parents[1]


def test_warning_lines_reads_the_notices_it_must_catch() -> None:
    noisy = (
        "2026-12-03 12:45:05,484 WARNING jobs.loop: round failed\n"
        "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back\n"
        "Loading pipeline components...:  60%|###| 3/5\rExpected types for vae: (AutoencoderKL,), got AutoencoderTiny.\n"
        "/x/peft/tuners/tuners_utils.py:331: UserWarning: Already found a `peft_config` attribute in the model.\n"
        "Token indices sequence length ... truncated to 32 tokens\n"
    )
    assert len(warning_lines(noisy)) == 5
    quiet = (
        "2026-12-03 12:45:08,571 INFO apscheduler.scheduler: Scheduler started\n* Running on local URL:  http://x\n"
    )
    assert warning_lines(quiet) == []


# Lines that are not warnings but tell a user nothing either: Gradio's offer of a share link, httpx's log of every
# request Gradio makes to itself, APScheduler's job bookkeeping. app.py silences them at their source.
NOISE = ("share=True", "httpx", "HTTP Request:", "Adding job tentatively", 'Added job "')


def test_the_install_commands_do_not_print_pips_root_warning() -> None:
    for script in ("scripts/run.sh", "scripts/test.sh"):
        text = (ROOT / script).read_text()
        assert "PIP_ROOT_USER_ACTION=ignore" in text and "PIP_DISABLE_PIP_VERSION_CHECK=1" in text, script


@pytest.mark.slow
def test_the_app_starts_on_the_shipped_model_without_warning_lines(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "NCP_DATA_DIR": str(tmp_path / "data"),
        "GRADIO_SERVER_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("NCP_MODEL", None)  # the shipped default, models/shapes-base
    log = tmp_path / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
        try:
            deadline, ready = time.monotonic() + 1200, False  # minutes when other processes load the CPU
            while not ready and time.monotonic() < deadline and proc.poll() is None:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
                    ready = True
                except OSError:
                    time.sleep(1)
            assert proc.poll() is None, "the app exited during startup:\n" + log.read_text()[-4000:]
            assert ready, "the app did not serve its page in time:\n" + log.read_text()[-4000:]
            time.sleep(10)  # the worker's first generations and the scheduler's start log after the page is up
            startup = log.read_text()  # what it printed before it was asked to stop
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert "Running on local URL" in startup, log.read_text()[-4000:]
    assert not warning_lines(startup), "warning lines at startup:\n" + "\n".join(warning_lines(startup))
    noise = [line for line in startup.splitlines() if any(n in line for n in NOISE)]
    assert not noise, "lines a user cannot use at startup:\n" + "\n".join(noise)


@pytest.mark.slow
def test_training_on_the_shipped_model_prints_no_warning_lines(tmp_path: Path) -> None:
    """`python -m ncp.train` as a researcher runs it on an export (progress bar on, no environment of the test suite's
    own beyond an offline hub): two steps on `models/shapes-base`, and nothing it prints reads as a warning."""
    from ncp.shapes.grammar import probe_prompts
    from tests.test_data import png, row, write_parquet

    red, blue = png((200, 30, 30)), png((30, 30, 200))
    data = write_parquet(tmp_path / "prefs.parquet", [row(p, red, blue, 1.0, 0.0) for p in probe_prompts(4, seed=0)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TOKENIZERS_PARALLELISM", None)  # the suite sets it; a researcher's shell does not
    cmd = [sys.executable, "-m", "ncp.train", "--model", str(ROOT / "models" / "shapes-base"), "--data", str(data)]
    cmd += ["--out", str(tmp_path / "adapter"), "--max-steps", "2", "--threads", "1"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Done: 2 step(s)" in proc.stdout and (tmp_path / "adapter").is_dir(), proc.stdout[-4000:]
    assert not warning_lines(proc.stdout), "warning lines while training:\n" + "\n".join(warning_lines(proc.stdout))


def test_a_tick_during_a_round_logs_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The schedule looks every 15 s in the shapes world and a round takes minutes: APScheduler's "skipped: maximum
    number of running instances reached" on every such tick is the design working, not a warning. Others still show."""
    import logging

    import jobs.schedule  # noqa: F401 - installs the filter

    aps = logging.getLogger("apscheduler.scheduler")
    with caplog.at_level(logging.WARNING):
        aps.warning('Execution of job "%s" skipped: maximum number of running instances reached (%d)', "round", 1)
        aps.warning("Run time of job %s was missed by %s", "round", "0:00:01")
    assert [r.getMessage() for r in caplog.records] == ["Run time of job round was missed by 0:00:01"]


def test_loading_a_unet_lora_with_the_stock_loader_says_nothing(tmp_path: Path) -> None:
    """The evaluator's load test and the app's hot-swap load every version with `load_lora_weights`; a UNet-only
    adapter has no text-encoder keys by design, and diffusers' notice about it is dropped at its logger (a handler on
    that logger sees what passes its filters: diffusers' loggers do not propagate). Another warning there still shows."""
    import logging

    from jobs.runtime import SHAPES_MODEL
    from ncp.pipelines import load_pipeline
    from tests.helpers.adapters import random_adapter

    pipe = load_pipeline(SHAPES_MODEL)
    folder = random_adapter(pipe, tmp_path / "adapter")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    target = logging.getLogger("diffusers.loaders.lora_base")
    target.addHandler(handler)
    try:
        pipe.load_lora_weights(str(folder), adapter_name="v0001")
        target.warning("a notice that applies")
    finally:
        target.removeHandler(handler)
    assert "v0001" in pipe.unet.peft_config
    assert seen == ["a notice that applies"], seen
