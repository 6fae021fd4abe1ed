"""Held-out quality of every served version, for the Progress chart: measured off the request path, read from disk.

In the shapes world the pixel judge scores each published version on the test probes (prompts and seeds that no
gate, rater or training run ever sees: `ncp.evaluate.test_probe_prompts`, seeds from TEST_SEED_OFFSET), with a 95%
bootstrap interval over prompts (`ncp.evaluate.cluster_ci`); the base and the ceiling model (the same world pretrained
on clean captions) are measured once, so the chart can show the base-to-ceiling gap. The settings are bench/loop.py's
test probes, so the chart's figures and the README's are the same measurement.

`QualityTracker` is a background thread in the app process: every few seconds it looks for a published version (or the
base, or the ceiling) without a current record and measures it in a child process (one torch thread, like the
rounds' children), writing `<data_dir>/quality/<name>.json`. The app's Progress handler only reads those small files.

    python -m jobs.quality --model models/shapes-base --name base --out data/quality/base.json   # one by hand
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.registry import BASE, AdapterRegistry, RegistryError
from jobs.subprocess_run import CANCELLED, run_child

logger = logging.getLogger(__name__)

CEILING = "ceiling"
QUALITY_DIR = "quality"
TEST_PROBES = 96  # bench/loop.py's test probes (ncp.evaluate.TEST_PROBES): the README's figures come from them
TEST_SEEDS = 2


@dataclass(frozen=True)
class QualitySettings:
    """What one quality record is measured with; a record made with other settings is measured again."""

    probes: int = TEST_PROBES  # test probe prompts
    seeds: int = TEST_SEEDS  # image seeds per prompt (from ncp.evaluate.TEST_SEED_OFFSET)
    threads: int = 1  # torch threads of the child (the app keeps generating beside it)
    nice: int = 19  # the child's niceness: under contention the app's handlers and generation go first
    time_limit_s: float = 900.0

    def __post_init__(self) -> None:
        if self.probes < 2 or self.seeds < 1:
            raise ValueError(f"probes must be >= 2 and seeds >= 1, got {self.probes} and {self.seeds}.")


def quality_dir(data_dir: Path) -> Path:
    return Path(data_dir) / QUALITY_DIR


def read_quality(data_dir: Path) -> dict[str, dict]:
    """Every quality record under `<data_dir>/quality/` by name (base, ceiling, v0001, ...); unreadable files skipped."""
    out = {}
    folder = quality_dir(data_dir)
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("judge"), float):
            out[f.stem] = rec
    return out


class QualityTracker:
    """Measures what the Progress chart needs, one child process at a time, in a daemon thread.

    `model`: the served base pipeline; `ceiling`: the clean-caption model (None: no ceiling line). Records are keyed
    by (model, weights sha256, settings), so a restart re-measures nothing and a changed model re-measures all."""

    def __init__(
        self,
        registry: AdapterRegistry,
        data_dir: Path,
        model: str,
        ceiling: str | None = None,
        settings: QualitySettings | None = None,
        poll_s: float = 5.0,
    ) -> None:
        self.registry, self.model, self.ceiling = registry, str(model), None if ceiling is None else str(ceiling)
        self.folder = quality_dir(data_dir)
        self.settings = settings or QualitySettings()
        self.poll_s = poll_s
        self.measuring: str | None = None  # the name being measured now, for the Progress tab's empty state
        self.failed: dict[str, str] = {}  # name -> reason of its last failed measurement (not retried until restart)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def key(self, name: str) -> dict:
        """What a record of `name` must have been measured with to be current."""
        s = self.settings
        weights = "" if name in (BASE, CEILING) else self.registry.info(name).weights_sha256
        model = self.ceiling if name == CEILING else self.model
        return {"model": model, "weights": weights, "probes": s.probes, "seeds": s.seeds}

    def pending(self) -> list[str]:
        """Names without a current record, oldest first: base, ceiling, then the published versions."""
        names = [BASE, *([CEILING] if self.ceiling else []), *self.registry.versions()]
        have = read_quality(self.folder.parent)
        return [n for n in names if n not in self.failed and have.get(n, {}).get("key") != self.key(n)]

    def measure(self, name: str) -> bool:
        """Measure `name` now in a child process; True when its record was written."""
        out = self.folder / f"{name}.json"
        key = self.key(name)
        cmd = [sys.executable, "-m", "jobs.quality", "--model", key["model"], "--name", name, "--out", str(out)]
        cmd += ["--probes", str(self.settings.probes), "--seeds", str(self.settings.seeds)]
        cmd += ["--threads", str(self.settings.threads), "--nice", str(self.settings.nice), "--key", json.dumps(key)]
        if name not in (BASE, CEILING):
            cmd += ["--adapter", str(self.registry.info(name).folder)]
        self.measuring = name
        try:
            res = run_child(
                cmd,
                time_limit_s=self.settings.time_limit_s,
                log_path=self.folder / "logs" / f"{name}.log",
                cancel=self._stop.is_set,
            )
        finally:
            self.measuring = None
        if not res.ok:
            self.failed[name] = res.reason
            log = logger.info if res.reason == CANCELLED else logger.warning  # shutting down: not a fault
            log("quality of %s not measured: %s", name, res.reason)
        return res.ok

    def run_pending(self) -> int:
        """Measure everything pending now (the screenshot command and tests); returns how many were measured."""
        done = 0
        for name in self.pending():
            if self._stop.is_set():
                break
            done += self.measure(name)
        return done

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except (
                OSError,
                ValueError,
                RegistryError,
            ) as err:  # a version pruned while measured, a disk error: try again later
                logger.warning("quality tracker: %s", err)
            self._stop.wait(self.poll_s)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="quality-tracker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def measure(model: str, adapter: Path | None, probes: int, seeds: int) -> dict:
    """Judge score of `model` (+ `adapter`) on the test probes: mean and 95% bootstrap interval over prompts."""
    from ncp.evaluate import TEST_SEED_OFFSET, cluster_ci, judge_probe, test_probe_prompts
    from ncp.pipelines import load_pipeline
    from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    name = None
    if adapter is not None:
        name = "measured"
        pipe.load_lora_weights(str(adapter), adapter_name=name)
    seed_list = list(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + seeds))
    prompts = test_probe_prompts(probes)
    scores = judge_probe(pipe, name, prompts, seed_list, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE)
    mean, low, high = cluster_ci(scores)
    return {"judge": mean, "low": low, "high": high, "probes": probes, "seeds": seeds, "steps": DEFAULT_STEPS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder of a shapes-world model")
    p.add_argument("--adapter", type=Path, help="LoRA version folder to measure on top of the model")
    p.add_argument("--name", required=True, help="what the record is called (base, ceiling, v0003, ...)")
    p.add_argument("--out", type=Path, required=True, help="JSON record to write")
    p.add_argument("--probes", type=int, default=TEST_PROBES, help="test probe prompts")
    p.add_argument("--seeds", type=int, default=TEST_SEEDS, help="image seeds per prompt")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--nice", type=int, default=0, help="raise this process's niceness by this much first")
    p.add_argument("--key", default="{}", help="JSON the tracker matches records by (set by QualityTracker)")
    args = p.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO)
    t0 = time.monotonic()
    rec = measure(args.model, args.adapter, args.probes, args.seeds)
    rec |= {"name": args.name, "key": json.loads(args.key), "seconds": round(time.monotonic() - t0, 1)}
    rec["measured"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
