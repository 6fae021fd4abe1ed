"""The GPU plan applied around each training round (jobs/gpu_plan.py decides; this carries it out).

"shared": nothing to do; generation goes on while the round's subprocess trains beside it.
"exclusive": the round has the card alone. Between rounds the prefetch queue is kept at `queue_target()` pairs: the
round's expected length times the raters' pace, divided by the showings one pair gets (`ratings_per_pair`), plus a
quarter; so the queue that is ready when a round starts lasts it. At the round's start (`before_round`, called once
the round really runs) the queue is topped up for at most `fill_wait_s`, generation pauses (the pair in flight
finishes) and the serving weights leave the card; raters keep voting on queued pairs. After the round
(`after_round`) the weights come back, generation resumes and refills the queue; the round's measured length
updates the expected one. A promotion's hot-swap keeps the old queue as a bridge (ncp.prefetch) until fresh pairs
are ready.

    pause = RoundPause(plan, arena.prefetcher, generation, pace=arena.pace_per_s, ratings_per_pair=3, base_size=8,
                       expected_round_s=540.0)
    pause.before_round(); ...the round...; pause.after_round()
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

from jobs.gpu_plan import GpuPlan
from ncp.prefetch import PairPrefetcher

logger = logging.getLogger(__name__)

MAX_QUEUE = 256  # ready pairs held at most (images are on disk; a pair in memory is two decoded images)


class DeviceHolder(Protocol):
    def release_device(self) -> float: ...

    def restore_device(self) -> float: ...


class RoundPause:
    """Carries out a GpuPlan around rounds; `status()` is what the admin status and the Progress tab show."""

    def __init__(
        self,
        plan: GpuPlan,
        prefetcher: PairPrefetcher,
        generation: DeviceHolder,
        *,
        pace: Callable[[], float],
        ratings_per_pair: int,
        base_size: int,
        expected_round_s: float,
        fill_wait_s: float = 60.0,
        max_queue: int = MAX_QUEUE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if expected_round_s <= 0 or ratings_per_pair < 1 or base_size < 1 or max_queue < base_size:
            raise ValueError(
                "expected_round_s > 0, ratings_per_pair >= 1 and 1 <= base_size <= max_queue are needed, got "
                f"{expected_round_s}, {ratings_per_pair}, {base_size}, {max_queue}."
            )
        self.plan = plan
        self.prefetcher = prefetcher
        self.generation = generation
        self.pace = pace
        self.ratings_per_pair = ratings_per_pair
        self.base_size = base_size
        self.expected_round_s = expected_round_s
        self.fill_wait_s = fill_wait_s
        self.max_queue = max_queue
        self.clock = clock
        self._lock = threading.Lock()
        self._paused_at: float | None = None
        self._queued_at_start = 0
        self._dry_at_start = 0
        self.last: dict | None = None  # the last paused round: seconds, queue at start and end, requests left dry

    def queue_target(self) -> int:
        """Ready pairs that last one round at the raters' current pace (exclusive plans; else the base size)."""
        if not self.plan.pauses_generation:
            return self.base_size
        need = math.ceil(1.25 * self.pace() * self.expected_round_s / self.ratings_per_pair)
        return max(self.base_size, min(self.max_queue, need))

    def resize(self) -> int:
        """Set the prefetch queue to `queue_target()` (call between rounds, e.g. on each scheduler tick)."""
        target = self.queue_target()
        if target != self.prefetcher.size:
            self.prefetcher.resize(target)
        return target

    def before_round(self) -> None:
        """Exclusive: top up the queue (at most fill_wait_s), pause generation, move the weights off the card."""
        if not self.plan.pauses_generation:
            return
        with self._lock:
            if self._paused_at is not None:
                return
            target = self.resize()
            deadline = self.clock() + self.fill_wait_s
            while self.prefetcher.qsize() < target and self.clock() < deadline:
                time.sleep(0.05)
            self.prefetcher.pause()
            released = self.generation.release_device()
            self._paused_at = self.clock()
            self._queued_at_start = self.prefetcher.qsize()
            self._dry_at_start = self.prefetcher.dry_while_paused
        logger.info(
            "generation paused for the round: %d pairs queued (target %d), weights off the card in %.1f s",
            self._queued_at_start,
            target,
            released,
        )

    def after_round(self) -> None:
        """Bring the weights back and resume generation (the queue refills), if paused; then resize the queue to the
        raters' current pace (the scheduler calls this after every tick, rounds or not)."""
        with self._lock:
            if self._paused_at is None:
                self.resize()
                return
            restored = self.generation.restore_device()
            self.prefetcher.resume()
            seconds = self.clock() - self._paused_at
            self._paused_at = None
            # The next round is expected to last about as long as the recent ones.
            self.expected_round_s = max(1.0, 0.5 * self.expected_round_s + 0.5 * seconds)
            self.last = {
                "seconds": seconds,
                "queued_at_start": self._queued_at_start,
                "left_at_end": self.prefetcher.qsize() + self.prefetcher.bridge_size(),
                "refused_while_paused": self.prefetcher.dry_while_paused - self._dry_at_start,
                "restore_s": restored,
            }
        logger.info("generation resumed after %.0f s paused (%s)", seconds, self.last)
        self.resize()

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def status(self) -> dict:
        """Plain values for the admin status and the Progress tab."""
        return {
            "mode": self.plan.mode,
            "requested": self.plan.requested,
            "summary": self.plan.summary(),
            "reasons": list(self.plan.reasons),
            "train_args": list(self.plan.train_args()),
            "generation_paused": self.paused,
            "paused_for_s": None if self._paused_at is None else self.clock() - self._paused_at,
            "queue_target": self.queue_target(),
            "queued": self.prefetcher.qsize(),
            "expected_round_s": self.expected_round_s,
            "last_pause": self.last,
        }

    def line(self) -> str:
        """One line for the Progress tab's round status."""
        s = self.status()
        text = f"GPU plan: {s['summary']}"
        if s["generation_paused"]:
            text += f" · generation paused {s['paused_for_s']:.0f} s, {s['queued']} ready pairs left"
        elif self.plan.pauses_generation:
            text += f" · queue {s['queued']}/{s['queue_target']} pairs for a ~{s['expected_round_s']:.0f} s round"
        return text
