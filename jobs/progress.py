"""What the Progress tab says, as plain data: "is it getting better?" in numbers and in plain words.

- `quality_series`: the served line of versions (base, then each promotion) with its held-out judge score and 95%
  interval (jobs.quality records), the ceiling, and the votes and time of each promotion;
- `win_rate_series`: for any model, each version's win rate against the base from raters' cross-version votes;
- `round_events`: every finished training round, promoted or not, with the reason in plain words (`plain_reason`);
- `leaderboard_rows` and the table and note the tab shows, `round_status` and its text;
- `version_label`: versions named for humans ("v0004 (round 4, 9 min ago)").

No gradio and no HTML here (DESIGN.md import rules); the UI draws these (ui/progress.py).
"""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pandas as pd

from feedback_store.records import TrainingRun
from feedback_store.stats import leaderboard
from jobs.quality import CEILING, read_quality
from jobs.registry import BASE

if TYPE_CHECKING:
    from jobs.runtime import Runtime

MIN_LEADERBOARD_VOTES = 30  # votes before a version is ranked (DESIGN.md: "minimum votes before a rank")
_rounds: dict[tuple[int, str], int] = {}  # (store id, version) -> the training round that made it
_rounds_lock = threading.Lock()


def ago(seconds: float) -> str:
    """'just now', '9 min ago', '3 h ago', '2 days ago'."""
    s = max(0.0, seconds)
    if s < 60:
        return "just now"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 2 * 86400:
        return f"{int(s // 3600)} h ago"
    return f"{int(s // 86400)} days ago"


def round_of(runtime: Runtime, version: str) -> int | None:
    """The training round (run id) that produced `version`, cached (a version's round never changes)."""
    key = (id(runtime.store), version)
    with _rounds_lock:
        if key in _rounds:
            return _rounds[key]
    found = {r.adapter_version: r.run_id for r in runtime.store.training_runs(limit=500) if r.adapter_version}
    with _rounds_lock:
        _rounds.update({(id(runtime.store), v): run for v, run in found.items()})
        return _rounds.get(key)


def version_label(runtime: Runtime, version: str, now: float | None = None) -> str:
    """A version named for humans: "base (the starting model)", "v0004 (round 4, 9 min ago)"."""
    if version == BASE:
        return "base (the starting model)"
    name = version.split("+")[0]  # "<v>+broken": an attention check's deliberately broken image
    if name not in runtime.registry.versions():
        return name
    parts = []
    run = round_of(runtime, name)
    if run is not None:
        parts.append(f"round {run}")
    parts.append(ago((now or time.time()) - runtime.registry.info(name).created))
    return f"{name} ({', '.join(parts)})"


# -- leaderboard ----------------------------------------------------------------------------------------------------
def leaderboard_rows(runtime: Runtime) -> list[dict]:
    """Bradley-Terry leaderboard rows (rank, version, rating, ci_low, ci_high, votes, win_rate_vs_base,
    preliminary, serving), best first; every kept version appears, with no votes yet if it has none."""
    board = leaderboard(runtime.store.cross_version_comparisons(), min_votes=MIN_LEADERBOARD_VOTES)
    serving = runtime.generation.serving_version
    rows = [{**r, "serving": r["version"] == serving} for r in board.rows()]
    seen = {r["version"] for r in rows}
    for v in [BASE, *runtime.registry.versions()]:
        if v not in seen:
            rows.append(
                {"rank": None, "version": v, "rating": None, "ci_low": None, "ci_high": None, "votes": 0}
                | {"wins": 0.0, "win_rate_vs_base": None, "votes_vs_base": 0, "preliminary": True}
                | {"serving": v == serving}
            )
    return rows


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "" if x is None else format(x, spec)


def leaderboard_frame(rows: list[dict]) -> pd.DataFrame:
    """The Progress tab's leaderboard table, one row per version (`leaderboard_rows`)."""
    table = [
        {
            "Rank": "" if r["rank"] is None else str(r["rank"]),
            "Version": r["version"] + (" (serving)" if r["serving"] else ""),
            "Rating": _fmt(r["rating"]),
            "95% CI": "" if r["ci_low"] is None else f"{r['ci_low']:.0f} to {r['ci_high']:.0f}",
            "Votes": r["votes"],
            "Win rate vs base": _fmt(r["win_rate_vs_base"], ".0%"),
            "Status": f"preliminary ({r['votes']}/{MIN_LEADERBOARD_VOTES} votes)" if r["preliminary"] else "",
        }
        for r in rows
    ]
    return pd.DataFrame(table, columns=["Rank", "Version", "Rating", "95% CI", "Votes", "Win rate vs base", "Status"])


def leaderboard_note(cross_votes: int, all_votes: int) -> str:
    """Which votes the leaderboard counts, in one line."""
    return (
        f"The leaderboard counts only cross-version votes: pairs whose two images came from different versions "
        f"({cross_votes} of {all_votes} votes so far). A version is ranked after {MIN_LEADERBOARD_VOTES} of them. "
        "Pairs from one version train the model but cannot compare versions. Ratings: Bradley-Terry, base = 1000, "
        "95% bootstrap interval."
    )


# -- the quality line -----------------------------------------------------------------------------------------------
def _votes_at(runtime: Runtime) -> dict[str, int]:
    """Each published version's votes at its round's snapshot (its x position on the chart)."""
    snaps = {s.snapshot_id: s.vote_id_max for s in runtime.store.snapshots()}
    out = {}
    for v in runtime.store.adapter_versions():
        if v.status != "rejected" and v.snapshot_id in snaps:
            out[v.version] = int(snaps[v.snapshot_id])
    return out


def served_line(runtime: Runtime) -> list[str]:
    """The served model's history: base, then the chain of parents up to the version served now, oldest first."""
    chain, v = [], runtime.generation.serving_version
    kept = set(runtime.registry.versions())
    while v and v != BASE and v in kept and v not in chain:
        chain.append(v)
        v = runtime.registry.info(v).parent
    return [BASE, *reversed(chain)]


def quality_series(runtime: Runtime) -> dict:
    """{"points": [{version, votes, created, judge, low, high}] along the served line (versions measured so far),
    "ceiling": record or None, "pending": names not measured yet}. Empty points when nothing is measured."""
    records = read_quality(runtime.config.data_dir)
    votes = _votes_at(runtime)
    points = []
    for v in served_line(runtime):
        rec = records.get(v)
        if rec is None:
            continue
        created = 0.0 if v == BASE else runtime.registry.info(v).created
        points.append(
            {"version": v, "votes": votes.get(v, 0), "created": created}
            | {k: rec[k] for k in ("judge", "low", "high")}
        )
    line = served_line(runtime)
    return {"points": points, "ceiling": records.get(CEILING), "pending": [v for v in line if v not in records]}


def wilson(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion (ties count half a win)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = wins / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def win_rate_series(rows: list[dict], runtime: Runtime) -> list[dict]:
    """Each version with votes against the base: its win rate from raters and a 95% interval, in publish order."""
    votes = _votes_at(runtime)
    out = []
    for r in rows:
        n = int(r.get("votes_vs_base") or 0)
        if r["version"] == BASE or not n or r.get("win_rate_vs_base") is None:
            continue
        low, high = wilson(r["win_rate_vs_base"] * n, n)
        out.append({"version": r["version"], "votes": votes.get(r["version"], 0), "rate": r["win_rate_vs_base"]}
                   | {"low": low, "high": high, "n": n})  # fmt: skip
    return sorted(out, key=lambda p: p["votes"])


# -- rounds in plain words ------------------------------------------------------------------------------------------
def plain_reason(run: TrainingRun) -> str:
    """Why a round promoted its candidate or not, in words a watcher reads."""
    parent = run.parent_version or BASE
    if run.status == "running":
        return "training now"
    ev = run.metrics.get("eval", {}) if isinstance(run.metrics, dict) else {}
    cand = ev.get("versions", {}).get("candidate", {})
    ref = ev.get("versions", {}).get("serving") or {}
    reason = run.reason or ""
    acc, ref_acc = cand.get("implicit_acc"), ref.get("implicit_acc", 0.5)
    evidence = "no evidence it learned the votes" in reason  # jobs.gate's evidence rule said no
    if run.status == "succeeded":
        now = f"; now serving {run.adapter_version}" if run.adapter_version else ""
        if acc is not None and "implicit acc" in str(run.metrics.get("gate", "")):  # the gate read held-out votes
            judge = (
                f", judge {cand['judge']:.2f} vs {ref.get('judge', ev.get('base_judge')):.2f}"
                if "judge" in cand
                else ""
            )
            # jobs.gate's evidence rule: beyond chance, and no worse than the served version
            than = f"chance 50%, {parent} {ref_acc:.0%}" if ref else "chance 50%"
            return f"promoted: it agreed with {acc:.0%} of held-out votes ({than}{judge}){now}"
        if "judge" in cand:
            before = ref.get("judge", ev.get("base_judge"))
            return f"promoted: it scored {cand['judge']:.2f} on the judge's probe prompts, vs {before:.2f} for {parent}{now}"
        return "promoted: it agreed with held-out votes at least as well as " + parent
    if reason.startswith("gate:"):
        if evidence and acc is not None:
            return f"not promoted: it agreed with {acc:.0%} of held-out votes, not clearly more than chance (50%)"
        if " SE < " in reason and acc is not None:
            return f"not promoted: it agreed with held-out votes less often than {parent} ({acc:.0%} vs {ref_acc:.0%})"
        if "judge" in cand:
            before = ref.get("judge", ev.get("base_judge"))
            veto = "< -" in reason.rsplit("(delta", 1)[-1]  # a negative margin: the judge vetoed a fall
            return (f"not promoted: it scored {cand['judge']:.2f} on the judge's probe prompts, "
                    + (f"too far below {parent}'s {before:.2f}" if veto else f"not above {parent}'s {before:.2f}"))  # fmt: skip
        return "not promoted: " + reason.removeprefix("gate:").strip()
    if reason.startswith("only ") and "pairs" in reason:
        return "not trained: not enough votes with a clear winner yet (" + reason + ")"
    return "the round failed: " + (reason or "no reason recorded") + "; the served version was kept"


def round_events(runtime: Runtime, limit: int = 50) -> list[dict]:
    """Finished rounds, newest first: {round, status ("promoted" | "rejected" | "failed"), version, votes, when,
    reason (plain words)}."""
    snaps = {s.snapshot_id: s.vote_id_max for s in runtime.store.snapshots()}
    out = []
    for run in runtime.store.training_runs(limit=limit):
        if run.status == "running":
            continue
        reason = run.reason or ""
        status = "promoted" if run.status == "succeeded" else "rejected" if reason.startswith("gate:") else "failed"
        when = (run.finished or run.started).replace(tzinfo=UTC).timestamp()
        out.append(
            {"round": run.run_id, "status": status, "version": run.adapter_version, "when": when}
            | {"votes": int(snaps.get(run.snapshot_id, 0)), "reason": plain_reason(run)}
        )
    return out


# -- the round in progress ------------------------------------------------------------------------------------------
def round_status(runtime: Runtime) -> dict:
    """The round in progress and the last one, plus the schedule: plain values for a status panel."""
    status = runtime.loop.status
    progress = status.progress or {}
    nxt = runtime.scheduler.next_run()
    return {
        "serving": runtime.generation.serving_version,
        "state": status.state,
        "step": progress.get("step") if status.state == "training" else None,
        "max_steps": runtime.config.loop.max_steps,
        "loss": progress.get("loss") if status.state == "training" else None,
        "running_s": None if status.started is None or status.state == "idle" else time.time() - status.started,
        "last": status.last,
        "paused": runtime.scheduler.paused,
        "next_run_in_s": None if nxt is None else max(0.0, (nxt - datetime.now(UTC)).total_seconds()),
        "every_s": runtime.config.loop.train_every_s,
        "new_votes": runtime.loop.new_trainable_votes(),
        "min_new_votes": runtime.config.loop.min_new_votes,
        "gpu_plan": runtime.gpu.line(),  # jobs/gpu_round.py: whether generation pauses during a round, and why
    }


def status_lines(s: dict) -> list[str]:
    """The round status (`round_status`) as short plain sentences."""
    wait = max(0, s["min_new_votes"] - s["new_votes"])
    if s["paused"]:
        schedule = "Training is paused."
    elif wait:
        schedule = (
            f"The next training round starts after {wait} more votes ({s['new_votes']} of {s['min_new_votes']})."
        )
    else:
        schedule = f"Enough new votes for a round ({s['new_votes']}); next check in {_fmt(s['next_run_in_s'])} s."
    last = s.get("last") or {}
    if last.get("status") == "skipped" and str(last.get("reason", "")).startswith("waiting for votes"):
        schedule += " The last round " + str(last["reason"]).replace("waiting for votes:", "waited for votes:") + "."
    lines = [f"Serving {s['serving']}. {schedule}"]
    if s["state"] != "idle":
        step = f", step {s['step']} of {s['max_steps']}" if s["step"] is not None else ""
        lines.append(f"A round is {s['state']} now{step} ({_fmt(s['running_s'])} s so far).")
    if s.get("gpu_plan"):
        lines.append(s["gpu_plan"])
    return lines
