"""Reliability of the deployed app (issue 8, "Must show"): load, crash, bad input, poisoning.

    python -m bench.reliability                         # all four parts, full sizes (hours on a 2-core CPU)
    python -m bench.reliability --quick                 # all four, small sizes (about 10 min here)
    python -m bench.reliability --part load --part crash [--quick]   # some parts; the others keep their results
    python -m bench.reliability --part poisoning --model runs/shapes-headroom   # poisoning on another base

1. load (bench/reliability_http.py): N gradio_client raters vote through the real server (`python app.py` in a
   subprocess) while an admin client hot-swaps the adapter every 10 s and runs a training round; then the DuckDB file
   is read: zero failed requests, every acknowledged vote stored exactly once; latency percentiles.
2. crash: the same load, the server's process group SIGKILLed in the middle and restarted on the same data dir;
   every acknowledged vote survives and the restarted app serves the registry's current version.
3. bad_input (bench/bad_input.py): malformed and hostile requests, each refused with a clear message, nothing stored
   changed (tests/test_bad_input.py runs the same cases in CI).
4. poisoning (bench/poisoning.py): 20% adversarial raters; the loop's judge-score gain without and with the defences
   against a clean run (goal: defended >= 80% of clean).

Writes docs/benchmarks/reliability.json (per part: results and the exact settings, merged into what is there) and
renders docs/RELIABILITY.md from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench import bad_input, poisoning, reliability_http
from bench.reliability_render import render
from jobs.registry import file_sha256
from jobs.runtime import SHAPES_MODEL

ROOT = Path(__file__).resolve().parents[1]


def unet_file(model: Path) -> Path:
    return model / "unet" / "diffusion_pytorch_model.safetensors"


SHAPES_UNET = unet_file(SHAPES_MODEL)
PARTS = ("load", "crash", "bad_input", "poisoning")
QUICK_LOOP = {"max_steps": 10, "shapes_probes": 4, "probe_seeds": 1}  # a round of about a minute here

# Full size: each pool pair rated by up to 8 of the 32 raters (a crowd arena's setting), so the one-core generator
# makes 1,200 pairs for the 9,600 votes instead of 2,400 (about 15 min instead of 30 per part on this CPU).
FULL = {
    "load": reliability_http.LoadSettings(clients=32, votes=300, ratings_per_pair=8),
    "crash": reliability_http.LoadSettings(clients=32, votes=300, crash_after=0.5, ratings_per_pair=8),
    "poisoning": poisoning.PoisonSettings(),
}
QUICK = {
    "load": reliability_http.LoadSettings(clients=8, votes=30, loop_overrides=QUICK_LOOP),
    "crash": reliability_http.LoadSettings(clients=8, votes=30, crash_after=0.5, loop_overrides=QUICK_LOOP),
    # 5 raters (1 adversary) so each casts enough votes in one round for the review's rules to judge it.
    "poisoning": poisoning.PoisonSettings(
        raters=5, rounds=1, votes_per_round=150, max_steps=20, probes=8, probe_seeds=1, replicates=1
    ),
}


def run_part(part: str, quick: bool, work: Path, model: Path = SHAPES_MODEL) -> dict:
    settings = (QUICK if quick else FULL).get(part)
    if part == "poisoning":
        settings = dataclasses.replace(settings, model=str(model))
    t0 = time.time()
    if part in ("load", "crash"):
        out = reliability_http.run(settings, work / part)
    elif part == "bad_input":
        with bad_input.BadInputServer(work / part) as srv:
            rows = bad_input.run_cases(srv)
        out = {"settings": {"model": "shapes-base", "steps": 2, "server": "in-process demo.launch"}, "cases": rows}
    else:
        out = poisoning.replicate(settings, work / part)
    out["mode"] = "quick" if quick else "full"
    out["part_wall_s"] = time.time() - t0
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", choices=PARTS, help="run only this part (repeatable); default: all")
    p.add_argument("--quick", action="store_true", help="small sizes: minutes instead of hours")
    p.add_argument("--work", type=Path, default=None, help="folder for the data dirs (default: a temp folder)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "reliability.json")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "RELIABILITY.md")
    p.add_argument("--render-only", action="store_true", help="only re-render the doc from the JSON")
    p.add_argument(
        "--model", type=Path, default=SHAPES_MODEL, help="poisoning: the base model (e.g. one with headroom)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    torch.set_num_threads(1)
    result = json.loads(args.out.read_text()) if args.out.exists() else {"parts": {}}
    if not args.render_only:
        work = args.work or Path(tempfile.mkdtemp(prefix="ncp-reliability-"))
        for part in args.part or PARTS:
            logging.info("reliability part %s (%s)", part, "quick" if args.quick else "full")
            result["parts"][part] = run_part(part, args.quick, work, args.model)
            result["parts"][part]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            unet = unet_file(args.model) if part == "poisoning" else SHAPES_UNET  # only poisoning takes --model
            result["parts"][part]["shapes_unet_sha256"] = file_sha256(unet)[:16]  # which shapes model ran
            result["machine"] = f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s) here"
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))  # after every part: nothing lost
            args.doc.write_text(render(result))
    args.doc.write_text(render(result))


def settings_of(part: str, quick: bool) -> dict:
    """The settings a part would run with (for the docs' "how to rerun")."""
    s = (QUICK if quick else FULL).get(part)
    return dataclasses.asdict(s) if s is not None else {}


if __name__ == "__main__":
    main()
