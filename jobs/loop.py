"""One alignment round: snapshot -> train (subprocess) -> evaluate (subprocess) -> gate -> publish -> hot-swap.

    python -m jobs.round --data-dir data        # one round by hand, with the app stopped (jobs/round.py)

The scheduled job (jobs/schedule.py) calls `AlignmentLoop.run_round` inside the app process, which owns the DuckDB
file; the trainer and the evaluator read the round's Parquet snapshot. Any failure (non-zero exit, NaN, SIGKILL,
time limit, an adapter that does not load, a gate that does not hold) leaves the served version unchanged and is
recorded on the training run with its reason; the next round proceeds normally.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from feedback_store import FeedbackStore
from feedback_store.export import export_snapshot
from jobs.gate import promotion_gate
from jobs.loop_config import LoopConfig  # noqa: F401 - re-exported: `from jobs.loop import LoopConfig`
from jobs.registry import BASE, AdapterRegistry, RegistryError
from jobs.subprocess_run import read_progress, run_child
from jobs.training_pairs import cap_rater_share, distinct_image_pairs

logger = logging.getLogger(__name__)


def judge_drop(ev: dict) -> float:
    """How far the candidate's probe judge fell below the version it was compared with (0 without a judge): a
    candidate far below is a dead end, not a warm start for the next round."""
    cand = ev.get("versions", {}).get("candidate", {})
    if "judge" not in cand:
        return 0.0
    serving = ev["versions"].get("serving")
    ref = serving["judge"] if serving else ev.get("base_judge", cand["judge"])
    return ref - cand["judge"]


@dataclass
class RoundStatus:
    """What the UI shows about the round in progress and the last one."""

    state: str = "idle"  # idle | exporting | training | evaluating | publishing
    round_dir: str | None = None
    started: float | None = None
    progress: dict = field(default_factory=dict)  # the trainer's latest progress line
    last: dict | None = None  # the last RoundResult as a dict


@dataclass(frozen=True)
class RoundResult:
    status: str  # promoted | rejected | failed | skipped
    reason: str
    run_id: int | None = None
    version: str | None = None
    parent: str = BASE
    snapshot_id: str | None = None
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


class AlignmentLoop:
    def __init__(
        self,
        store: FeedbackStore,
        registry: AdapterRegistry,
        data_dir: Path,
        config: LoopConfig,
        on_promote: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        before_export: Callable[[], object] | None = None,
    ) -> None:
        self.store, self.registry, self.config = store, registry, config
        self.data_dir = Path(data_dir)
        self.rounds_dir = self.data_dir / "rounds"
        self.snapshots_dir = self.data_dir / "snapshots"
        self.on_promote = on_promote
        self.before_export = before_export  # e.g. the abuse review: raters flagged now never reach this round
        self.clock = clock
        self.status = RoundStatus()
        self._round_lock = threading.Lock()
        self._stop = threading.Event()
        self._last_vote_id = self._trained_upto()
        # The training line: (last rejected candidate's folder, the serving version it was compared with, rejected
        # rounds in the line so far, that candidate's run id). In memory: a restart resumes from the serving version.
        self._line: tuple[Path, str, int, int] | None = None

    # -- scheduling helpers -----------------------------------------------------------------------------------------
    def _trained_upto(self) -> int:
        snaps = self.store.snapshots()
        return max((s.vote_id_max for s in snaps), default=0)

    def new_trainable_votes(self) -> int:
        return len(self.store.trainable_votes(since_vote_id=self._last_vote_id, quarantine_s=self.config.quarantine_s))

    def due(self) -> bool:
        return self.new_trainable_votes() >= self.config.min_new_votes

    def stop(self) -> None:
        """Kill a running round's child process (app shutdown)."""
        self._stop.set()

    def tick(self) -> RoundResult:
        """The scheduled job: one round if enough new trainable votes arrived."""
        if not self.due():
            return RoundResult("skipped", f"fewer than {self.config.min_new_votes} new trainable votes")
        return self.run_round(trigger="schedule")

    # -- one round --------------------------------------------------------------------------------------------------
    def run_round(self, trigger: str = "manual") -> RoundResult:
        if not self._round_lock.acquire(blocking=False):
            return RoundResult("skipped", "a round is already running")
        t0 = time.monotonic()
        try:
            result = self._round(trigger, t0)
        except Exception as err:  # a round must never take the app down; the reason is recorded
            logger.exception("round failed")
            result = RoundResult("failed", f"{type(err).__name__}: {err}", seconds=time.monotonic() - t0)
        finally:
            self.status.state = "idle"
            self._round_lock.release()
        self.status.last = asdict(result)
        return result

    def _round(self, trigger: str, t0: float) -> RoundResult:
        cfg = self.config
        parent = self.registry.current()
        self.status = RoundStatus(state="exporting", started=self.clock(), last=self.status.last)
        if self.before_export is not None:
            self.before_export()
        snap = export_snapshot(
            self.store, self.snapshots_dir, quarantine_s=cfg.quarantine_s, eval_fraction=cfg.eval_fraction
        )
        self._last_vote_id = max(self._last_vote_id, int(snap.manifest["vote_id_max"]))
        eval_file = snap.path / "eval.parquet"
        held = strict_pairs(eval_file)
        if cfg.gate_require_acc_gain and held < cfg.gate_min_eval_pairs:  # the gate could not promote: do not train
            return RoundResult("skipped", f"waiting for votes: {held} of the {cfg.gate_min_eval_pairs} held-out pairs "
                               "the gate needs to tell learning from noise",
                               parent=parent, snapshot_id=snap.snapshot_id, seconds=time.monotonic() - t0)  # fmt: skip
        round_dir = self.rounds_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{snap.snapshot_id}"
        round_dir.mkdir(parents=True, exist_ok=True)
        self.status.round_dir = str(round_dir)
        train_file = round_dir / "train.parquet"
        only = parent if cfg.train_window == "serving" else None
        n = cap_rater_share(snap.path / "train.parquet", train_file, cfg.max_rater_share, cfg.min_pairs, only)
        if only is not None and n < cfg.min_pairs:  # a new version has few pairs yet: wait for them, no failed run
            return RoundResult("skipped", f"only {n} pairs of {parent}'s own images; waiting for {cfg.min_pairs}",
                               parent=parent, snapshot_id=snap.snapshot_id, seconds=time.monotonic() - t0)  # fmt: skip
        init, line_len = self._init_adapter(parent)
        distinct = distinct_image_pairs(train_file) if n else 0  # rows are votes; several raters vote on one pair
        run_id = self.store.start_training_run(
            snap.snapshot_id,
            parent,
            config={
                **asdict(cfg),
                "trigger": trigger,
                "pairs": n,
                "distinct_pairs": distinct,
                "init_adapter": self._describe(init, parent),
            },
        )

        def fail(status: str, reason: str, metrics: dict | None = None) -> RoundResult:
            self.store.finish_training_run(run_id, "failed", reason, metrics)  # a gate rejection is a failed run too
            return RoundResult(
                status, reason, run_id, None, parent, snap.snapshot_id, metrics or {}, time.monotonic() - t0
            )

        if n < cfg.min_pairs:
            return fail("failed", f"only {n} trainable strict-preference pairs; need {cfg.min_pairs}")

        # -- train ---------------------------------------------------------------------------------------------------
        self.status.state = "training"
        cand = round_dir / "adapter"
        progress = round_dir / "progress.jsonl"
        cmd = [
            *cfg.launcher,
            "--model",
            cfg.model,
            "--data",
            str(train_file),
            "--out",
            str(cand),
            "--objective",
            cfg.objective,
            "--space",
            cfg.space,
            "--beta",
            str(cfg.beta),
            "--lr",
            str(cfg.lr),
            "--timestep-low",
            str(cfg.timestep_low),
            "--max-steps",
            str(cfg.round_steps(n, distinct)),
            "--batch-size",
            str(cfg.batch_size),
            "--lora-rank",
            str(cfg.lora_rank),
            "--lora-alpha",
            str(cfg.lora_alpha),
            "--max-seconds",
            str(max(10.0, cfg.time_limit_s - 30)),
            "--threads",
            str(cfg.threads),
            "--progress-file",
            str(progress),
            "--no-progress-bar",
            *cfg.extra_train_args,
            *(["--coin-flip-labels"] if cfg.coin_flip_labels else []),
        ]
        if init is not None:
            cmd += ["--init-adapter", str(init), "--reference", cfg.reference]

        def poll() -> None:
            lines = read_progress(progress)
            if lines:
                self.status.progress = lines[-1]

        res = run_child(
            cmd,
            time_limit_s=cfg.time_limit_s,
            log_path=round_dir / "train.log",
            on_poll=poll,
            cancel=self._stop.is_set,
        )
        if not res.ok:
            return fail("failed", f"training: {res.reason}")
        metrics_path = cand / "metrics.json"
        if not metrics_path.exists():
            return fail("failed", "training finished without metrics.json (incomplete adapter)")
        train_metrics = json.loads(metrics_path.read_text())
        final_loss = train_metrics.get("final", {}).get("loss", train_metrics.get("loss"))
        if isinstance(final_loss, float) and not math.isfinite(final_loss):
            return fail("failed", f"training loss is not finite ({final_loss})")

        # -- evaluate (also the load test of the candidate) -----------------------------------------------------------
        self.status.state = "evaluating"
        eval_out = round_dir / "eval.json"
        held_out = eval_file if held else None
        serving = None if parent == BASE else self.registry.info(parent).folder
        ecmd = evaluator_command(cfg, eval_out, cand, serving, held_out, self.rounds_dir / "probe_scores.json")
        eres = run_child(
            ecmd, time_limit_s=cfg.eval_time_limit_s, log_path=round_dir / "eval.log", cancel=self._stop.is_set
        )
        if not eres.ok:
            return fail("failed", f"evaluation / load test: {eres.reason}")
        ev = json.loads(eval_out.read_text())
        metrics = {"train": train_metrics.get("final", {}), "eval": ev, "pairs": n, "train_seconds": res.seconds,
                   "init_adapter": self._describe(init, parent)}  # fmt: skip

        ok, why = self.gate(ev, parent)
        metrics["gate"] = why
        if not ok:
            self.store.register_adapter_version(
                f"rejected-{run_id}", parent, snap.snapshot_id, metrics, status="rejected"
            )
            if cfg.continue_rejected:  # a dead end (fell too far) ends the line: the next round starts from the served
                dead_end = judge_drop(ev) > cfg.continue_max_drop
                self._line = None if dead_end else (cand, parent, line_len + 1, run_id)
            return fail("rejected", f"gate: {why}", metrics)

        # -- publish and swap -----------------------------------------------------------------------------------------
        self.status.state = "publishing"
        try:
            info = self.registry.publish(cand, parent=parent, snapshot_id=snap.snapshot_id, metrics=metrics)
            self.registry.set_current(info.version, reason=f"promoted by round {run_id}")
        except RegistryError as err:
            return fail("failed", f"publish: {err}", metrics)
        self.store.register_adapter_version(info.version, parent, snap.snapshot_id, metrics, status="published")
        if self.on_promote is not None:
            self.on_promote(info.version)
        self.store.finish_training_run(run_id, "succeeded", None, metrics, adapter_version=info.version)
        self.registry.prune()
        shutil.rmtree(cand, ignore_errors=True)
        self._line = None  # the promoted candidate is the serving version now: the next round starts from it
        return RoundResult(
            "promoted", why, run_id, info.version, parent, snap.snapshot_id, metrics, time.monotonic() - t0
        )

    def _init_adapter(self, parent: str) -> tuple[Path | None, int]:
        """Where this round's LoRA starts, and how many rejected rounds in a row that start carries: the last rejected
        candidate while the serving version is still the one it was compared with (no promotion or rollback since) and
        the line has seeded fewer than `continue_rejected` rounds; else the serving version's adapter (None for base)."""
        line = self._line
        if line is not None and self.config.train_window == "all":  # on-policy rounds start from the served version
            folder, line_parent, length, _ = line
            if line_parent == parent and length <= self.config.continue_rejected and folder.is_dir():
                return folder, length
        return (None if parent == BASE else self.registry.info(parent).folder), 0

    def _describe(self, init: Path | None, parent: str) -> str:
        """Lineage of a round's starting weights, for the training run's record."""
        if init is None:
            return BASE
        if self._line is not None and init == self._line[0]:
            return f"rejected-{self._line[3]}"
        return parent

    def gate(self, ev: dict, parent: str) -> tuple[bool, str]:
        """The promotion rule (jobs.gate.promotion_gate) on this round's evaluation."""
        c = self.config
        return promotion_gate(
            ev,
            min_eval_pairs=c.gate_min_eval_pairs,
            acc_z=c.gate_acc_z,
            min_acc_delta=c.gate_min_acc_delta,
            min_judge_delta=c.gate_min_judge_delta,
            require_acc_gain=c.gate_require_acc_gain,
            gain_z=c.gate_gain_z,
        )


def strict_pairs(path: Path) -> int:
    """Held-out pairs with a strict preference in a snapshot's eval split (what the gate scores; ties carry no sign)."""
    if not path.exists() or pq.read_metadata(path).num_rows == 0:
        return 0
    labels = pq.read_table(path, columns=["label_0"]).column("label_0").to_pylist()
    return sum(1 for x in labels if x is not None and x != 0.5)


def evaluator_command(
    cfg: LoopConfig, out: Path, candidate: Path, serving: Path | None, held_out: Path | None, probe_cache: Path
) -> list[str]:
    """The evaluator's command line for a round: the candidate (and the serving version) on the held-out pairs, with
    implicit accuracy measured in the space the round trains in (`--space`: a gate that scored an NCP candidate by
    latent errors judged it by a loss it was never trained on), and the judge's probes in the shapes world."""
    cmd = [*cfg.evaluator, "--model", cfg.model, "--out", str(out), "--threads", str(cfg.threads),
           "--version", f"candidate={candidate}", "--space", cfg.space, "--timestep-low", str(cfg.timestep_low),
           "--max-pairs", str(cfg.eval_max_pairs)]  # fmt: skip
    if serving is not None:
        cmd += ["--version", f"serving={serving}"]
    if cfg.coin_flip_labels:
        cmd += ["--coin-flip-labels"]
    if held_out is not None:
        cmd += ["--data", str(held_out)]
    if cfg.shapes_probes:
        cmd += ["--shapes-probes", str(cfg.shapes_probes), "--probe-seeds", str(cfg.probe_seeds)]
        cmd += ["--steps", str(cfg.probe_steps), "--guidance", str(cfg.probe_guidance)]
        cmd += ["--probe-cache", str(probe_cache)]
    return cmd
