"""Load and crash parts of the reliability benchmark (bench/reliability.py runs them; see its docstring).

The real app server runs as a subprocess (`python app.py`, or bench/reliability_server.py for a smaller round) on a
fresh data dir with two LoRA versions published before the start. N simulated raters (threads, one gradio_client
each, judged by the shapes pixel judge) ask /next_pair and /vote as fast as they can, while an admin client promotes
the two versions in turn every `swap_every_s` seconds and runs one training round ("run_round"). The crash part
SIGKILLs the server's process group in the middle and restarts it on the same data dir; raters reconnect and retry
the vote they were sending (the same vote again returns the same vote_id). At the end the server is stopped and the
DuckDB file is read: every acknowledged vote must be stored exactly once, as acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import AppServer, free_port, publish_versions  # noqa: F401 - AppServer: bench/serving.py
from feedback_store import FeedbackStore
from jobs.registry import AdapterRegistry
from ncp.shapes.rater import SimulatedRater

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SESSION_PREFIX = "rel"


@dataclass(frozen=True)
class LoadSettings:
    """One load (or crash) run. Votes are per client; fractions are of all clients' votes together."""

    clients: int = 32
    votes: int = 300
    swap_every_s: float = 10.0  # admin "promote" of v0001 / v0002 in turn
    round_after: float = 0.25  # admin "run_round" once this share of the votes is acknowledged
    crash_after: float | None = None  # crash part: SIGKILL the server at this share of the votes (None: no crash)
    # Seconds a rater looks at a pair before voting: at machine speed the review's speed rule (median time to vote
    # under 1.5 s) shadow-excludes every bot and a round finds nothing to train on.
    pace_s: float = 1.6
    steps: int = 4  # NCP_STEPS: diffusion steps per arena image, so the generator keeps up with the raters
    ratings_per_pair: int = 4  # NCP_RATINGS_PER_PAIR
    prefetch: int = 8  # NCP_PREFETCH
    loop_overrides: dict = field(default_factory=dict)  # NCP_BENCH_LOOP (round size); empty: plain `python app.py`
    request_timeout_s: float = 120.0  # a request slower than this counts as failed
    ready_timeout_s: float = 300.0
    round_wait_s: float = 900.0  # after the load, wait up to this long for the round to finish (load part only)
    seed: int = 0


def server_env(s: LoadSettings, data_dir: Path, port: int, admin_token: str) -> dict[str, str]:
    """The app's environment: small images steps, defences on but limits too generous for bots, schedule off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCP_", "GRADIO_SERVER"))}
    env.update(
        NCP_DATA_DIR=str(data_dir),
        GRADIO_SERVER_PORT=str(port),
        GRADIO_SERVER_NAME="127.0.0.1",
        NCP_STEPS=str(s.steps),
        NCP_RATINGS_PER_PAIR=str(s.ratings_per_pair),
        NCP_PREFETCH=str(s.prefetch),
        NCP_ADMIN_TOKEN=admin_token,
        NCP_RATER_SALT=secrets.token_hex(16),
        NCP_SCHEDULE="0",  # rounds only when the benchmark asks (admin "run_round")
        NCP_MIN_NEW_VOTES="1",
        NCP_ABUSE_DEFENCES="1",
        NCP_MIN_VOTE_MS="0",  # bots vote at once: not flagged too_fast (they would still be stored)
        NCP_VOTES_PER_MINUTE="100000",
        NCP_VOTE_BURST="10000",
        NCP_DAILY_VOTE_CAP="1000000",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    if s.loop_overrides:
        env["NCP_BENCH_LOOP"] = json.dumps(s.loop_overrides)
    return env


# -- clients --------------------------------------------------------------------------------------------------------
@dataclass
class Log:
    """Every request a thread made: (endpoint, start epoch s, ms, error or None)."""

    requests: list[tuple[str, float, float, str | None]] = field(default_factory=list)
    acks: list[tuple[int, str, int, str, int]] = field(default_factory=list)  # vote_id, session, pair, outcome, tries
    versions: Counter = field(default_factory=Counter)
    gave_up: int = 0  # votes abandoned after too many failed tries (their ack may be lost)


def connect(url: str, stop: threading.Event, download: str | bool) -> object | None:
    """A gradio_client Client, retrying while the server is down (e.g. restarting after the crash)."""
    from gradio_client import Client

    while not stop.is_set():
        try:
            return Client(url, verbose=False, ssl_verify=False, download_files=download, analytics_enabled=False)
        except Exception:  # noqa: BLE001 - connection refused, a half-started server: try again
            time.sleep(0.5)
    return None


def call(client, log: Log, endpoint: str, args: tuple, timeout_s: float) -> tuple[dict | None, str | None]:
    """One API call, timed and logged. Returns (result, None), or (None, error) for an exception or a timeout."""
    t0, wall = time.perf_counter(), time.time()
    try:
        res = client.submit(*args, api_name=endpoint).result(timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - a failed request is a result here, not a crash of the benchmark
        log.requests.append((endpoint, wall, 1000 * (time.perf_counter() - t0), f"{type(err).__name__}: {err}"[:200]))
        return None, f"{type(err).__name__}"
    refusal = (
        f"refused {res.get('error')}: {res.get('message')}"[:200] if isinstance(res, dict) and "error" in res else None
    )
    log.requests.append((endpoint, wall, 1000 * (time.perf_counter() - t0), refusal))
    return res, refusal


def _image(value) -> Image.Image:
    return Image.open(value.get("path") if isinstance(value, dict) else value).convert("RGB")


def rater_thread(url: str, session: str, s: LoadSettings, rater: SimulatedRater, log: Log, stop: threading.Event):
    download = tempfile.mkdtemp(prefix=f"{session}-")
    client = None
    while len(log.acks) < s.votes and not stop.is_set():
        client = connect(url, stop, download) if client is None else client
        if client is None:
            return
        pair, err = call(client, log, "/next_pair", (session, ""), s.request_timeout_s)
        if pair is None or err:
            client = None if pair is None else client  # an exception: reconnect (the server may have restarted)
            time.sleep(0.2)
            continue
        outcome = rater.vote(pair["prompt"], _image(pair["left_image"]), _image(pair["right_image"]))
        time.sleep(s.pace_s)
        for tries in range(1, 61):  # the same vote again until acknowledged: a retry returns the same vote_id
            client = connect(url, stop, download) if client is None else client
            if client is None:
                return
            res, err = call(client, log, "/vote", (session, pair["token"], outcome, ""), s.request_timeout_s)
            if res is None:
                client = None
                time.sleep(0.5)
                continue
            if not err:
                log.acks.append((int(res["vote_id"]), session, int(pair["pair_id"]), outcome, tries))
                log.versions.update([res["left_version"], res["right_version"]])
            break
        else:
            log.gave_up += 1


class Admin:
    """The admin client: promotes v0001/v0002 in turn, runs a round, polls the status; every call is logged."""

    def __init__(self, url: str, token: str, s: LoadSettings, stop: threading.Event) -> None:
        self.url, self.token, self.s, self.stop = url, token, s, stop
        self.log = Log()
        self.lock = threading.Lock()  # held across the crash so no swap lands during the restart
        self.client = None
        self.status: list[dict] = []  # {t, state, serving} every 2 s
        self.swaps: list[dict] = []  # {t, version, ok, ms} per promote

    def action(self, action: str, value: str = "") -> dict | None:
        for _ in range(3):
            self.client = connect(self.url, self.stop, False) if self.client is None else self.client
            if self.client is None:
                return None
            res, _ = call(self.client, self.log, "/admin", (self.token, action, value), self.s.request_timeout_s)
            if res is not None:
                return res
            self.client = None
        return None

    def swapper(self, versions: list[str], t0: float) -> None:
        i = 0
        while not self.stop.wait(self.s.swap_every_s):
            with self.lock:
                t = time.perf_counter()
                res = self.action("promote", versions[i % len(versions)])
                ok = bool(res and res.get("ok"))
                self.swaps.append({"t": time.time() - t0, "version": versions[i % len(versions)], "ok": ok,
                                   "ms": 1000 * (time.perf_counter() - t)})  # fmt: skip
            i += 1

    def monitor(self, t0: float) -> None:
        while not self.stop.wait(2.0):
            with self.lock:
                res = self.action("status")
            if res and res.get("ok"):
                st = json.loads(res["message"])
                self.status.append({"t": time.time() - t0, "state": st["state"], "serving": st["serving"]})


# -- one run --------------------------------------------------------------------------------------------------------
def pct(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    p = np.percentile(xs, [50, 95, 99])
    return {"n": len(xs), "p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2]), "max": float(max(xs))}


def run(s: LoadSettings, work: Path | None = None) -> dict:
    """The load part (crash_after None) or the crash part; returns the result dict (see bench/reliability.py)."""
    data = Path(work or tempfile.mkdtemp(prefix="ncp-reliability-")) / "data"
    data.mkdir(parents=True, exist_ok=True)
    versions = publish_versions(data)
    token, port = secrets.token_urlsafe(24), free_port()
    server = AppServer(data, port, server_env(s, data, port, token), use_wrapper=bool(s.loop_overrides))
    server.start()
    startup_s = server.wait_ready(s.ready_timeout_s)
    stop, t0 = threading.Event(), time.time()
    admin = Admin(server.url, token, s, stop)
    logs = [Log() for _ in range(s.clients)]
    raters = [
        threading.Thread(
            target=rater_thread,
            args=(server.url, f"{SESSION_PREFIX}-{i}", s, SimulatedRater(seed=s.seed * 1000 + i), logs[i], stop),
            daemon=True,
        )
        for i in range(s.clients)
    ]
    helpers = [
        threading.Thread(target=admin.swapper, args=(versions, t0), daemon=True),
        threading.Thread(target=admin.monitor, args=(t0,), daemon=True),
    ]
    for t in raters + helpers:
        t.start()
    total = s.clients * s.votes
    acked = lambda: sum(len(lg.acks) for lg in logs)  # noqa: E731
    events: dict = {"round_requested_at_s": None, "crash": None}
    try:
        while any(t.is_alive() for t in raters):
            time.sleep(0.5)
            if events["round_requested_at_s"] is None and acked() >= s.round_after * total:
                res = admin.action("run_round")
                events["round_requested_at_s"], events["round_request"] = time.time() - t0, res
            if s.crash_after is not None and events["crash"] is None and acked() >= s.crash_after * total:
                events["crash"] = crash(server, admin, data, s, t0)
        load_s = time.time() - t0
        if s.crash_after is None:  # let the round finish (and its hot-swap, if the gate promotes it)
            deadline = time.time() + s.round_wait_s
            while time.time() < deadline and _round_running(admin):
                time.sleep(2)
        events["final"] = served_vs_registry(admin, data)
    finally:
        stop.set()
        for t in helpers:
            t.join(timeout=s.request_timeout_s)
        events["stop_rc"] = server.stop()
    result = {
        "settings": asdict(s),
        "startup_s": startup_s,
        "load_s": load_s,
        "wall_s": time.time() - t0,
        "versions_published": versions,
        "events": events,
        "status_timeline": admin.status,
        "swaps": {
            "count": len(admin.swaps),
            "ok": sum(1 for w in admin.swaps if w["ok"]),
            "ms": pct([w["ms"] for w in admin.swaps if w["ok"]]),
        },  # fmt: skip
    }
    result |= summarize(logs, admin.log, events.get("crash"), t0)
    result["votes_per_s"] = result["acknowledged_votes"] / load_s if load_s else None
    result["store"] = verify_store(data / "arena.duckdb", logs)
    result["server_log_tail"] = server.log_tail()[-1500:]
    return result


def _round_running(admin: Admin) -> bool:
    with admin.lock:
        res = admin.action("status")
    return bool(res and res.get("ok") and json.loads(res["message"])["state"] != "idle")


def served_vs_registry(admin: Admin, data: Path, locked: bool = False) -> dict:
    """The version the app serves (admin status) and the registry's pointer on disk, read with no swap in between
    (`locked`: the caller holds admin.lock already)."""
    if not locked:
        with admin.lock:
            return served_vs_registry(admin, data, locked=True)
    res = admin.action("status")
    pointer = AdapterRegistry(data / "adapters").current()
    served = json.loads(res["message"])["serving"] if res and res.get("ok") else None
    return {"served": served, "registry_current": pointer, "equal": served == pointer}


def crash(server: AppServer, admin: Admin, data: Path, s: LoadSettings, t0: float) -> dict:
    """SIGKILL the server's process group mid-load, restart it on the same data dir, compare served and registry."""
    with admin.lock:  # no swap while the server is down or starting
        status_before = admin.status[-1] if admin.status else None
        t_kill = time.time()
        server.kill()
        server.start()
        restart_s = server.wait_ready(s.ready_timeout_s)
        t_ready = time.time()
        check = served_vs_registry(admin, data, locked=True)  # before any swap after the restart
    return {
        "at_s": t_kill - t0,
        "t_kill": t_kill,
        "t_ready": t_ready,
        "restart_s": restart_s,
        "status_before": status_before,
    } | check


def summarize(logs: list[Log], admin_log: Log, crash_info: dict | None, t0: float) -> dict:
    """Latency percentiles of successful calls and every failed request, split into the crash outage or not."""
    outage = (crash_info["t_kill"], crash_info["t_ready"] + 5.0) if crash_info else None
    reqs = [r for lg in logs for r in lg.requests] + admin_log.requests
    failed = [r for r in reqs if r[3] is not None]
    # A request counts as the outage's when it overlapped it (started before the app was back, ended after the kill):
    # one in flight at the SIGKILL can end, on a loaded machine, only after the window.
    in_outage = [r for r in failed if outage and r[1] <= outage[1] and r[1] + r[2] / 1000 >= outage[0]]
    unexpected = [r for r in failed if r not in in_outage]
    acks = [a for lg in logs for a in lg.acks]
    return {
        "requests": len(reqs),
        "failed_requests": len(unexpected),
        "failed_during_outage": len(in_outage),
        "failures": [{"endpoint": e, "at_s": round(t - t0, 1), "error": err} for e, t, _, err in unexpected[:20]],
        "failure_kinds_during_outage": dict(Counter(err.split(":")[0] for *_, err in in_outage)),
        "latency_ms": {
            name: pct([ms for lg in [*logs, admin_log] for e, _, ms, err in lg.requests if e == ep and err is None])
            for name, ep in (("next_pair", "/next_pair"), ("vote", "/vote"), ("admin", "/admin"))
        },
        "acknowledged_votes": len(acks),
        "votes_retried": sum(1 for a in acks if a[4] > 1),
        "votes_given_up": sum(lg.gave_up for lg in logs),
        "versions_in_reveals": dict(sum((lg.versions for lg in logs), Counter())),
    }


def verify_store(db: Path, logs: list[Log]) -> dict:
    """Read the stopped app's DuckDB file: every acknowledged vote stored once, as acknowledged; nothing else."""
    acks = [a for lg in logs for a in lg.acks]
    by_id: dict[int, set] = {}
    by_pair: dict[tuple[str, int], set] = {}
    for vote_id, session, pair_id, outcome, _ in acks:
        by_id.setdefault(vote_id, set()).add((session, pair_id, outcome))
        by_pair.setdefault((session, pair_id), set()).add(vote_id)
    with FeedbackStore(db) as store:
        votes = {v.vote_id: v for v in store.votes()}
        # A pool pair shown to several sessions is one pair row per session: count the distinct image pairs.
        shown = (
            store._cur()
            .execute(
                "SELECT count(*), count(DISTINCT (p.left_image_id, p.right_image_id)) FROM votes v "
                "JOIN pairs p ON p.pair_id = v.pair_id WHERE v.session LIKE ?",
                [f"{SESSION_PREFIX}-%"],
            )
            .fetchone()
        )
        runs = store.training_runs()
        counts = store.counts()
        raters = store.rater_stats()
    ours = {i: v for i, v in votes.items() if v.session.startswith(f"{SESSION_PREFIX}-")}
    missing = [i for i in by_id if i not in votes]
    mismatched = [
        i
        for i, acked in by_id.items()
        if i in votes and acked != {(votes[i].session, votes[i].pair_id, votes[i].outcome)}
    ]
    return {
        "counts": counts,
        "votes_stored": len(ours),
        "acknowledged_distinct": len(by_id),
        "acknowledged_missing": len(missing),
        "acknowledged_mismatched": len(mismatched),
        "one_vote_id_for_two_votes": sum(1 for v in by_id.values() if len(v) > 1),
        "two_vote_ids_for_one_pair": sum(1 for v in by_pair.values() if len(v) > 1),
        "stored_not_acknowledged": len(set(ours) - set(by_id)),
        "votes_per_image_pair": shown[0] / max(1, shown[1]),
        "flagged": dict(Counter(v.excluded_reason for v in ours.values() if v.excluded_reason)),
        "raters_shadow_excluded": sum(1 for r in raters if r["status"] == "shadow_excluded"),
        "training_runs": [
            {
                "run_id": r.run_id,
                "status": r.status,
                "reason": r.reason,
                "adapter_version": r.adapter_version,
                "seconds": None if r.finished is None else (r.finished - r.started).total_seconds(),
            }  # fmt: skip
            for r in runs
        ],
    }
