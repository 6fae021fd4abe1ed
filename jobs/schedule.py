"""The scheduled alignment job: APScheduler's BackgroundScheduler inside the app process.

`max_instances=1` and `coalesce=True`: a round longer than the interval never overlaps the next one, and missed ticks
are skipped (STACK_NOTES). `run_now()` moves the next run to now (the admin tab's "run a round now").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from jobs.loop import AlignmentLoop

logger = logging.getLogger(__name__)
JOB_ID = "alignment-round"


class _SkipsWhileRunning(logging.Filter):
    """Drops APScheduler's warning that a tick found the job still running: the schedule looks for new votes every
    15 s and a round takes minutes, so every tick during a round would warn about the design working as meant."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in str(record.msg)


logging.getLogger("apscheduler.scheduler").addFilter(_SkipsWhileRunning())


class LoopScheduler:
    def __init__(self, loop: AlignmentLoop, every_s: float, after_round: Callable[[], object] | None = None) -> None:
        self.loop = loop
        self.every_s = every_s
        self.after_round = after_round  # after every tick, round or not (the GPU plan resumes generation here)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self._force = False
        self.scheduler.add_job(
            self._job, "interval", seconds=every_s, id=JOB_ID, max_instances=1, coalesce=True, misfire_grace_time=None
        )

    def _job(self) -> None:
        force, self._force = self._force, False
        try:
            result = self.loop.run_round(trigger="admin") if force else self.loop.tick()
        finally:
            if self.after_round is not None:
                self.after_round()
        logger.info("alignment round: %s (%s)", result.status, result.reason)

    def add_periodic(self, job_id: str, fn, every_s: float) -> None:  # noqa: ANN001 - any callable
        """Another job on the same scheduler (e.g. the hub push); never overlapping itself, missed ticks skipped."""
        self.scheduler.add_job(
            fn, "interval", seconds=every_s, id=job_id, max_instances=1, coalesce=True, misfire_grace_time=None
        )

    def start(self) -> None:
        self.scheduler.start()

    @property
    def paused(self) -> bool:
        job = self.scheduler.get_job(JOB_ID)
        return job is None or job.next_run_time is None

    def pause(self) -> None:
        self.scheduler.pause_job(JOB_ID)

    def resume(self) -> None:
        self.scheduler.resume_job(JOB_ID)

    def run_now(self) -> None:
        """Run one round as soon as possible, even with fewer new votes than the threshold (and even if paused)."""
        self._force = True
        self.scheduler.modify_job(JOB_ID, next_run_time=datetime.now(UTC))

    def next_run(self) -> datetime | None:
        job = self.scheduler.get_job(JOB_ID)
        return None if job is None else job.next_run_time

    def shutdown(self) -> None:
        self.loop.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
