"""The prefetch queue: ready pairs made ahead of the raters by one background thread, so no rater waits for diffusion.

    prefetcher = PairPrefetcher(service, pool.draw, battle_versions, size=8)
    prefetcher.start(); pair = prefetcher.get()

A training round that cannot share the card with generation (jobs/gpu_plan.py, "exclusive") pauses it: `pause()`
lets the pair in flight finish and then makes nothing until `resume()`; `get()` keeps handing out queued pairs and,
once they run out, raises `GenerationPaused` instead of generating (the card belongs to the round). `resize()` grows
the queue to cover a round (jobs/gpu_round.py sizes it from the round's expected length and the raters' pace).

The queue is flushed on a hot-swap so raters see the new version at once; `flush(bridge=True)` keeps the old
version's pairs as a bridge, handed out only while no pair of the new version is ready (after a paused round the
first fresh pair is a model reload and a pair's diffusion away). Pairs keep their recorded lineage either way.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence

import torch

from ncp.serving import GenerationPaused, GenerationService, PairKind, PairMix, ReadyPair

logger = logging.getLogger(__name__)


class PairPrefetcher:
    """Keeps up to `size` ready pairs; one background thread; pausable for a training round."""

    def __init__(
        self,
        service: GenerationService,
        next_prompt: Callable[[random.Random], str],
        battle_versions: Callable[[], Sequence[str]],
        mix: PairMix | None = None,
        size: int = 8,
        seed: int = 0,
        prepare: Callable[[ReadyPair], ReadyPair] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"the prefetch queue holds at least 1 pair, got size={size}.")
        self.service = service
        # Runs in the prefetch thread on every pair before it is queued (the arena stores images and rows there, so
        # a rater's request only issues the pair).
        self.prepare = prepare
        self.next_prompt = next_prompt
        self.battle_versions = battle_versions
        self.mix = mix or PairMix()
        self.size = size
        self._queue: queue.Queue[ReadyPair] = queue.Queue(maxsize=size)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._producing = threading.Lock()  # held by the thread around each pair it makes
        self._bridge: list[ReadyPair] = []  # pairs of the previous version, served until fresh ones are ready
        self._bridge_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.made = 0  # pairs queued since start
        self.waited = 0  # requests that found no ready pair (they waited for one, or got GenerationPaused)
        self.dry_while_paused = 0  # of those, while generation was paused

    def _choose_kind(self) -> PairKind:
        m = self.mix
        return self._rng.choices(["on_policy", "cross_version", "control"], [m.on_policy, m.cross_version, m.control])[
            0
        ]

    def produce_one(self, prompt: str | None = None) -> ReadyPair:
        with self._rng_lock:
            kind = self._choose_kind()
            prompt = prompt or self.next_prompt(self._rng)
            rng = random.Random(self._rng.randrange(2**63))
        return self.service.make_pair(prompt, kind, rng, list(self.battle_versions()))

    def _run(self) -> None:
        torch.set_num_threads(1)
        while not self._stop.is_set():
            if self._queue.full():
                with self._bridge_lock:
                    self._bridge.clear()  # the new version's pairs are all ready: the bridge is no longer needed
            if self._paused.is_set() or self._queue.full():
                self._stop.wait(0.05)
                continue
            with self._producing:
                if self._paused.is_set():
                    continue
                try:
                    pair = self.produce_one()
                except Exception:  # keep serving: a failed generation must not kill the prefetch thread
                    self.errors += 1
                    logger.exception("prefetch generation failed")
                    self._stop.wait(1.0)
                    continue
            if pair.epoch != self.service.epoch:
                continue  # made before a hot-swap: raters should see the new version
            if self.prepare is not None:
                try:
                    pair = self.prepare(pair)
                except Exception:  # the request path stores it instead
                    logger.exception("preparing a prefetched pair failed")
            try:
                self._queue.put(pair, timeout=1.0)
                self.made += 1
            except queue.Full:
                continue

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()  # startable again after stop()
            self._thread = threading.Thread(target=self._run, name="pair-prefetch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def pause(self) -> None:
        """Make no more pairs until `resume()`; returns once the pair in flight (if any) is finished."""
        self._paused.set()
        with self._producing:
            pass

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def resize(self, size: int) -> None:
        """Hold up to `size` ready pairs from now on (a smaller size keeps the pairs already queued)."""
        if size < 1:
            raise ValueError(f"the prefetch queue holds at least 1 pair, got size={size}.")
        with self._queue.mutex:
            self._queue.maxsize = size
            self._queue.not_full.notify_all()
        self.size = size

    # -- taking pairs ---------------------------------------------------------------------------------------------
    def _fresh_nowait(self) -> ReadyPair | None:
        """A queued pair of the current version (older ones are dropped on the way), or None."""
        while True:
            try:
                pair = self._queue.get_nowait()
            except queue.Empty:
                return None
            if pair.epoch == self.service.epoch:
                return pair

    def _bridge_pair(self) -> ReadyPair | None:
        with self._bridge_lock:
            return self._bridge.pop(0) if self._bridge else None

    def get(self, timeout: float = 30.0) -> ReadyPair:
        """A ready pair. When none is queued: a bridge pair if a swap left some; while paused, GenerationPaused (never
        generates: the card is the round's); else waits for the prefetch thread's next pair (one generator: request
        threads generating side by side would only queue on the pipeline lock and slow every request through the
        GIL), and generates synchronously if the thread is not running or nothing arrives within `timeout` s."""
        pair = self._fresh_nowait() or self._bridge_pair()
        if pair is not None:
            return pair
        self.waited += 1
        if self._paused.is_set():
            self.dry_while_paused += 1
            raise GenerationPaused("generation is paused for a training round and the prefetched pairs ran out")
        if self._thread is None or not self._thread.is_alive():
            timeout = 0.0
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                pair = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                if self._paused.is_set():
                    self.dry_while_paused += 1
                    raise GenerationPaused(
                        "generation paused for a training round while this request waited"
                    ) from None
                return self.produce_one()
            if pair.epoch == self.service.epoch:
                return pair

    def try_get(self, timeout: float) -> ReadyPair | None:
        """A ready pair of the current version (or a bridge pair) if one is queued or arrives within `timeout` s;
        None otherwise (never generates: the caller decides what a rater gets instead of waiting)."""
        pair = self._fresh_nowait() or self._bridge_pair()
        if pair is not None:
            return pair
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                pair = self._queue.get(timeout=left)
            except queue.Empty:
                return None
            if pair.epoch == self.service.epoch:
                return pair

    def flush(self, bridge: bool = False) -> int:
        """Drop the queued pairs (after a hot-swap); `bridge`: keep them to hand out until fresh pairs are ready."""
        old = []
        while True:
            try:
                old.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if bridge:
            with self._bridge_lock:
                self._bridge = [*self._bridge, *old][-max(1, self.size) :]
        return len(old)

    def qsize(self) -> int:
        return self._queue.qsize()

    def bridge_size(self) -> int:
        with self._bridge_lock:
            return len(self._bridge)
