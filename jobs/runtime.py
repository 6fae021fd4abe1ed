"""Everything the live app runs, built from one `ArenaConfig`: store, registry, generation, arena, loop, schedule.

app.py's `main()` maps environment variables onto `ArenaConfig` and calls `Runtime.create(config)`; tests build a
Runtime directly with a temporary data dir. Admin actions live here too, each checking credentials server-side.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import logging
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

from feedback_store import FeedbackStore, pseudonymize
from feedback_store.export import export_snapshot
from jobs.abuse import AbuseConfig, VoteGuard
from jobs.arena import ArenaService
from jobs.gpu_plan import app_plan
from jobs.gpu_round import RoundPause
from jobs.hub_push import HubPushConfig, HubPusher
from jobs.loop import AlignmentLoop
from jobs.loop_config import LoopConfig
from jobs.prompts import Blocklist, PoolPrompt, PromptPool, load_pool
from jobs.registry import BASE, AdapterRegistry
from jobs.schedule import LoopScheduler
from ncp.adapters import LoraSettings
from ncp.generation_worker import GenerationWorker, load_serving_pipeline
from ncp.serving import GenerationService, PairMix, SamplingConfig

logger = logging.getLogger(__name__)
SHAPES_MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes-base"
SHAPES_CEILING = Path(__file__).resolve().parents[1] / "models" / "shapes-ceiling"  # clean captions: the gap's top
_SHAPES_TOKENIZER = Path("tokenizer") / "tokenizer.json"


@functools.lru_cache(maxsize=32)  # the probe gallery asks on every view; a served model's folder does not change
def is_shapes_model(model: str) -> bool:
    """A shapes-world model: the embedded one, or a local pipeline folder with its tokenizer (every model that
    `ncp.shapes.pretrain` writes, a detuned base included). Its prompts follow the grammar, so it gets the grammar's
    prompt pool, the judge-gated loop and the world's sampling settings; a folder's name says nothing either way."""
    path = Path(model)
    if path.resolve() == SHAPES_MODEL.resolve():
        return True
    mine, ours = path / _SHAPES_TOKENIZER, SHAPES_MODEL / _SHAPES_TOKENIZER
    return mine.is_file() and ours.is_file() and mine.read_bytes() == ours.read_bytes()


class AdminDenied(PermissionError):
    """An admin action without valid credentials."""


@dataclass(frozen=True)
class ArenaConfig:
    data_dir: Path = Path("data")
    model: str = str(SHAPES_MODEL)  # a diffusers folder or hub id (SDXL / SD1.5); default: the embedded shapes model
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    mix: PairMix = field(default_factory=PairMix)
    loop: LoopConfig = field(default_factory=LoopConfig)
    schedule: bool = True  # run the alignment loop on a timer
    prefetch: int = 8
    ratings_per_pair: int = 3  # a pool pair is shown to up to this many sessions (consensus; serves a crowd at once)
    # When raters outpace the generator: wait this long for a fresh pair, then show a pair once more beyond
    # ratings_per_pair rather than make a rater wait (jobs/arena.py). None: never, ratings_per_pair is strict.
    overflow_wait_s: float | None = 0.05
    admin_token: str | None = None
    admin_users: tuple[str, ...] = ()  # HF OAuth usernames allowed to administer
    rater_salt: str = "ncp-arena-default-salt"  # set a secret in production: pseudonyms are HMACs of it
    pair_ttl_s: int = 3600
    seed: int = 0
    # Abuse defences of the vote path (rate limits, caps, too-fast flags, trust, anomaly review; jobs/abuse.py).
    # None: off, for in-process tests and simulations; app.py's entry point turns them on (NCP_ABUSE_DEFENCES).
    abuse: AbuseConfig | None = None
    hub_push: HubPushConfig | None = None  # periodic push of the export to a HF dataset repo (jobs/hub_push.py)
    # Generate in a child process (ncp/generation_worker.py), off the HTTP handlers' GIL; app.py's entry point turns
    # it on (NCP_GENERATION_WORKER). Off: the pipeline runs in this process (in-process tests pass their own pipe).
    generation_worker: bool = False
    generation_nice: int = 10  # the worker's niceness (0-19): under contention HTTP handlers get the CPU first
    device: str = "auto"  # where the arena's pipeline runs: "auto" (CUDA when available), "cpu", "cuda", "cuda:1"
    # The GPU memory plan (jobs/gpu_plan.py): "auto" decides from the card whether a round trains beside generation
    # ("shared") or alone with generation paused ("exclusive"), and with which trainer memory options.
    gpu_plan: str = "auto"

    @property
    def is_shapes(self) -> bool:
        return is_shapes_model(self.model)


def base_model_id(model: str) -> str:
    """The base model id every image's lineage records (and the probe gallery's cache is keyed by): "shapes-base" for
    the embedded model, wherever the checkout lies; any other model, another shapes base included, as configured, so
    images of two bases never share an id."""
    return "shapes-base" if Path(model).resolve() == SHAPES_MODEL.resolve() else model


# Share of two-object scenes among the raters' prompts: the pretraining data's and the probe set's (evaluate.py) mix.
# Drawn uniformly over the two categories instead, half the votes came from two-object scenes, whose errors (position,
# count) no trainer moves, and the loop's pairs trained less than the same number on this mix (measured on the
# retired 32-px model's live loop; not rerun since).
SHAPES_TWO_OBJECT_SHARE = 0.3


def shapes_pool(n: int = 2000, seed: int = 1) -> PromptPool:
    """Held-in shapes prompts for raters, excluding the gate's and the test probe prompts (prompt-disjoint probes);
    about 1,000 distinct single-object and 1,000 two-object prompts, drawn at SHAPES_TWO_OBJECT_SHARE."""
    from ncp.evaluate import gate_probe_prompts, test_probe_prompts
    from ncp.shapes.grammar import probe_prompts

    probes = set(gate_probe_prompts(256)) | set(test_probe_prompts())
    one = [p for p in dict.fromkeys(probe_prompts(n, seed=seed)) if p not in probes]
    two = [p for p in dict.fromkeys(probe_prompts(n // 2, seed=seed + 1, two_object_prob=1.0)) if p not in probes]
    prompts = [PoolPrompt(p, "one object") for p in one] + [PoolPrompt(p, "two objects") for p in two]
    return PromptPool(
        prompts, weights={"one object": 1 - SHAPES_TWO_OBJECT_SHARE, "two objects": SHAPES_TWO_OBJECT_SHARE}
    )


class Runtime:
    def __init__(self, config: ArenaConfig, pipe=None) -> None:
        self.config = config
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.store = FeedbackStore(data / "arena.duckdb")
        self.registry = AdapterRegistry(data / "adapters", keep=config.loop.keep_versions)
        base_model = base_model_id(config.model)
        if pipe is None and config.generation_worker:
            self.generation = GenerationWorker(
                config.model,
                base_model,
                config.sampling,
                lora_rank=config.loop.lora_rank,
                device=config.device,
                nice=config.generation_nice,
            )
        else:
            if pipe is None:
                pipe = load_serving_pipeline(config.model, config.device)
            pipe.set_progress_bar_config(disable=True)
            self.generation = GenerationService(pipe, base_model, config.sampling, lora_rank=config.loop.lora_rank)
        model_check = None
        if config.is_shapes:
            from ncp.shapes.grammar import parse

            model_check, pool = parse, shapes_pool(seed=config.seed + 1)
        else:
            pool = PromptPool(load_pool())
        self.blocklist = Blocklist(data / "blocklist.txt")
        self.arena = ArenaService(
            self.store,
            self.generation,
            self.registry,
            data,
            pool,
            self.blocklist,
            model_check=model_check,
            prefetch_size=config.prefetch,
            pair_ttl_s=config.pair_ttl_s,
            seed=config.seed,
            ratings_per_pair=config.ratings_per_pair,
            overflow_wait_s=config.overflow_wait_s,
        )
        self.arena.prefetcher.mix = config.mix
        self.arena.guard = VoteGuard(self.store, config.abuse) if config.abuse is not None else None
        review = self.arena.guard.review if self.arena.guard is not None else None
        s, lc = config.sampling, config.loop
        plan, train_args = app_plan(
            config.model, self.generation.card_info(), width=s.width, height=s.height, space=lc.space,
            batch_size=lc.batch_size, lora_rank=lc.lora_rank, requested=config.gpu_plan,  # type: ignore[arg-type]
        )  # fmt: skip
        logger.info("GPU plan: %s; rounds train with %s", plan.summary(), " ".join(train_args) or "the defaults")
        self.gpu = RoundPause(
            plan,
            self.arena.prefetcher,
            self.generation,
            pace=self.arena.pace_per_s,
            ratings_per_pair=config.ratings_per_pair,
            base_size=config.prefetch,
            expected_round_s=lc.time_limit_s + lc.eval_time_limit_s,
        )

        def before_round() -> None:
            if review is not None:
                review()
            self.gpu.before_round()

        self.loop = AlignmentLoop(
            self.store,
            self.registry,
            data,
            dataclasses.replace(lc, extra_train_args=(*train_args, *lc.extra_train_args)),
            on_promote=lambda _v: self.serve_current(),
            before_export=before_round,
        )
        self.scheduler = LoopScheduler(self.loop, lc.train_every_s, after_round=self.gpu.after_round)
        self.hub = (
            HubPusher(self.store, data, config.hub_push, config.loop.eval_fraction)
            if config.hub_push is not None
            else None
        )
        if self.hub is not None:
            self.scheduler.add_periodic("hub-push", self.hub.push, config.hub_push.every_s)
        self._swap_lock = threading.RLock()

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        # Both adapter slots exist from the start (zero LoRAs), so the first hot-swap is as quick as every later one.
        self.generation.warm_slots(LoraSettings().target_modules, self.config.loop.lora_alpha)
        self.arena.start()
        self.gpu.resize()
        self.scheduler.start()
        if not self.config.schedule:
            self.scheduler.pause()

    def stop(self) -> None:
        self.scheduler.shutdown()
        self.arena.stop()
        if self.arena.guard is not None:
            self.arena.guard.join(timeout=30)  # a rater review in progress finishes before the store closes
        self.generation.close()
        self.store.close()

    # -- serving ------------------------------------------------------------------------------------------------------
    def serve(self, version: str) -> float:
        """Hot-swap `version` into the live pipeline and drop prefetched pairs of the old one."""
        with self._swap_lock:
            if version != BASE:
                self.generation.register_version(version, self.registry.info(version).folder)
            seconds = self.generation.swap_adapter(version)
            # After a paused round the old pairs bridge the raters until the new version's pairs are ready.
            self.arena.prefetcher.flush(bridge=self.gpu.plan.pauses_generation)
            return seconds

    def serve_current(self) -> float:
        """Serve the registry's pointer, read under the swap lock: whatever order a round's promotion and an admin's
        promote or rollback interleave in, the served version ends equal to the pointer."""
        with self._swap_lock:
            return self.serve(self.registry.current())

    def rater_id(self, raw: str) -> str:
        return pseudonymize(raw, self.config.rater_salt)

    # -- admin (credentials checked here, server-side, for every action) ----------------------------------------------
    def check_admin(self, token: str | None = None, username: str | None = None) -> None:
        ok_token = (
            bool(self.config.admin_token)
            and bool(token)
            and hmac.compare_digest(str(token), str(self.config.admin_token))
        )
        ok_user = bool(username) and username in self.config.admin_users
        if not (ok_token or ok_user):
            raise AdminDenied("Admin credentials are missing or wrong: sign in as an admin or give the admin token.")

    def admin_run_round(self, token: str | None = None, username: str | None = None) -> str:
        self.check_admin(token, username)
        self.scheduler.run_now()
        return "A training round will start now."

    def admin_pause(self, paused: bool, token: str | None = None, username: str | None = None) -> str:
        self.check_admin(token, username)
        (self.scheduler.pause if paused else self.scheduler.resume)()
        return "Schedule paused." if paused else "Schedule resumed."

    def admin_promote(self, version: str, token: str | None = None, username: str | None = None) -> str:
        """Promote or roll back to any kept version (or "base"): a registry pointer change plus a hot-swap."""
        self.check_admin(token, username)
        if version != BASE and version not in self.registry.versions():
            raise ValueError(f"Unknown version {version!r}; kept versions: {', '.join(self.registry.versions())}.")
        with self._swap_lock:  # pointer and served version change together (see serve_current)
            previous = self.registry.current()
            self.registry.set_current(version, reason=f"admin: {previous} -> {version}")
            self.serve(version)
        if previous != BASE:
            self.store.set_adapter_status(previous, "rolled_back")
        return f"Now serving {version} (was {previous})."

    def admin_set_blocklist(self, text: str, token: str | None = None, username: str | None = None) -> str:
        self.check_admin(token, username)
        self.blocklist.write(text)
        return f"Blocklist saved: {len(self.blocklist.terms())} terms."

    def export_now(self) -> Path:
        """A snapshot with the loop's held-out split (the prompts its gate scores candidates on)."""
        fraction = self.config.loop.eval_fraction
        return export_snapshot(self.store, Path(self.config.data_dir) / "snapshots", eval_fraction=fraction).path


__all__ = ["AdminDenied", "ArenaConfig", "Runtime", "random"]
