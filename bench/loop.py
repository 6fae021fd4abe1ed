"""The live loop, measured: the real app on the shapes world, simulated raters voting over HTTP, scheduled NCP-DPO
rounds gated by the judge, hot-swapped while the raters keep voting.

    python -m bench.loop --raters 8 --votes 2000 --minutes 30
    python -m bench.loop --render docs/benchmarks/loop.json     # rewrite the doc section and plot from the JSON

For every round: its status, wall time, the candidate's judge score on the fixed probe set (prompts x seeds,
disjoint from the raters' prompt pool) against the base model's, with a 95% CI of the paired gain; at the end the
Bradley-Terry win rate of every version against the base from the raters' cross-version votes. Writes
docs/benchmarks/loop_default.json, docs/loop_default.png and the `loop-default` section of docs/BENCHMARKS.md (another
base, `--name NAME`: its section in docs/research/live-loop-on-detuned-bases.md).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: the loop runs headless
import torch  # noqa: E402

from app import build_demo, launch_kwargs  # noqa: E402
from bench import loop_arms  # noqa: E402
from bench import loop_test_report as test_report  # noqa: E402
from bench.loop_report import (  # noqa: E402, F401 - re-exported: the report's names stay importable from here
    GAIN_GOAL,
    LEGACY_CONFIG,
    RERUN_DEFAULTS,
    ROUND_GOAL_S,
    WITHIN_S,
    goals,
    markdown,
    publish,
    served_round,
)
from bench.net import free_port  # noqa: E402
from bench.raters import run_raters  # noqa: E402
from feedback_store import FeedbackStore  # noqa: E402
from feedback_store.stats import leaderboard  # noqa: E402
from jobs.loop import LoopConfig  # noqa: E402
from jobs.loop_config import SPACE_BETA  # noqa: E402
from jobs.registry import AdapterRegistry  # noqa: E402
from jobs.runtime import SHAPES_CEILING, SHAPES_MODEL, ArenaConfig, Runtime  # noqa: E402
from ncp.evaluate import TEST_PROBES, TEST_SEED_OFFSET  # noqa: E402
from ncp.serving import PairMix, SamplingConfig  # noqa: E402
from ncp.shapes.model import DEFAULT_GATE_JUDGE_VETO, DEFAULT_GUIDANCE, DEFAULT_STEPS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def round_row(last: dict, t_start: float, votes: int) -> dict:
    ev = last.get("metrics", {}).get("eval", {})
    cand = ev.get("versions", {}).get("candidate", {})
    return {
        "status": last["status"],
        "reason": last["reason"],
        "version": last.get("version"),
        "parent": last.get("parent"),
        "round_s": last.get("seconds"),
        "finished_at_s": time.time() - t_start,
        "votes": votes,
        "pairs": last.get("metrics", {}).get("pairs"),
        "init": last.get("metrics", {}).get("init_adapter"),  # the weights the round started from
        "judge": cand.get("judge"),
        "base_judge": ev.get("base_judge"),
        "gain_vs_base": cand.get("judge_gain_vs_base"),
        "gain_ci95": cand.get("judge_gain_ci"),
        "implicit_acc": cand.get("implicit_acc"),
        # The gate's evidence: the paired accuracy change and its SE over rows and over prompts (what the rule reads).
        "gate_evidence": {
            k: ev.get("paired", {}).get("candidate-serving", {}).get(k)
            for k in ("acc_delta", "acc_delta_se", "acc_delta_se_prompts")
        }
        | {k: cand.get(k) for k in ("implicit_acc_se", "implicit_acc_se_prompts")}  # against the base (acc 0.5)
        | {"eval_pairs": ev.get("eval_pairs"), "eval_prompts": ev.get("eval_prompts")},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raters", type=int, default=RERUN_DEFAULTS["raters"])
    p.add_argument("--votes", type=int, default=RERUN_DEFAULTS["votes"], help="total votes across raters")
    p.add_argument("--minutes", type=float, default=RERUN_DEFAULTS["minutes"], help="wall-clock budget")
    p.add_argument("--pace", type=float, default=RERUN_DEFAULTS["pace"], help="seconds each rater looks at a pair")
    p.add_argument(
        "--overflow",
        action=argparse.BooleanOptionalAction,
        default=RERUN_DEFAULTS["overflow"],
        help="let the arena show a pair beyond its 3 ratings when the raters outpace the generator (the app's "
        "default). Off by default here: bots sharing one judge outpace this CPU about 6:1, so every pair went to 6 "
        "raters who all agree, and 2,000 votes held 334 distinct comparisons (docs/research/votes-vs-pairs.md)",
    )
    p.add_argument("--train-every", type=float, default=RERUN_DEFAULTS["train_every"])
    p.add_argument("--min-new-votes", type=int, default=RERUN_DEFAULTS["min_new_votes"])
    p.add_argument(
        "--min-pairs",
        type=int,
        default=RERUN_DEFAULTS["min_pairs"],
        help="pairs a round needs (with --train-window serving: of the served version's own images)",
    )
    p.add_argument("--max-steps", type=int, default=RERUN_DEFAULTS["max_steps"])
    p.add_argument(
        "--max-pair-passes",
        type=float,
        default=RERUN_DEFAULTS["max_pair_passes"],
        help="cap a round at this many passes over its distinct image pairs (0: none; docs/research/round-space.md: "
        "NCP-DPO turns down after ~1.5); give the run its own --name",
    )
    p.add_argument("--batch-size", type=int, default=RERUN_DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=RERUN_DEFAULTS["lr"])
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="DPO beta (default: the space's own scale, SPACE_BETA: latent errors are ~100x NCP's, METHOD.md)",
    )
    p.add_argument("--objective", default=RERUN_DEFAULTS["objective"])
    p.add_argument(
        "--continue-rejected",
        type=int,
        default=RERUN_DEFAULTS["continue_rejected"],
        help="rounds in a row a rejected candidate seeds the next (0: always from the served version)",
    )
    p.add_argument(
        "--space",
        choices=("latent", "ncp"),
        default=RERUN_DEFAULTS["space"],
        help="where a round's DPO errors are measured; the latent arm keeps every other setting, its beta its own, "
        "and writes loop_NAME_latent.json and its own section",
    )
    p.add_argument(
        "--timestep-low",
        type=float,
        default=RERUN_DEFAULTS["timestep_low"],
        help="lowest training timestep, a fraction of the schedule (the shapes world's default; 0: uniform t)",
    )
    p.add_argument(
        "--reference",
        choices=("base", "init"),
        default=RERUN_DEFAULTS["reference"],
        help="DPO reference of a round that continues an adapter: the base, or that adapter (iterative DPO)",
    )
    p.add_argument(
        "--train-window",
        choices=("all", "serving"),
        default=RERUN_DEFAULTS["train_window"],
        help="votes a round trains on: all, or only the served version's own pairs (on-policy)",
    )
    p.add_argument("--probes", type=int, default=RERUN_DEFAULTS["probes"], help="judge probe prompts")
    p.add_argument(
        "--probe-seeds", type=int, default=RERUN_DEFAULTS["probe_seeds"], help="seeds per probe prompt at the gate"
    )
    p.add_argument(
        "--gate",
        choices=("votes", "judge"),
        default=RERUN_DEFAULTS["gate"],
        help="votes: promote on held-out implicit accuracy beyond noise, the judge vetoing a fall (as the app); "
        "judge: promote when the judge does not fall and accuracy is no worse (the rule before the null arm failed)",
    )
    p.add_argument(
        "--gate-acc-z",
        type=float,
        default=RERUN_DEFAULTS["gate_acc_z"],
        help="the held-out accuracy criterion rejects only a drop beyond its margin by this many paired standard "
        "errors (0: the point estimate)",
    )
    p.add_argument(
        "--gate-min-eval-pairs",
        type=int,
        default=RERUN_DEFAULTS["gate_min_eval_pairs"],
        help="held-out pairs before implicit accuracy gates (as the app)",
    )
    p.add_argument(
        "--eval-max-pairs",
        type=int,
        default=RERUN_DEFAULTS["eval_max_pairs"],
        help="the gate scores implicit accuracy on the newest N held-out pairs (as the app)",
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=RERUN_DEFAULTS["eval_fraction"],
        help="share of prompts whose votes are held out for the gate (as the app)",
    )
    p.add_argument(
        "--confirm-seeds",
        type=int,
        default=RERUN_DEFAULTS["confirm_seeds"],
        help="after the run, judge the served version on this many fresh seeds per probe prompt (0: skip)",
    )
    p.add_argument("--model", default=str(SHAPES_MODEL), help="the served base (default: the embedded default base)")
    p.add_argument(
        "--ceiling",
        default=str(SHAPES_CEILING),
        help="the model the base-to-ceiling gap is measured against (the same world pretrained on clean captions)",
    )
    p.add_argument(
        "--null",
        action="store_true",
        help="null arm: every rater label the loop reads (training pairs and the gate's held-out pairs) replaced by a "
        "coin flip (the same loop, gate and schedule), so any test-probe gain it reports is manufactured from noise",
    )
    p.add_argument(
        "--test-probes", type=int, default=TEST_PROBES, help="test probe prompts (never seen by gate or raters)"
    )
    p.add_argument("--test-seeds", type=int, default=2, help="seeds per test probe prompt (from TEST_SEED_OFFSET)")
    p.add_argument(
        "--replicate",
        type=int,
        default=0,
        help="N > 0: another run of the same command, kept as STEM_replicateN.json and shown in its main run's section",
    )
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="result JSON (default docs/benchmarks/loop[_NAME].json)")
    p.add_argument("--name", default="", help="another base: its own section `loop-NAME`, plot and JSON")
    p.add_argument("--render", type=Path, help="only rewrite the plot and the doc section from this result file")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with beta defaulting to the chosen space's own."""
    args = parser().parse_args(argv)
    if args.beta is None:
        args.beta = SPACE_BETA[args.space]
    return args


def result_stem(args: argparse.Namespace) -> str:
    """loop_NAME[_latent][_null][_replicateN]: a latent arm never overwrites the NCP run it is compared with, and a
    replicate never the run its section shows."""
    return (
        "loop_"
        + (args.name or "default")
        + ("_latent" if args.space == "latent" else "")
        + ("_null" if args.null else "")
        + (f"_replicate{args.replicate}" if args.replicate else "")
    )


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    stem = result_stem(args)
    if args.render:
        stem = args.render.stem
    args.out = args.out or ROOT / "docs" / "benchmarks" / f"{stem}.json"
    if args.render:
        _publish(json.loads(args.render.read_text()), stem)
        return
    torch.set_num_threads(1)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="ncp-loop-"))
    loop = LoopConfig(
        model=args.model,
        train_every_s=args.train_every,
        min_new_votes=args.min_new_votes,
        min_pairs=args.min_pairs,
        max_steps=args.max_steps,
        max_pair_passes=args.max_pair_passes,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        objective=args.objective,
        continue_rejected=args.continue_rejected,
        timestep_low=args.timestep_low,
        reference=args.reference,
        train_window=args.train_window,
        space=args.space,
        shapes_probes=args.probes,
        probe_seeds=args.probe_seeds,
        gate_acc_z=args.gate_acc_z,
        time_limit_s=300,
        eval_time_limit_s=240,
        gate_min_eval_pairs=args.gate_min_eval_pairs,
        eval_max_pairs=args.eval_max_pairs,
        eval_fraction=args.eval_fraction,
        probe_steps=DEFAULT_STEPS,
        probe_guidance=DEFAULT_GUIDANCE,
        keep_versions=1000,  # every promoted version stays on disk: each is measured on the test probes at the end
        coin_flip_labels=args.null,
        gate_require_acc_gain=args.gate == "votes",
        gate_min_judge_delta=DEFAULT_GATE_JUDGE_VETO if args.gate == "votes" else 0.0,
    )
    config = ArenaConfig(
        data_dir=data_dir,
        model=args.model,
        loop=loop,
        schedule=True,
        prefetch=8,
        overflow_wait_s=ArenaConfig().overflow_wait_s if args.overflow else None,
        sampling=SamplingConfig(steps=DEFAULT_STEPS),
        mix=PairMix(on_policy=0.6, cross_version=0.35, control=0.05),
    )
    rt = Runtime(config)
    rt.start()
    demo = build_demo(rt)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs(rt))
    stop = threading.Event()
    summary: dict = {}
    per_rater = max(1, args.votes // args.raters)
    raters = threading.Thread(
        target=lambda: summary.update(
            run_raters(f"http://127.0.0.1:{port}", args.raters, per_rater, pace_s=args.pace, stop=stop)
        ),
        daemon=True,
    )
    t0 = time.time()
    raters.start()
    rounds: list[dict] = []
    seen = None
    try:
        while time.time() - t0 < 60 * args.minutes:
            time.sleep(2)
            last = rt.loop.status.last
            if last is not None and last is not seen:
                seen = last
                if last["status"] == "skipped":  # a round that waited for pairs (train_window serving) trained nothing
                    continue
                rounds.append(round_row(last, t0, rt.store.counts()["votes"]))
                print(json.dumps(rounds[-1]), flush=True)
            if not raters.is_alive() and rt.loop.status.state == "idle" and time.time() - t0 > 60:
                break
    finally:
        stop.set()
        raters.join(timeout=120)
        demo.close()
        rt.stop()
    store = FeedbackStore(data_dir / "arena.duckdb")
    board = leaderboard(store.cross_version_comparisons(), min_votes=10)
    store.close()
    budget = data_budget(data_dir / "arena.duckdb", (1000, 2000, 4000, args.votes))
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "replicate")}
        | {"cpu": "2-core CPU", "gate_se": "prompts"},  # jobs.gate reads the prompt-clustered SE
        "wall_s": time.time() - t0,
        "rounds": rounds,
        "leaderboard": board.rows(),
        "raters": {k: v for k, v in summary.items() if k != "vote_ids"},
        "data_budget": budget,
    }
    if args.test_probes:
        result["test"] = test_eval(args, data_dir, rounds)
    served = served_round(rounds)
    if served is not None and args.confirm_seeds:
        result["confirm"] = confirm(args.model, data_dir, served["version"], args.probes, args.confirm_seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    _publish(result, stem)


def data_budget(db: Path, marks: tuple[int, ...]) -> list[dict]:
    """What the first N votes hold, for each N in `marks`: distinct image pairs (one comparison rated by several
    raters is one pair) and distinct prompts. Votes are not comparisons: a pair shown to k raters is k votes."""
    import duckdb

    sql = """SELECT count(*), count(DISTINCT (least(left_image_id, right_image_id), greatest(left_image_id,
             right_image_id))), count(DISTINCT prompt_id)
             FROM (SELECT p.* FROM votes v JOIN pairs p USING (pair_id) ORDER BY v.vote_id LIMIT ?)"""
    con = duckdb.connect(str(db), read_only=True)
    try:
        total = con.execute("SELECT count(*) FROM votes").fetchone()[0]
        rows = [con.execute(sql, [n]).fetchone() for n in sorted({min(n, total) for n in marks})]
    finally:
        con.close()
    return [{"votes": v, "distinct_pairs": p, "prompts": q} for v, p, q in rows]


def _publish(result: dict, stem: str) -> None:
    """Runs measured on the test probes get the out-of-the-box report (a null arm re-renders its main run's section);
    older results keep the report they were published with."""
    if "test" not in result:
        publish(result, "loop" if stem == "loop_default" else stem)
        return
    main_stem = re.sub(r"_replicate\d+$", "", stem).removesuffix("_null")
    main_json = ROOT / "docs" / "benchmarks" / f"{main_stem}.json"
    if main_stem in loop_arms.ARMS.values():  # the default command and its latent arm: compared in `loop-arms`
        loop_arms.publish()
    if main_stem == loop_arms.ARMS["latent DPO"] or (stem != main_stem and not main_json.exists()):
        return  # the latent arm is shown beside the NCP runs, a null arm beside its main run: no section of their own
    test_report.publish(json.loads(main_json.read_text()) if stem != main_stem else result, main_stem)


def _evaluate(model: str, versions: dict[str, Path], args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", model, "--out", str(out), "--threads", "2",
           "--probe-set", "test", "--shapes-probes", str(args.test_probes), "--probe-seeds", str(args.test_seeds),
           "--probe-seed-offset", str(TEST_SEED_OFFSET), "--steps", str(DEFAULT_STEPS),
           "--guidance", str(DEFAULT_GUIDANCE), "--attributes"]  # fmt: skip
    cmd += [f"--version={name}={folder}" for name, folder in versions.items()]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())


def test_eval(args: argparse.Namespace, data_dir: Path, rounds: list[dict]) -> dict:
    """Base, ceiling and every promoted version on the test probes: prompts (ncp.evaluate.test_probe_prompts) and
    seeds (from TEST_SEED_OFFSET) that neither the gate, the raters nor training ever saw, so no figure here was
    selected on. Gains carry a 95% bootstrap interval over prompts (a prompt's images form one cluster)."""
    registry = AdapterRegistry(data_dir / "adapters")
    promoted = [r["version"] for r in rounds if r["status"] == "promoted" and r["version"]]
    versions = {v: registry.info(v).folder for v in promoted}
    ev = _evaluate(args.model, versions, args, data_dir / "test_eval.json")
    out = {"probes": args.test_probes, "seeds": args.test_seeds, "seed_offset": TEST_SEED_OFFSET,
           "base_judge": ev["base_judge"], "base_attributes": ev.get("base_attributes"),
           "versions": {v: ev["versions"][v] for v in versions}}  # fmt: skip
    if args.ceiling and Path(args.ceiling).exists():
        cev = _evaluate(args.ceiling, {}, args, data_dir / "test_eval_ceiling.json")
        out["ceiling"], out["ceiling_attributes"] = cev["base_judge"], cev.get("base_attributes")
    return out


CONFIRM_SEED_OFFSET = 1000  # fresh probe images: the gate judged seeds 0..probe_seeds-1


def confirm(model: str, data_dir: Path, version: str, probes: int, seeds: int) -> dict:
    """The served version against the base on fresh images of the same probe prompts (seeds the gate never saw).

    The gate promotes a candidate when its probe score beats the served one's, so the promoted version's score on
    those very probes is selected on its own noise and can read high (the winner's curse); fresh seeds cannot."""
    out = data_dir / "confirm.json"
    folder = AdapterRegistry(data_dir / "adapters").info(version).folder
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", model, "--out", str(out), "--threads", "2",
           "--version", f"served={folder}", "--shapes-probes", str(probes), "--probe-seeds", str(seeds),
           "--probe-seed-offset", str(CONFIRM_SEED_OFFSET), "--steps", str(DEFAULT_STEPS),
           "--guidance", str(DEFAULT_GUIDANCE), "--attributes"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    ev = json.loads(out.read_text())
    row = ev["versions"]["served"]
    return {"version": version, "seeds": seeds, "seed_offset": CONFIRM_SEED_OFFSET, "judge": row["judge"],
            "base_judge": ev["base_judge"], "gain_vs_base": row["judge_gain_vs_base"],
            "gain_ci95": row["judge_gain_ci"], "attributes": row.get("attributes"),
            "base_attributes": ev.get("base_attributes")}  # fmt: skip


if __name__ == "__main__":
    main()
