"""docs/RELIABILITY.md from docs/benchmarks/reliability.json (bench/reliability.py calls `render`; rerun the doc alone
with `python -m bench.reliability --render-only`)."""

from __future__ import annotations

from pathlib import Path

from bench.harness import ROOT, repo_path
from bench.harness import fmt as _f
from bench.harness import ms_cell as _ms
from bench.harness import yes_no as _yes
from bench.poisoning import PoisonSettings
from bench.reliability_http import LoadSettings, server_env
from jobs.abuse import AbuseConfig

_F = PoisonSettings()  # the poisoning part's full size (bench/reliability.py FULL)

LOAD_GOAL = (
    "32 clients x 300 votes, hot-swap every 10 s, a training round: 0 failed requests, 0 lost or duplicated acks"
)
CRASH_GOAL = "SIGKILL mid-load, restart: every acknowledged vote there, the registry's version served"
BAD_GOAL = ">= 30 hostile requests: each refused with a clear message or answered as documented; nothing else stored"
POISON_GOAL = "20% adversarial raters: gain with defences >= 80% of the clean run's"


def load_ok(r: dict) -> bool:
    st = r["store"]
    clean = not (st["acknowledged_missing"] or st["acknowledged_mismatched"])
    clean = clean and not (st["one_vote_id_for_two_votes"] or st["two_vote_ids_for_one_pair"])
    served = r["events"].get("final", {}).get("equal", False)
    if r["events"].get("crash"):
        served = served and r["events"]["crash"]["equal"]
    return clean and r["failed_requests"] == 0 and served and r["acknowledged_votes"] > 0


def _size(r: dict) -> str:
    s = r["settings"]
    return f"{s['clients']} clients x {s['votes']} votes ({r['mode']})"


def summary(parts: dict) -> list[str]:
    lines = ["| part | goal | result | met | run |", "|---|---|---|---|---|"]
    for name, goal in (("load", LOAD_GOAL), ("crash", CRASH_GOAL)):
        r = parts.get(name)
        if r is None:
            lines.append(f"| {name} | {goal} | not run yet | | |")
            continue
        st = r["store"]
        res = (
            f"{_size(r)}: {r['failed_requests']} failed of {r['requests']} requests, {r['acknowledged_votes']} acks, "
            f"{st['acknowledged_missing']} lost, {st['one_vote_id_for_two_votes'] + st['two_vote_ids_for_one_pair']}"
            f" duplicated, {st['stored_not_acknowledged']} stored without an ack"
        )
        if name == "crash" and r["events"].get("crash"):
            c = r["events"]["crash"]
            res += f"; restart {c['restart_s']:.0f} s, served {c['served']} = registry {c['registry_current']}"
        lines.append(f"| {name} | {goal} | {res} | {_yes(load_ok(r))} | {r['finished']} |")
    r = parts.get("bad_input")
    if r is None:
        lines.append(f"| bad input | {BAD_GOAL} | not run yet | | |")
    else:
        rows = r["cases"]
        ok = sum(c["passed"] for c in rows)
        unexpected, answered = sum(not c["unchanged"] for c in rows), sum(bool(c.get("stored")) for c in rows)
        met = ok == len(rows) >= 30
        res = f"{ok}/{len(rows)} as expected; {unexpected} unexpected stored changes; {answered} answered with a pair"
        lines.append(f"| bad input | {BAD_GOAL} | {res} | {_yes(met)} | {r['finished']} |")
    r = parts.get("poisoning")
    if r is None:
        lines.append(f"| poisoning | {POISON_GOAL} | not run yet | | |")
    else:
        arms = r["arms"]
        mean = r["goal"].get("mean_gain")  # replicated: the goal reads the mean over seeds
        res = ", ".join(f"{a} {_f(mean[a] if mean else arms[a]['gain'], '+.3f')}" for a in arms)
        res += f" (mean of {r['goal']['replicates']} seeds)" if mean else ""
        share = r["goal"]["defended_share"]
        res += (
            f"; defended/clean {_f(share, '.0%')} ({r['mode']})"
            if share is not None
            else " (clean gain within its 95% CI of zero)"
        )
        lines.append(f"| poisoning | {POISON_GOAL} | {res} | {_yes(r['goal']['met'])} | {r['finished']} |")
    return lines


def load_section(name: str, r: dict) -> list[str]:
    s, st, ev = r["settings"], r["store"], r["events"]
    lat = r["latency_ms"]
    lines = [
        f"Mode **{r['mode']}**: {s['clients']} clients x {s['votes']} votes, hot-swap every {s['swap_every_s']:g} s, "
        f"round requested at {s['round_after']:.0%} of the votes, raters look {s.get('pace_s', 0):g} s at each pair"
        + (f", SIGKILL at {s['crash_after']:.0%}" if s.get("crash_after") is not None else "")
        + f"; NCP_STEPS={s['steps']}, NCP_RATINGS_PER_PAIR={s['ratings_per_pair']}, NCP_PREFETCH={s['prefetch']}; "
        + (
            "round size " + ", ".join(f"{k}={v}" for k, v in s["loop_overrides"].items())
            if s["loop_overrides"]
            else "the default round (`python app.py` as is)"
        )  # fmt: skip
        + f". App start {r['startup_s']:.0f} s, load {r['load_s']:.0f} s ({r['votes_per_s']:.1f} acknowledged votes/s), "
        f"whole part {r['part_wall_s'] / 60:.1f} min.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests (raters and admin) | {r['requests']} |",
        f"| failed requests (not counting the outage) | {r['failed_requests']} |",
    ]
    if ev.get("crash"):
        c = ev["crash"]
        kinds = ", ".join(f"{k} {v}" for k, v in r["failure_kinds_during_outage"].items())
        lines += [
            f"| killed at | {c['at_s']:.0f} s into the load, round state then: "
            f"{(c.get('status_before') or {}).get('state', '?')} |",
            f"| restart until the app answered | {c['restart_s']:.1f} s |",
            f"| requests failed during the outage (kill to restart + 5 s) | {r['failed_during_outage']} ({kinds}) |",
            f"| served after the restart / registry pointer | {c['served']} / {c['registry_current']} |",
        ]
    lines += [
        f"| acknowledged votes | {r['acknowledged_votes']} ({r['votes_retried']} after a retry, "
        f"{r['votes_given_up']} given up) |",
        f"| acknowledged votes missing from the store / stored differently | {st['acknowledged_missing']} / "
        f"{st['acknowledged_mismatched']} |",
        f"| one vote_id acknowledged for two votes / two vote_ids for one pair | {st['one_vote_id_for_two_votes']} / "
        f"{st['two_vote_ids_for_one_pair']} |",
        f"| votes stored but never acknowledged (ack lost) | {st['stored_not_acknowledged']} |",
        f"| votes per generated pair (a pool pair is shown to up to NCP_RATINGS_PER_PAIR sessions) | "
        f"{st.get('votes_per_image_pair', 0):.2f} |",
        f"| raters shadow-excluded by the review (votes stored, not trained on) | {st['raters_shadow_excluded']} |",
        f"| hot-swaps (admin promote) ok / sent | {r['swaps']['ok']} / {r['swaps']['count']} |",
        "| versions in the raters' reveals | "
        + ", ".join(f"{k} {v}" for k, v in sorted(r["versions_in_reveals"].items()))
        + " |",
        f"| served at the end / registry pointer | {ev['final']['served']} / {ev['final']['registry_current']} |",
        "",
        "| latency (ms), successful calls | p50 / p95 / p99 / max | calls |",
        "|---|---|---|",
        f"| /next_pair | {_ms(lat['next_pair'])} | {lat['next_pair'].get('n', 0)} |",
        f"| /vote | {_ms(lat['vote'])} | {lat['vote'].get('n', 0)} |",
        f"| /admin (promote, status, run_round) | {_ms(lat['admin'])} | {lat['admin'].get('n', 0)} |",
        f"| of which promote (hot-swap) | {_ms(r['swaps']['ms'])} | {r['swaps']['ms'].get('n', 0)} |",
        "",
        "Training rounds (from the store after the run):",
        "",
        "| run | status | seconds | reason |",
        "|---|---|---|---|",
    ]
    for run in st["training_runs"]:
        secs = "" if run["seconds"] is None else f"{run['seconds']:.0f}"
        lines.append(
            f"| {run['run_id']} | {run['status']} | {secs} | {run['reason'] or run['adapter_version'] or ''} |"
        )
    if r["failures"]:
        lines += ["", "Failed requests (first 20):", ""] + [f"- {f['endpoint']} at {f['at_s']} s: {f['error']}" for f in r["failures"]]  # fmt: skip
    return lines


def bad_input_section(r: dict) -> list[str]:
    lines = [
        "Each case runs its setup (fresh pairs, earlier votes), reads the stored state, sends the one request, reads "
        "the state again. State: row counts and a sha256 of each row of every table, the registry pointer file, the "
        "blocklist file, the schedule's paused flag, the served version. A refusal changes none of it; a documented "
        "answer (a whitespace-only prompt gets a pool pair; a pair's answer names no server path) adds only its pair.",
        "",
        "| # | case | request | expected | response | message | unchanged | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(r["cases"], 1):
        msg = c["message"].replace("|", "\\|").replace("\n", " ")[:110]
        req = c["request"].replace("|", "\\|")
        kept = "only its pair: " + ", ".join(f"{t} +{n}" for t, n in c["stored"].items()) if c.get("stored") else "yes"
        lines.append(
            f"| {i} | {c['case']} | `{req}` | {c['expected']} | {c['code']} | {msg} | "
            f"{kept if c['unchanged'] else 'NO: ' + ', '.join(c['changed'])} | {'yes' if c['passed'] else '**no**'} |"
        )
    lines += [
        "",
        "Refused by Gradio before the app sees them (no app message; Gradio hides exception text unless "
        "`show_error=True`): a body that is not JSON (400), `data` that is not a list (422), too few arguments (an "
        "`error` event with no message). Extra arguments are dropped by Gradio. An endpoint that does not exist, and "
        "any of the web page's own handlers called by name, answer 404 `not_an_endpoint` (app.EdgeGuard). The "
        "`edges` group goes around the API: an upload (refused: the app takes no files), the page's queue with a "
        "hostile session hash (a warning in the page, `ui_refused` here), wrongly typed admin values, oversized "
        "blocklists (bounded at 256 KiB and 20,000 terms; a prompt against a full list is matched by word lookups), "
        "free-text reasons, a session hoarding unvoted pairs, and export or admin-token flooding from one address.",
    ]
    return lines


def model_name(settings: dict) -> str:
    """The poisoning base, relative to the repo when inside it (runs before `--model` existed used the shipped one)."""
    return repo_path(settings.get("model", ROOT / "models" / "shapes-base"))


def poisoning_section(r: dict) -> list[str]:
    s = r["settings"]
    lines = [
        f"Mode **{r['mode']}**, base `{model_name(s)}`: {s['raters']} raters ({len(s['adversary_indices'])} "
        f"adversarial: indices "
        f"{s['adversary_indices']}), {s['rounds']} round(s) of {s['votes_per_round']} votes, each pool pair shown to "
        f"{s['ratings_per_pair']} raters, rater noise {s['noise']}, median time to vote {s['median_vote_ms']:.0f} ms, "
        f"adversaries say both_bad below {s.get('adversary_both_bad_below', 0.3)}; "
        f"NCP-DPO {s['max_steps']} steps per round, lr {s['lr']}, beta {s['beta']:g}"
        + (f", timesteps t >= {s['timestep_low']:g} T" if s.get("timestep_low") else "")
        + f"; judge on {s['probes']} probe "
        f"prompts x {s['probe_seeds']} seed(s); seed {s['seed']}. Whole part {r['part_wall_s'] / 60:.1f} min.",
        "",
        "| arm | defences | adversaries | pairs trained (from adversaries) per round | shadow-excluded "
        "(adversaries) | served | judge | base | gain (95% CI) | share of clean gain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in r["arms"].items():
        trained = ", ".join(f"{x['pairs_trained']} ({x['adversary_pairs_trained']})" for x in a["rounds"])
        excl = f"{len(a['shadow_excluded'])} ({sum(e['adversary'] for e in a['shadow_excluded'])})"
        ci = "" if a["gain_ci95"] is None else f" ± {a['gain_ci95']:.3f}"
        share = _f(a.get("share_of_clean_gain"), ".0%")
        lines.append(
            f"| {name} | {'on' if name == 'defended' else 'off'} | {a['adversaries']} | {trained} | {excl} | "
            f"{a['served'] or 'base'} | {_f(a['judge'])} | {_f(a['base_judge'])} | {_f(a['gain'], '+.3f')}{ci} | {share} |"
        )
    lines += [
        "",
        "What the defences read, adversaries against honest raters, per arm (at the end of the arm): control-pair pass "
        "rate (trust), agreement with the other raters' majority as the review computes it (ties count as labels), "
        "and agreement on the pairs whose majority is a strict preference (bench-only diagnostic).",
        "",
        "| arm | who | votes | control votes | control pass rate | consensus pairs | agreement | strict-majority "
        "pairs | strict agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in r["arms"].items():
        for who, d in (a.get("diagnostics") or {}).items():
            if d["raters"]:
                lines.append(
                    f"| {name} | {who} ({d['raters']}) | {d['votes']} | {d['control_votes']} | "
                    f"{_f(d['control_pass_rate'], '.0%')} | {d['consensus_pairs']} | {_f(d['agreement'], '.0%')} | "
                    f"{d['strict_consensus_pairs']} | {_f(d['strict_agreement'], '.0%')} |"
                )
    reasons = sorted({e["reason"] for a in r["arms"].values() for e in a["shadow_excluded"] if e["reason"]})
    if reasons:
        lines += ["", "Why raters were excluded: " + "; ".join(reasons[:6])]
    lines += findings(r) + training_data(r) + replicates_table(r)
    goal = r["goal"]
    lines += [
        "",
        f"Goal (defended gain >= 80% of the clean gain{', mean over the seeds' if 'mean_gain' in goal else ''}): "
        f"{_yes(goal['met'])}"
        + ("" if goal["defended_share"] is None else f" ({goal['defended_share']:.0%})")
        + ". Read it with the CIs: a gain within its CI of zero says little either way.",
    ]
    return lines


def replicates_table(r: dict) -> list[str]:
    """The part's gains per seed (each seed its own prompts, pairs and raters' streams) and their mean."""
    reps, goal = r.get("replicates"), r["goal"]
    if not reps:
        return []
    arms = list(reps[0]["arms"])
    lines = ["", f"The whole part with {len(reps)} seeds (the tables above are seed {reps[0]['seed']}'s). After "
             "round 1 each arm serves its own versions, so arms differ by training noise as well as by their votes. "
             "Gain (95% CI over probes) per arm, and adversarial pairs trained / all pairs trained:", "",
             "| seed | " + " | ".join(arms) + " | " + " | ".join(f"{a} pairs (adversarial)" for a in arms[1:]) + " |",
             "|---|" + "---|" * (2 * len(arms) - 1)]  # fmt: skip
    for rep in reps:
        a = rep["arms"]
        lines.append(f"| {rep['seed']} | " + " | ".join(f"{a[n]['gain']:+.3f} ± {a[n]['gain_ci95'] or 0:.3f}" for n in arms)
                     + " | " + " | ".join(f"{a[n]['pairs_trained']} ({a[n]['adversary_pairs_trained']})"
                                          for n in arms[1:]) + " |")  # fmt: skip
    lines.append("| mean ± sd | " + " | ".join(f"{goal['mean_gain'][n]:+.3f} ± {goal['sd_gain'][n]:.3f}" for n in arms)
                 + " |" + " |" * (len(arms) - 1))  # fmt: skip
    return lines


def render(result: dict) -> str:
    parts = result.get("parts", {})
    env = server_env(LoadSettings(), Path("<tmp>/data"), 0, "<random>")
    shown = ["NCP_STEPS", "NCP_RATINGS_PER_PAIR", "NCP_SCHEDULE", "NCP_MIN_NEW_VOTES", "NCP_ABUSE_DEFENCES",
             "NCP_MIN_VOTE_MS", "NCP_VOTES_PER_MINUTE", "NCP_VOTE_BURST", "NCP_DAILY_VOTE_CAP", "NCP_ADMIN_TOKEN"]  # fmt: skip
    out = [
        "# Reliability",
        "",
        "Generated by `python -m bench.reliability` from `docs/benchmarks/reliability.json` (every number below, "
        "with the exact settings of each part); do not edit by hand. Machine: "
        f"{result.get('machine', '?')}, 2 cores shared with other work.",
        "",
        *summary(parts),
        "",
        "## How to rerun",
        "",
        "```",
        "python -m bench.reliability                 # all parts, full sizes (the defaults)",
        "python -m bench.reliability --quick         # all parts, small sizes",
        "python -m bench.reliability --part crash    # one part (repeatable); the other parts' results are kept",
        "python -m pytest -q tests/test_bad_input.py # the bad-input table as a test (CI)",
        "```",
        "",
        "Full sizes: load and crash 32 clients x 300 votes through `python app.py` as is (its default round: "
        f"120 training steps, 24 judge probes x 2 seeds); poisoning {_F.raters} raters, {_F.rounds} rounds of "
        f"{_F.votes_per_round} votes, {_F.max_steps} steps, {_F.probes} probes x {_F.probe_seeds} seeds, the 3 arms in "
        f"{_F.parallel_arms} processes at once, the whole part for {_F.replicates} seeds. Quick sizes: 8 clients x 30 votes with a 10-step round (bench/reliability_server.py "
        "runs app.py's `main()` with only the round's LoopConfig fields replaced); poisoning 5 raters (1 adversary), 1 round of "
        "150 votes, 20 steps, 8 probes x 1 seed. A part last run at quick size gets a full-size time estimate at the end "
        "of this page.",
        "",
        "The app server's environment in the load and crash parts (`bench/reliability_http.py::server_env`). The abuse "
        "defences are on, but the bots vote at machine speed, so the limits are set too generous to refuse them and "
        "`NCP_MIN_VOTE_MS=0` keeps their votes unflagged; the poisoning part runs the default limits.",
        "",
        "| variable | value |",
        "|---|---|",
        *[f"| `{k}` | {env[k]} |" for k in shown],
        "",
    ]
    for name, title in (("load", "1. Load"), ("crash", "2. Crash (SIGKILL mid-load)")):
        if name in parts:
            out += [f"## {title}", "", *load_section(name, parts[name]), ""]
    if "bad_input" in parts:
        out += ["## 3. Bad input", "", *bad_input_section(parts["bad_input"]), ""]
    if "poisoning" in parts:
        out += ["## 4. Poisoning", "", *poisoning_section(parts["poisoning"]), ""]
    if est := estimates(parts):  # only quick runs of the sized parts (load, crash, poisoning) give estimates
        out += ["## Full-size estimates", "", *est, ""]
    return "\n".join(out)


def estimates(parts: dict) -> list[str]:
    """Rough full-size run times from quick runs (scaled by votes; rounds by steps and probe images)."""
    lines = []
    for name in ("load", "crash"):
        r = parts.get(name)
        if r and r["mode"] == "quick" and r["votes_per_s"]:
            minutes = (32 * 300 / r["votes_per_s"] + 2 * r["startup_s"]) / 60
            lines.append(
                f"- {name}: about {minutes:.0f} min at the quick run's {r['votes_per_s']:.1f} votes/s "
                "(more clients may go faster or slower: the 2 cores are shared by server, clients and trainer)."
            )
    r = parts.get("poisoning")
    if r and r["mode"] == "quick":
        s = r["settings"]
        total = 0.0
        for a in r["arms"].values():
            rounds = sum(x["seconds"] for x in a["rounds"])
            voting = a["seconds"] - rounds
            total += voting * (_F.rounds * _F.votes_per_round) / (s["rounds"] * s["votes_per_round"])
            per_probe = _F.probes * _F.probe_seeds / (s["probes"] * s["probe_seeds"])
            total += _F.rounds * rounds / s["rounds"] * (_F.max_steps / s["max_steps"] + per_probe) / 2
        lines.append(
            f"- poisoning: about {total / 60:.0f} min per seed run one arm after another (3 arms x {_F.rounds} rounds; "
            f"a coarse scaling of the quick run), less with the {_F.parallel_arms} arms in parallel; {_F.replicates} "
            "seeds."
        )
    return lines


def training_data(r: dict) -> list[str]:
    """What reached the trainer in each arm: the direct measure of the defences, which stays readable when the judge
    gains are too small for their ratio to mean anything."""
    arms = r["arms"]
    if not {"clean", "poisoned", "defended"} <= set(arms):
        return []

    def total(arm: str, key: str) -> int:
        return sum(x[key] for x in arms[arm]["rounds"])

    honest = {a: total(a, "pairs_trained") - total(a, "adversary_pairs_trained") for a in arms}
    return [
        "",
        f"Training data (all rounds): the poisoned arm trained on {total('poisoned', 'adversary_pairs_trained')} "
        f"adversarial pairs of {total('poisoned', 'pairs_trained')}, the defended arm on "
        f"{total('defended', 'adversary_pairs_trained')} of {total('defended', 'pairs_trained')}; the defended arm kept "
        f"{honest['defended']} honest pairs where the clean arm had {honest['clean']} (all its pairs are honest).",
    ]


def findings(r: dict) -> list[str]:
    """What the diagnostics say about why a defence did or did not act (data-driven, so it stays true on a rerun)."""
    cfg, notes = AbuseConfig(), []
    a = r["arms"].get("defended")
    d = (a or {}).get("diagnostics", {}).get("adversaries")
    if not d or not d["raters"]:
        return []
    if d["agreement"] is not None and d["agreement"] >= cfg.min_agreement:
        strict = (
            ""
            if d["strict_agreement"] is None
            else f", but {d['strict_agreement']:.0%} where it is a strict preference"
        )
        notes.append(
            f"the disagreement rule (agreement < {cfg.min_agreement:g} on >= {cfg.min_consensus_pairs} pairs) did not "
            f"fire: the adversaries agree with the majority on {d['agreement']:.0%} of {d['consensus_pairs']} pairs "
            f"because ties count (an inverted judge still calls near-equal images a tie){strict}"
        )
    per_rater = d["control_votes"] / d["raters"]
    if per_rater < cfg.min_control_votes:
        notes.append(
            f"control-pair trust needs {cfg.min_control_votes} control votes per rater; the adversaries cast "
            f"{per_rater:.1f} each (pass rate {_f(d['control_pass_rate'], '.0%')})"
        )
    return ["", "Findings (defended arm): " + "; ".join(notes) + "."] if notes else []
