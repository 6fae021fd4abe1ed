"""Read-side helpers for the UI: plain data (dicts, lists, paths) built from the runtime's services.

The UI's handlers call these so that they hold no SQL, no tensors and no statistics: the fixed-seed probe gallery
(cached per version on disk), the latest export as a zip, admin-only reads, the server-side clock that times API votes,
the handlers' own timings, and a rater's own counts (the Progress tab's data is in jobs.progress).

Nothing here imports gradio (DESIGN.md import rules); run the app (`python app.py`) to see these in use.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
import shutil
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from feedback_store.records import MAX_TIME_TO_VOTE_MS, check_ident
from jobs.abuse import client_address
from jobs.progress import MIN_LEADERBOARD_VOTES, leaderboard_rows, round_status  # noqa: F401 (re-exported)
from jobs.registry import BASE

if TYPE_CHECKING:
    from jobs.runtime import Runtime

logger = logging.getLogger(__name__)

PROBE_COUNT = 8  # prompts in the probe gallery
PROBE_SEED = 1234  # one fixed seed for every probe image, so versions differ only by their weights
_probe_lock = threading.Lock()
_export_lock = threading.Lock()


def check_session(session_id: object) -> str:
    """An API caller's session id: the store's identifier rule ([A-Za-z0-9_-]{1,128}); raises InputRejected."""
    return check_ident(session_id, "session_id", code="invalid_session")


class PairClock:
    """When each pair token was issued (monotonic), so the server measures time-to-vote for API callers.

    Bounded (oldest entries dropped first); tokens are kept only as sha256 keys. A token unknown here (issued before
    a restart, or evicted) gives None, which the store accepts."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._issued: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def issued(self, token: str) -> None:
        with self._lock:
            self._issued[token_key(token)] = time.monotonic()
            while len(self._issued) > self.max_entries:
                self._issued.popitem(last=False)

    def elapsed_ms(self, token: object) -> int | None:
        if not isinstance(token, str):
            return None
        with self._lock:
            start = self._issued.get(token_key(token))
        return None if start is None else elapsed_ms(start)


class HandlerTimes:
    """Wall time spent inside the app's handlers, per endpoint, over the last `window` calls: the server's share of a
    request's round trip (the rest is Gradio's queue, the event stream and the network). Shown by the admin
    "status" action; bench/serving.py reports it beside the client-side latencies."""

    def __init__(self, window: int = 2000) -> None:
        self.window = window
        self._ms: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def record(self, endpoint: str, ms: float) -> None:
        with self._lock:
            self._ms.setdefault(endpoint, deque(maxlen=self.window)).append(float(ms))

    def summary(self) -> dict[str, dict[str, float]]:
        with self._lock:
            samples = {k: sorted(v) for k, v in self._ms.items()}
        return {
            k: {"n": len(v), "p50": _pct(v, 0.50), "p99": _pct(v, 0.99), "max": v[-1]} for k, v in samples.items() if v
        }


def _pct(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 2)


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def elapsed_ms(start_monotonic: float) -> int:
    """Milliseconds since `start_monotonic`, clamped to what the store accepts."""
    return max(0, min(MAX_TIME_TO_VOTE_MS, int(1000 * (time.monotonic() - start_monotonic))))


# -- probe gallery --------------------------------------------------------------------------------------------------
def gallery_versions(runtime: Runtime) -> list[str]:
    """Versions the probe gallery can show, oldest first: base and every kept, intact version."""
    return [BASE, *[v for v in runtime.registry.versions() if runtime.registry.verify(v)]]


def probe_prompts(runtime: Runtime, n: int = PROBE_COUNT) -> list[str]:
    """Fixed prompts: the evaluator's shapes probes for a shapes-world model, else the first of each pool category."""
    if runtime.config.is_shapes:
        from ncp.evaluate import PROBE_SEED as SHAPES_PROBE_SEED
        from ncp.shapes.grammar import probe_prompts as shapes_probes

        return shapes_probes(n, seed=SHAPES_PROBE_SEED, two_object_prob=0.3)
    by_cat = runtime.arena.pool.by_category
    firsts = [by_cat[c][0] for c in sorted(by_cat)]
    seconds = [p for c in sorted(by_cat) for p in by_cat[c][1:2]]
    return (firsts + seconds)[:n]


def probe_gallery(runtime: Runtime, version: str) -> list[tuple[str, str]]:
    """[(image path, prompt)] of the probe prompts made by `version` with one fixed seed; generated once per version
    (cached under <data_dir>/probes/<version>/, keyed by the weights' sha256) and then read from disk."""
    if version != BASE and version not in runtime.registry.versions():
        raise ValueError(f"Unknown version {version!r}; kept versions: {', '.join(gallery_versions(runtime))}.")
    prompts = probe_prompts(runtime)
    weights = "" if version == BASE else runtime.registry.info(version).weights_sha256
    folder = Path(runtime.config.data_dir) / "probes" / version
    key = {"prompts": prompts, "seed": PROBE_SEED, "weights": weights, "model": runtime.generation.base_model}
    key["sampling"] = [runtime.generation.sampling.steps, runtime.generation.sampling.guidance]
    index = folder / "index.json"
    with _probe_lock:
        if not (index.exists() and json.loads(index.read_text()) == key):
            if version != BASE:
                runtime.generation.register_version(version, runtime.registry.info(version).folder)
            tmp = folder.with_name(f".{version}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for i, prompt in enumerate(prompts):
                img = runtime.generation.generate(prompt, [PROBE_SEED], version=version)[0]
                (tmp / f"{i:02d}.png").write_bytes(img.png)
            (tmp / "index.json").write_text(json.dumps(key))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.replace(folder)
            logger.info("probe gallery generated for %s", version)
    return [(str(folder / f"{i:02d}.png"), p) for i, p in enumerate(prompts)]


# -- data -----------------------------------------------------------------------------------------------------------
EXPORT_MIN_INTERVAL_S = 10.0  # a new snapshot at most this often (each is a full copy of the votes and images)
KEEP_EXPORT_ZIPS = 3


@dataclass(frozen=True)
class ExportInfo:
    """The newest snapshot as a download: what the Data tab and /export say about it."""

    snapshot_id: str
    created: str  # ISO 8601, UTC ("Z")
    rows: dict[str, int]  # train, eval, total
    newer_votes: int  # votes stored after the snapshot's last vote id, so not in it (0: it is up to date)
    zip_path: Path
    manifest: dict

    def summary(self) -> str:
        rows = self.rows
        text = (
            f"Snapshot {self.snapshot_id}, taken {self.created.replace('T', ' ')[:19]} UTC: "
            f"{rows.get('total', 0)} rows ({rows.get('train', 0)} train + {rows.get('eval', 0)} eval)."
        )
        if self.newer_votes:
            every = f"a new snapshot at most every {EXPORT_MIN_INTERVAL_S:.0f} s"
            text += f" {self.newer_votes} newer vote(s) are not in it yet ({every})."
        return text


def latest_export(runtime: Runtime, min_interval_s: float = EXPORT_MIN_INTERVAL_S) -> ExportInfo:
    """The newest Parquet snapshot as a zip, taken now when votes arrived since the newest one and that one is older
    than `min_interval_s` (a public button must not let anyone fill the disk: each snapshot is a full copy). Only the
    newest KEEP_EXPORT_ZIPS zips are kept. The answer says how many newer votes the snapshot lacks."""
    with _export_lock:
        snaps = runtime.store.snapshots()
        latest = snaps[-1] if snaps else None
        now = datetime.now(UTC).replace(tzinfo=None)
        newer = 0 if latest is None else runtime.store.votes_after(latest.vote_id_max)
        if latest is None or (newer and (now - latest.created).total_seconds() >= min_interval_s):
            runtime.export_now()
            latest = runtime.store.snapshots()[-1]
            newer = runtime.store.votes_after(latest.vote_id_max)
        folder = Path(latest.path)
        out_dir = export_dir(runtime)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"ncp-arena-{folder.name}.zip"
        if not target.exists():
            base = str(out_dir / f".{folder.name}.tmp")
            tmp = shutil.make_archive(base, "zip", root_dir=folder.parent, base_dir=folder.name)
            Path(tmp).replace(target)
        for old in sorted(out_dir.glob("ncp-arena-*.zip"), key=lambda f: f.stat().st_mtime)[:-KEEP_EXPORT_ZIPS]:
            if old != target:
                old.unlink(missing_ok=True)
        manifest = json.loads((folder / "manifest.json").read_text())
        return ExportInfo(
            latest.snapshot_id, latest.created.isoformat() + "Z", dict(manifest["rows"]), newer, target, manifest
        )


class RateLimited(PermissionError):
    """Too many requests from one client address; `retry_after_s` says when the next one is taken."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AddressLimiter:
    """At most `limit` events per client address in a sliding `window_s` (bounded memory: the least recently seen
    addresses are forgotten past `max_addresses`). `clock` is injectable for tests."""

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic, max_addresses: int = 10_000
    ) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError(f"limit must be >= 1 and window_s > 0, got {limit}, {window_s}")
        self.limit, self.window_s, self.clock, self.max_addresses = limit, window_s, clock, max_addresses
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float:
        """0 when `address` may act now, else the seconds until its oldest event in the window ages out."""
        now = self.clock()
        with self._lock:
            events = self._events.get(address)
            while events and now - events[0] >= self.window_s:
                events.popleft()
            return 0.0 if not events or len(events) < self.limit else events[0] + self.window_s - now

    def add(self, address: str) -> None:
        with self._lock:
            self._events.setdefault(address, deque(maxlen=self.limit)).append(self.clock())
            self._events.move_to_end(address)
            while len(self._events) > self.max_addresses:
                self._events.popitem(last=False)


def request_address(runtime: Runtime, peer: str | None, forwarded_for: str | None) -> str:
    """The client address for per-address limits on admin and export calls (jobs.abuse.client_address, with the
    vote guard's trusted proxy hops when it has them)."""
    guard = runtime.arena.guard
    return client_address(peer, forwarded_for, guard.config.trusted_proxy_hops if guard is not None else 0)


def export_dir(runtime: Runtime) -> Path:
    return Path(runtime.config.data_dir) / "exports"


def image_dir(runtime: Runtime) -> Path:
    return runtime.arena.image_dir


# -- admin-only reads -----------------------------------------------------------------------------------------------
def read_blocklist(runtime: Runtime, token: str | None = None, username: str | None = None) -> str:
    """The blocklist file's text, for admins only (raises AdminDenied)."""
    runtime.check_admin(token, username)
    path = runtime.blocklist.path
    return path.read_text(encoding="utf-8") if path.exists() else ""


class UnknownAction(LookupError):
    """An /admin action name that does not exist."""


class InvalidValue(ValueError):
    """An /admin value of the wrong type or form."""


ADMIN_ACTIONS = ("status", "run_round", "pause", "resume", "promote", "set_blocklist", "read_blocklist")
ADMIN_FAILURES_PER_MINUTE = 5  # wrong credentials from one address; then every attempt from it waits


def check_admin(
    runtime: Runtime,
    token: object,
    username: str | None,
    address: str | None = None,
    limiter: AddressLimiter | None = None,
) -> None:
    """Credentials for an admin action (Runtime.check_admin, constant-time), throttled per client address: after
    `limiter.limit` wrong tokens in its window every attempt from that address is refused (RateLimited) until the
    oldest failure ages out, the right token included, so guessing costs a minute per few tries."""
    if limiter is not None and address is not None:
        wait = limiter.retry_after(address)
        if wait > 0:
            raise RateLimited(
                f"Too many failed admin attempts from your address; try again in {math.ceil(wait)} s.", wait
            )
    try:
        runtime.check_admin(token if isinstance(token, str) else None, username)
    except PermissionError:
        if limiter is not None and address is not None and isinstance(token, str) and token:
            limiter.add(address)  # a wrong token is a guess; no token at all is not
        raise


def admin_action(
    runtime: Runtime,
    action: object,
    value: object,
    token: object,
    username: str | None,
    timings: HandlerTimes | None = None,
    *,
    address: str | None = None,
    limiter: AddressLimiter | None = None,
) -> str:
    """Run one admin action by name (the Admin tab and /admin); credentials are checked server-side first, for every
    action (`check_admin`: AdminDenied, or RateLimited per address). Then the action must be a known name
    (UnknownAction) and the value text (InvalidValue). Returns a message for the admin; "status" is JSON: the round in
    progress and, with `timings`, the handlers' server-side times (`handler_ms`)."""
    check_admin(runtime, token, username, address, limiter)
    if not isinstance(action, str) or action not in ADMIN_ACTIONS:
        raise UnknownAction(f"Unknown action {action!r:.60}; use one of {', '.join(ADMIN_ACTIONS)}.")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidValue(
            f"The value must be text (a version name, or the blocklist file's text), not {type(value).__name__}."
        )
    if action == "status":
        status = {k: v for k, v in round_status(runtime).items() if k != "last"}
        arena = runtime.arena
        status["pairs"] = {"queued": arena.prefetcher.qsize(), "overflow_showings": arena.overflow_issued,
                           "refused_while_paused": arena.paused_refusals}  # fmt: skip
        status["gpu"] = runtime.gpu.status()  # the GPU plan, its reasons and the last paused round
        if timings is not None:
            status["handler_ms"] = timings.summary()
        return json.dumps(status, default=str)
    if action == "run_round":
        return runtime.admin_run_round(token, username)  # type: ignore[arg-type]
    if action in ("pause", "resume"):
        return runtime.admin_pause(action == "pause", token, username)  # type: ignore[arg-type]
    if action == "promote":
        return runtime.admin_promote(value.strip(), token, username)  # type: ignore[arg-type]
    if action == "set_blocklist":
        return runtime.admin_set_blocklist(value, token, username)  # type: ignore[arg-type]
    return read_blocklist(runtime, token if isinstance(token, str) else None, username)  # "read_blocklist"


def vote_address(runtime: Runtime, peer: str | None, forwarded_for: str | None) -> str | None:
    """The client address the per-address vote limit counts (jobs.abuse.client_address), or None when that limit is
    off (no address is then even computed)."""
    guard = runtime.arena.guard
    if guard is None or not guard.config.address_votes_per_minute:
        return None
    return client_address(peer, forwarded_for, guard.config.trusted_proxy_hops)


# -- a rater's identity and own counts ----------------------------------------------------------------------------
def new_browser_id(secret: str) -> str:
    """A random id for a browser's storage, signed with the server's secret ("<random>.<signature>"), so a browser
    keeps one rater pseudonym across reloads and an id the server did not issue is refused."""
    raw = secrets.token_urlsafe(18)
    return f"{raw}.{_sign(raw, secret)}"


def check_browser_id(value: object, secret: str) -> str | None:
    """The random part of a signed browser id, or None for anything else (missing, edited, another server's)."""
    if not isinstance(value, str) or len(value) > 80 or value.count(".") != 1:
        return None
    raw, sig = value.split(".")
    return raw if raw and hmac.compare_digest(sig, _sign(raw, secret)) else None


def _sign(raw: str, secret: str) -> str:
    return hmac.new(secret.encode(), f"browser-id:{raw}".encode(), hashlib.sha256).hexdigest()[:24]


def rater_counts(runtime: Runtime, rater: str) -> dict[str, int]:
    """A rater's votes today (UTC) and attention checks seen and passed: the Arena's personal counter."""
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    controls, passed = runtime.store.rater_controls(rater)
    return {"today": runtime.store.rater_votes_since(rater, midnight), "controls": controls, "passed": passed}
