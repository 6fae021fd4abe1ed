"""Run a child process (trainer, evaluator) with a wall-clock limit, following its JSON-lines progress file.

Training runs out of process (DESIGN.md): a crash, NaN, OOM or SIGKILL in the child never touches the app, and
the child's memory is returned to the OS when it exits. The caller learns why a run failed from `ChildResult.reason`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)
CANCELLED = "cancelled (the app is shutting down)"


@dataclass(frozen=True)
class ChildResult:
    ok: bool
    returncode: int | None
    reason: str  # "" when ok
    seconds: float
    stderr_tail: str


def read_progress(path: Path) -> list[dict]:
    """All complete JSON lines of a progress file (a line being written is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def run_child(
    cmd: Sequence[str],
    *,
    time_limit_s: float,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    on_poll: Callable[[], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ChildResult:
    """Run `cmd`; kill its whole process group past `time_limit_s` or when `cancel()` turns true."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # own process group: a kill reaches accelerate's workers too
        )
        reason = ""
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if on_poll is not None:
                on_poll()
            if time.monotonic() - t0 > time_limit_s:
                reason = f"time limit of {time_limit_s:.0f} s exceeded; the run was killed"
            elif cancel is not None and cancel():
                reason = CANCELLED
            if reason:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = proc.wait()
                break
    seconds = time.monotonic() - t0
    tail = log_path.read_text(errors="replace")[-2000:]
    if not reason and rc != 0:
        if rc < 0:
            reason = f"killed by signal {signal.Signals(-rc).name}"
        else:
            last = [ln for ln in tail.splitlines() if ln.strip()]
            reason = f"exited with code {rc}: {last[-1][:300] if last else 'no output'}"
    ok = not reason
    if not ok:  # a cancellation is the app shutting down as asked, not a fault a user must act on
        log = logger.info if reason == CANCELLED else logger.warning
        log("child %s failed: %s", cmd[:3], reason)
    return ChildResult(ok=ok, returncode=rc, reason=reason, seconds=seconds, stderr_tail=tail)
