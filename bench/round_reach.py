"""How far does DPO move the default base, and does more of what the loop can give move it further? Many distinct
pairs, more steps, a weaker KL anchor, training on the guided prediction the sampler follows, a second round on the
first round's own pairs (docs/research/loop-plateau.md, section `round-reach`).

    python -m bench.round_reach            # full: about 35 min on this 2-core CPU (2 workers)
    python -m bench.round_reach --quick    # every phase on a tiny budget (about 2 min), used by a test

Data: two images of the default base per training prompt (none a gate or test probe; `bench.ncp_vs_latent`'s
`Bench.make_data`), labelled by the judge, ties dropped: one distinct comparison per prompt, where the live loop rates
each pair about six times. The second round's pairs come the same way from the first round's adapter on other
prompts (on-policy). Every arm is `python -m ncp.train` with the loop's round settings (LoRA rank 8 on attention,
lr 2e-3, batch 8, t >= 0.3 T) and one change; every adapter is judged by `python -m ncp.evaluate --probe-set test`
(96 prompts x 2 seeds nothing here selected on; 95% bootstrap over prompts).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from bench.docs import ROOT, write_section
from bench.ncp_vs_latent import Bench, Mode, training_prompts
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_ROUND_LR, DEFAULT_STEPS, DEFAULT_TIMESTEP_LOW

PAGE = ROOT / "docs" / "research" / "loop-plateau.md"
NCP_BETA, LATENT_BETA = 5e5, 5e3  # the loop's NCP beta; latent DPO's tuned beta (bench.ncp_vs_latent)


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    steps: int
    space: str
    beta: float
    extra: tuple[str, ...] = ()
    # "base": the base's pairs; "color": the same pairs labelled by colour alone; "round2": the first round's pairs
    data: str = "base"
    parent: str = ""  # the arm whose adapter this one continues (and is compared with, paired)


def arms(steps: int) -> list[Arm]:
    """The round (`steps` NCP-DPO steps) and one change each. 4x steps passes once over the full set's pairs."""
    long = 4 * steps
    guided = ("--train-guidance", str(DEFAULT_GUIDANCE))
    return [
        Arm("ncp", "the loop's round: NCP-DPO", steps, "ncp", NCP_BETA),
        Arm("ncp-4x", "4x steps", long, "ncp", NCP_BETA),
        Arm("latent", "latent Diffusion-DPO", steps, "latent", LATENT_BETA),
        Arm("latent-4x", "latent, 4x steps", long, "latent", LATENT_BETA),
        Arm("latent-4x-b1k", "latent, 4x steps, beta / 5", long, "latent", LATENT_BETA / 5),
        Arm("guided-4x", "latent, 4x steps, on the guided prediction (g 4)", long, "latent", LATENT_BETA, guided),
        Arm("guided-4x-b1k", "guided, beta / 5", long, "latent", LATENT_BETA / 5, guided),
        Arm("guided-4x-b200", "guided, beta / 25", long, "latent", LATENT_BETA / 25, guided),
        Arm(
            "color-labels", "the round on the same pairs labelled by colour alone", steps, "ncp", NCP_BETA, (), "color"
        ),
        Arm(
            "round2-init",
            "a second round from `ncp` on its own pairs, DPO reference `ncp`",
            steps,
            "ncp",
            NCP_BETA,
            ("--reference", "init"),
            "round2",
            "ncp",
        ),  # fmt: skip
        Arm(
            "round2-base",
            "the same, reference the base",
            steps,
            "ncp",
            NCP_BETA,
            ("--reference", "base"),
            "round2",
            "ncp",
        ),  # fmt: skip
    ]


@dataclass(frozen=True)
class Budget:
    prompts: int
    round2_prompts: int
    steps: int
    test_probes: int
    test_seeds: int
    names: tuple[str, ...] = ()  # a subset of the arms (empty: all)


BUDGETS = {
    "full": Budget(2400, 1000, 100, 96, 2),
    "quick": Budget(40, 24, 4, 8, 1, ("ncp", "guided-4x", "color-labels", "round2-init")),
}


def make_pairs(model: str, work: Path, prompts: list[str], adapter: str = "") -> dict:
    """Judge-labelled pairs of the base (or of `adapter` on it) for `prompts`, as `work/train.parquet`."""
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(model, Mode(len(prompts), 0, 1, 1, 1, (1,), 1, (1.0,), 1), work)
    bench.train_prompts = prompts
    if adapter:
        bench.pipe.load_lora_weights(adapter, adapter_name="round1")
    t0 = time.time()
    info = bench.make_data()
    return {**info, "minutes": round((time.time() - t0) / 60, 1)}


def relabel(src: Path, dst: Path, attribute: str, margin: float = 0.05) -> dict:
    """The pairs of `src` labelled by one attribute's graded judge score alone (a tie within `margin`): is an attribute
    that the overall label mixes with others learned when the label speaks of it only?"""
    from ncp.shapes.judge import score

    table = pq.read_table(src).to_pydict()
    for i, (p, a, b) in enumerate(zip(table["caption"], table["jpg_0"], table["jpg_1"], strict=True)):
        d = getattr(score(Image.open(io.BytesIO(a)), p), attribute) - getattr(
            score(Image.open(io.BytesIO(b)), p), attribute
        )
        table["label_0"][i] = 1.0 if d > margin else 0.0 if d < -margin else 0.5
        table["label_1"][i] = 1.0 - table["label_0"][i]
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), dst / "train.parquet")
    return {"attribute": attribute, "pairs": sum(v != 0.5 for v in table["label_0"])}


def _run(cmd: list[str], log: Path) -> None:
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")


def train(arm: Arm, model: str, work: Path) -> None:
    parent = ("--init-adapter", str(work / arm.parent)) if arm.parent else ()
    cmd = [sys.executable, "-m", "ncp.train", "--model", model, "--data", str(work / arm.data / "train.parquet"),
           "--out", str(work / arm.name), "--objective", "dpo", "--space", arm.space, "--beta", str(arm.beta),
           "--lr", str(DEFAULT_ROUND_LR), "--timestep-low", str(DEFAULT_TIMESTEP_LOW), "--max-steps", str(arm.steps),
           "--batch-size", "8", "--lora-rank", "8", "--lora-alpha", "8", "--threads", "1", "--no-progress-bar",
           "--latent-cache-dir", str(work / "latents"), *parent, *arm.extra]  # fmt: skip
    _run(cmd, work / f"{arm.name}.train.log")


def evaluate(versions: list[str], model: str, work: Path, b: Budget, guidance: float, tag: str) -> dict:
    """Test-probe judge of the named adapters (and the base) in one `ncp.evaluate` run: paired deltas between them."""
    out = work / f"eval-{tag}.json"
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", model, "--probe-set", "test",
           "--shapes-probes", str(b.test_probes), "--probe-seeds", str(b.test_seeds), "--probe-seed-offset", "5000",
           "--steps", str(DEFAULT_STEPS), "--guidance", str(guidance), "--attributes", "--threads", "1",
           "--out", str(out), *[f"--version={v}={work / v}" for v in versions]]  # fmt: skip
    _run(cmd, work / f"eval-{tag}.log")
    return json.loads(out.read_text())


def run(mode: str, model: str, work: Path, workers: int, draw: int = 0) -> dict:
    b = BUDGETS[mode]
    chosen = [a for a in arms(b.steps) if not b.names or a.name in b.names]
    t0 = time.time()
    n = b.prompts + b.round2_prompts
    prompts = training_prompts(n, skip=draw * n)  # another draw: other prompts (and so other images and labels)
    data = {"base": make_pairs(model, work / "base", prompts[: b.prompts])}
    if any(a.data == "color" for a in chosen):
        data["color"] = relabel(work / "base" / "train.parquet", work / "color", "color")
    pool = ThreadPoolExecutor(workers)
    first = [a for a in chosen if a.data in ("base", "color")]
    list(pool.map(lambda a: train(a, model, work), first))
    if any(a.data == "round2" for a in chosen):
        data["round2"] = make_pairs(model, work / "round2", prompts[b.prompts :], str(work / "ncp"))
        list(pool.map(lambda a: train(a, model, work), [a for a in chosen if a.data == "round2"]))
    # Each arm alone, except a continued round with its parent (their paired delta); the collapsed latent arm also at
    # guidance 1 (is the collapse the sampler's guidance amplifying the tilt?).
    groups = [[a.name] for a in chosen if not a.parent and a.name != "ncp"]
    groups.append(["ncp", *[a.name for a in chosen if a.parent]])
    jobs = [(g, DEFAULT_GUIDANCE, g[0]) for g in groups]
    if "latent-4x-b1k" in [a.name for a in chosen]:
        jobs.append((["latent-4x-b1k", "latent-4x"], 1.0, "g1"))
    evals = list(pool.map(lambda j: (j, evaluate(j[0], model, work, b, j[1], j[2])), jobs))
    return {"mode": mode, "draw": draw, "model": Path(model).name, "budget": b.__dict__, "data": data,
            "arms": [a.__dict__ for a in chosen], "evals": [{"versions": j[0], "guidance": j[1], **e} for j, e in evals],
            "minutes": round((time.time() - t0) / 60, 1), "rerun": "python -m bench.round_reach"
            + (" --quick" if mode == "quick" else "") + (f" --draw {draw}" if draw else "")}  # fmt: skip


def markdown(results: list[dict]) -> str:
    """One row per arm (and probe guidance), its gain in every draw of the data side by side; attributes: the mean
    over draws. A single round's gain moves by several hundredths between draws, so an arm is read over all of them."""
    first = results[0]
    arms_by = {a["name"]: a for r in results for a in r["arms"]}
    b, data = first["budget"], first["data"]
    lines = [
        "### The arms, over draws of the data (`bench/round_reach.py`)",
        "",
        f"Mode {first['mode']}, `{first['model']}`; per draw of the data: {data['base']['pairs']} judge-labelled "
        f"distinct pairs of the base ({data['base']['prompts']} training prompts, none a probe)"
        + (f", {data['round2']['pairs']} of the first round's adapter on {data['round2']['prompts']} other prompts"
           if "round2" in data else "")
        + (f"; {data['color']['pairs']} of the base's pairs differ in colour" if "color" in data else "")
        + f" (draw {first.get('draw', 0)}). Test probes: {b['test_probes']} prompts x {b['test_seeds']} seed(s), "
        "95% bootstrap over prompts. "
        + "; ".join(f"draw {r.get('draw', 0)}: {r['minutes']} min, `{r['rerun']}`" for r in results)
        + ". Raw numbers in `docs/benchmarks/round_reach*.json`.",
        "",
        "| arm | what changes | steps | beta | probes' guidance | "
        + " | ".join(f"gain, draw {r.get('draw', 0)} (95% CI)" for r in results)
        + " | color | size | position | shape | background | count |",
        "|---|---|---|---|---|" + "---|" * len(results) + "---|---|---|---|---|---|",
    ]  # fmt: skip
    rows: dict[tuple[str, float], list] = {}
    for i, r in enumerate(results):
        for e in r["evals"]:
            for name, v in e["versions"].items():
                rows.setdefault((name, e["guidance"]), [None] * len(results))[i] = (v, e["base_judge"])
    order = list(arms_by)
    for (name, g), cells in sorted(rows.items(), key=lambda kv: (kv[0][1] != DEFAULT_GUIDANCE, order.index(kv[0][0]))):
        a, got = arms_by[name], [c for c in cells if c is not None]
        gains = [
            "" if c is None else f"{c[0]['judge_gain_vs_base']:+.3f} ({c[0]['judge_gain_boot95'][0]:+.3f}.."
            f"{c[0]['judge_gain_boot95'][1]:+.3f})" for c in cells
        ]  # fmt: skip
        attrs = [sum(c[0]["attributes"][k] for c in got) / len(got)
                 for k in ("color", "size", "position", "shape", "background", "count")]  # fmt: skip
        base = sum(c[1] for c in got) / len(got)
        lines.append(f"| {name} | {a['what']} | {a['steps']} | {a['beta']:g} | {g:g} (base {base:.3f}) | "
                     + " | ".join(gains) + " | " + " | ".join(f"{x:.2f}" for x in attrs) + " |")  # fmt: skip
    paired = []
    for r in results:
        for e in r["evals"]:
            if "ncp" in e["versions"]:  # the continued rounds were judged with their parent
                paired += [f"{pair} {d['judge_delta']:+.3f} (paired SE {d['judge_delta_se']:.3f}, draw "
                           f"{r.get('draw', 0)})" for pair, d in e.get("paired", {}).items()]  # fmt: skip
    if paired:
        lines += ["", "Second round against the first, same probe images: " + "; ".join(paired) + "."]
    return "\n".join(lines)


def draws(out: Path) -> list[dict]:
    """Every draw's result kept beside `out` (STEM.json is draw 0, STEM_drawK.json the others), by draw."""
    found = [out, *sorted(out.parent.glob(f"{out.stem}_draw*.json"))]
    return sorted((json.loads(p.read_text()) for p in found if p.exists()), key=lambda r: r.get("draw", 0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="every phase on a tiny budget")
    p.add_argument("--model", default=str(ROOT / "models" / "shapes-base"))
    p.add_argument("--work", type=Path, default=None, help="work dir (default runs/round-reach-MODE)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "round_reach.json")
    p.add_argument("--doc", type=Path, default=PAGE, help="file the section goes into")
    p.add_argument("--workers", type=int, default=2, help="parallel training / evaluation processes (1 thread each)")
    p.add_argument("--draw", type=int, default=0, help="K > 0: another draw of the training prompts, kept as "
                   "STEM_drawK.json beside --out and shown beside draw 0")  # fmt: skip
    p.add_argument("--render", action="store_true", help="only rewrite the section from the draws beside --out")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.render:
        mode = "quick" if args.quick else "full"
        work = args.work or ROOT / "runs" / (f"round-reach-{mode}" + (f"-draw{args.draw}" if args.draw else ""))
        result = run(mode, args.model, work, args.workers, args.draw)
        path = args.out if not args.draw else args.out.with_name(f"{args.out.stem}_draw{args.draw}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    text = markdown(draws(args.out))
    write_section(args.doc, "round-reach", text)
    print(text)


if __name__ == "__main__":
    main()
