"""Why the loop levelled off near +0.04 on a noisy-caption base: offline rounds on a fixed set of votes, and the text
encoder's separation of the words the captions got wrong.

    python -m bench.loop_plateau --words models/shapes-ceiling models/shapes-base          # encoder probe, 10 s
    python -m bench.loop_plateau --data SNAPSHOT/train.parquet --model models/shapes-base   # offline arms, ~25 min
    python -m bench.loop_plateau --data SNAPSHOT/train.parquet --held-out LATER/eval.parquet \
        --arms round "coin 0" "coin 1" "coin 2" --steps 100 --out docs/benchmarks/loop_null_offline.json   # ~15 min
    python -m bench.loop_plateau --data LAST_ROUND/train.parquet --init-adapter RUN/adapters/v0001 --steps 100 \
        --arms round "2.5x steps" "linear lr" "beta / 2.5" "beta / 5" continue \
        --out docs/benchmarks/loop_plateau_votes.json                                               # ~15 min

`--words`: for each attribute, prompts that differ only in that attribute's word ("a large red circle ..." -> "blue",
"green", ...) go through the pipeline's text encoder; the figure is the mean pairwise L2 distance of the encoder's
outputs. The UNet (and a LoRA on its attention, all a round trains) sees only these outputs: a word the encoder no
longer separates cannot be learned back by the loop, however many votes arrive.

`--data`: one round's training run per arm (`python -m ncp.train`, the loop's settings unless the arm says otherwise)
on the same votes, each judged on the test probes (prompts and seeds nothing selects on; 95% bootstrap over prompts).
The votes are the train split of a loop run's snapshot (`python -m bench.loop --data-dir DIR`: DIR/snapshots/*/).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ncp.evaluate import TEST_PROBES, TEST_SEED_OFFSET
from ncp.shapes.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

ROOT = Path(__file__).resolve().parents[1]
WORDS = {
    "colour": ("a large {} circle in the center, white background", ("red", "blue", "green", "yellow", "purple")),
    "size": ("a {} red circle in the center, white background", ("small", "large")),
    "position": (
        "a large red circle {}, white background",
        ("on the left", "on the right", "at the top", "at the bottom"),
    ),
    "shape": ("a large red {} in the center, white background", ("circle", "square", "triangle")),
}
# Each arm: its name, what it tests, and the ncp.train flags it changes from the loop's round.
ARMS = (
    ("round", "the loop's round: NCP-DPO on the raters' labels (--steps)", []),
    ("3x steps", "600 steps: is the round short of compute?", ["--max-steps", "600"]),
    ("latent", "latent Diffusion-DPO (beta 5000): is it the NCP metric?", ["--space", "latent", "--beta", "5000"]),
    ("sft", "NCP-SFT on the chosen images", ["--objective", "sft"]),
    ("beta / 5", "beta 1e5: is the KL anchor what holds it?", ["--beta", "100000"]),
    ("beta / 25", "beta 2e4", ["--beta", "20000"]),
    # The null question (docs/research/loop-null.md): how far does a round move the model when its labels mean nothing?
    *((f"coin {s}", f"coin-flip labels, draw {s}", ["--coin-flip-labels", "--seed", str(s)]) for s in range(3)),
    # The second plateau (loop-plateau.md): is a round on many votes held by compute, optimizer noise or the anchor?
    ("2.5x steps", "250 steps", ["--max-steps", "250"]),
    ("linear lr", "the rate decayed linearly to 0: does the last steps' noise hold it?", ["--lr-schedule", "linear"]),
    ("beta / 2.5", "beta 2e5", ["--beta", "200000"]),
    ("t from 0.5 T", "timesteps from 0.5 T (the round: 0.3 T)", ["--timestep-low", "0.5"]),
    ("t from 0", "timesteps from 0 (the paper's uniform t)", ["--timestep-low", "0"]),
    # from --init-adapter (a loop's promoted version), reference the base, as the loop's later rounds train
    ("continue", "from the promoted version, as the loop's later rounds", []),
    # Pairs that hold the answer (built from --data's prompts by `oracle_pairs`, two passes over them): is the reach
    # set by what the votes contain, by the preference objective, or by what the LoRA can hold?
    ("oracle dpo", "the round on pairs that hold the answer: the ceiling's sample over the base's", []),
    (
        "oracle sft",
        "the plain diffusion loss on the ceiling's samples: can the LoRA hold the ceiling?",
        ["--objective", "sft", "--space", "latent"],
    ),  # fmt: skip
)
ORACLE_SEED = 100_000  # the oracle images' seeds: far from the test probes' (TEST_SEED_OFFSET)


def word_separation(model: str) -> dict[str, float]:
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    out = {}
    for attr, (template, values) in WORDS.items():
        ids = tok([template.format(v) for v in values], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            h = enc(ids)[0]
        d = [(h[i] - h[j]).norm().item() for i, j in itertools.combinations(range(len(values)), 2)]
        out[attr] = sum(d) / len(d)
    return out


# The loop's round when the plateau was measured (since then the shapes world trains 120 steps a round): fixed here
# so the table reruns as it ran.
ROUND = {"beta": 5e5, "lr": 2e-3, "max_steps": 200, "batch_size": 8, "timestep_low": 0.3}


def oracle_pairs(data: Path, out: Path, model: str, ceiling: str, batch: int = 16) -> int:
    """For every distinct prompt of `data`: the ceiling's image (chosen) and the base's (rejected), same seed."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ncp.pipelines import load_pipeline

    caps = sorted(set(pq.read_table(data, columns=["caption"]).column("caption").to_pylist()))
    images = {}
    for name, path in (("ceiling", ceiling), ("base", model)):
        pipe = load_pipeline(path)
        pipe.set_progress_bar_config(disable=True)
        pngs = []
        for i in range(0, len(caps), batch):
            chunk = caps[i : i + batch]
            gens = [torch.Generator().manual_seed(ORACLE_SEED + i + j) for j in range(len(chunk))]
            for im in pipe(chunk, num_inference_steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                           generator=gens).images:  # fmt: skip
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                pngs.append(buf.getvalue())
        images[name] = pngs
    table = {"caption": caps, "jpg_0": pa.array(images["ceiling"], pa.binary()),
             "jpg_1": pa.array(images["base"], pa.binary()), "label_0": [1.0] * len(caps), "label_1": [0.0] * len(caps)}  # fmt: skip
    pq.write_table(pa.table(table), out)
    return len(caps)


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def train_arm(model: str, data: Path, flags: list[str], out: Path, steps: int) -> None:
    d = ROUND | {"max_steps": steps}
    cmd = [sys.executable, "-m", "ncp.train", "--model", model, "--data", str(data), "--out", str(out),
           "--objective", "dpo", "--space", "ncp", "--beta", str(d["beta"]), "--lr", str(d["lr"]),
           "--max-steps", str(d["max_steps"]), "--batch-size", str(d["batch_size"]), "--lora-rank", "8",
           "--lora-alpha", "8", "--timestep-low", str(d["timestep_low"]), "--threads", "1", "--no-progress-bar",
           *flags]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)


def evaluate(model: str, versions: dict[str, Path], out: Path, held_out: Path | None = None) -> dict:
    cmd = [sys.executable, "-m", "ncp.evaluate", "--model", model, "--out", str(out), "--threads", "2",
           "--probe-set", "test", "--shapes-probes", str(TEST_PROBES), "--probe-seeds", "2",
           "--probe-seed-offset", str(TEST_SEED_OFFSET), "--steps", str(DEFAULT_STEPS),
           "--guidance", str(DEFAULT_GUIDANCE), "--attributes"]  # fmt: skip
    cmd += [f"--version={name}={folder}" for name, folder in versions.items()]
    if (
        held_out is not None
    ):  # the gate's evidence: implicit accuracy on the raters' held-out votes, as a round reads it
        cmd += ["--data", str(held_out), "--space", "ncp", "--timestep-low", str(ROUND["timestep_low"]),
                "--max-pairs", "512"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())


def table(result: dict) -> str:
    attrs = ("color", "size", "position", "shape", "background", "count")
    acc = result.get("eval_pairs", 0) > 0  # held-out implicit accuracy (NCP space), when --held-out was given
    head = "| arm | what it tests | gain on test probes (95% CI) | " + ("held-out acc (SE) | " if acc else "")
    rows = [head + " | ".join(attrs) + " |", "|---|---|---|" + "---|" * (len(attrs) + acc),
            "| base | | | " + ("0.500 | " if acc else "") + " | ".join(f"{result['base_attributes'][a]:.2f}" for a in attrs)
            + " |"]  # fmt: skip
    for name, what, _ in ARMS:
        v = result["versions"].get(name)
        if v:
            lo, hi = v["judge_gain_boot95"]
            held = f"{v['implicit_acc']:.3f} ({v['implicit_acc_se']:.3f}) | " if acc else ""
            rows.append(f"| {name} | {what} | {v['judge_gain_vs_base']:+.3f} ({lo:+.3f}..{hi:+.3f}) | {held}"
                        + " | ".join(f"{v['attributes'][a]:.2f}" for a in attrs) + " |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--words", nargs="+", metavar="MODEL", help="text-encoder word separation of these pipelines")
    p.add_argument("--data", type=Path, help="votes to train every arm on (a snapshot's train.parquet)")
    p.add_argument("--model", default="models/shapes-base", help="the base every arm trains from")
    p.add_argument("--arms", nargs="*", help="only these arms (default: all)")
    p.add_argument("--steps", type=int, default=ROUND["max_steps"], help="steps of an arm that does not set them")
    p.add_argument(
        "--held-out", type=Path, help="also each arm's implicit accuracy on these held-out votes (eval.parquet)"
    )
    p.add_argument(
        "--init-adapter", type=Path, help="arm 'continue': the promoted version it continues (adapters/vNNNN)"
    )
    p.add_argument("--ceiling", default="models/shapes-ceiling", help="the clean-caption model of the oracle arms")
    p.add_argument("--work", type=Path, help="folder of the arms' adapters; an arm already trained there is reused")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "loop_plateau.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.words:
        seps = {m: word_separation(m) for m in args.words}
        print("| model | " + " | ".join(WORDS) + " |\n|---|" + "---|" * len(WORDS))
        for m, s in seps.items():
            print(f"| `{m}` | " + " | ".join(f"{s[a]:.1f}" for a in WORDS) + " |")
    if args.data:
        work = args.work or Path(tempfile.mkdtemp(prefix="ncp-plateau-"))
        arms = [a for a in ARMS if not args.arms or a[0] in args.arms]
        versions = {}
        if "continue" in [a[0] for a in arms] and not args.init_adapter:
            arms = [a for a in arms if a[0] != "continue"]  # it needs the version to continue
        for name, _, flags in arms:
            if name == "continue":
                flags = ["--init-adapter", str(args.init_adapter), "--reference", "base"]
            versions[name] = work / name.replace(" ", "").replace("/", "_")
            if (versions[name] / "metrics.json").is_file():  # trained by an earlier run on the same --work
                continue
            print(f"training arm {name!r} ...", flush=True)
            data, steps = args.data, args.steps
            if name.startswith("oracle"):
                data = work / "oracle.parquet"
                n = pq_rows(data) if data.is_file() else oracle_pairs(args.data, data, args.model, args.ceiling)
                steps = math.ceil(2 * n / ROUND["batch_size"])  # two passes, the loop's max_epochs
            train_arm(args.model, data, flags, versions[name], steps)
        result = evaluate(args.model, versions, work / "eval.json", args.held_out)
        result["words"] = {m: word_separation(m) for m in (args.model,)}
        args.out.write_text(json.dumps(result, indent=1))
        print(table(result))


if __name__ == "__main__":
    main()
