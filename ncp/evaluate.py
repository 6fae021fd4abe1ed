"""Evaluate adapter versions for the promotion gate: implicit reward accuracy on held-out pairs and, in the shapes
world, the pixel judge's score on a fixed probe set.

    python -m ncp.evaluate --model models/shapes-base --data snapshot/eval.parquet \
        --version candidate=runs/r1/adapter --version serving=adapters/v0003 --shapes-probes 48 --out eval.json

Loading each adapter with the stock `load_lora_weights` is also the load test a version must pass before it is
swapped into the live app. Implicit reward (Diffusion-DPO, METHOD.md): r_v(x) = -(E_v(x) - E_ref(x)) with the base
model (adapters disabled) as reference and E the per-sample error of the space the candidate was trained in (`--space`:
latent eps error L, paper eq. 8, or NCP's perceptual error PL, eq. 12-17); a version is right on a held-out pair when
r_v(chosen) > r_v(rejected), averaged over a few shared (t, eps) draws (`ncp.margins`). The base scores 0.5 by
definition. Both spaces' accuracies are reported (`implicit_acc_by_space`); `implicit_acc` and `paired` (what the
gate reads) are the trained space's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ncp.margins import SPACES, accuracy, correct, held_out_margins, held_out_pairs
from ncp.pipelines import load_pipeline

logger = logging.getLogger(__name__)
PROBE_SEED = 777  # the gate's probe prompts come from this seed; the arena's prompt pool excludes them
# The test probes: prompts AND seeds that no gate, sweep, training run or rater ever sees. The gate promotes on its own
# probes, so a served version's score there is a running maximum (selected on its own noise); a result is read here.
TEST_PROBE_SEED = 2029
TEST_PROBES = 96
TEST_SEED_OFFSET = 5000  # image seeds 5000, 5001, ...: the gate draws 0..N-1, the older confirm runs 1000+
PROBE_SETS = ("gate", "test")


def gate_probe_prompts(n: int, *, two_object_prob: float = 0.3) -> list[str]:
    """The gate's probe prompts (the first n of one fixed list, so a larger n extends a smaller one)."""
    from ncp.shapes.grammar import probe_prompts

    return probe_prompts(n, seed=PROBE_SEED, two_object_prob=two_object_prob)


def test_probe_prompts(n: int = TEST_PROBES) -> list[str]:
    """The test probe prompts: held-in grammar prompts (30% two-object, as the raters' mix), none of them among the
    gate's first 256 probes; the arena's prompt pool excludes them too (jobs.runtime.shapes_pool)."""
    from ncp.shapes.grammar import probe_prompts

    gate = set(gate_probe_prompts(256))
    drawn = dict.fromkeys(probe_prompts(4 * n, seed=TEST_PROBE_SEED, two_object_prob=0.3))
    out = [p for p in drawn if p not in gate][:n]
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct test probe prompts can be drawn, {n} asked for")
    return out


def prompt_means(x: np.ndarray) -> np.ndarray:
    """(prompts, seeds) -> (prompts,): one value per cluster (a 1-D array already is)."""
    return np.asarray(x, dtype=float).reshape(len(x), -1).mean(axis=1)


def cluster_ci(x: np.ndarray, *, draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a (prompts, seeds) array and its 95% percentile-bootstrap interval over PROMPTS: images of one prompt
    share its difficulty, so they are resampled together (a cluster bootstrap; 96 prompts x 2 seeds is closer to
    96 samples than to 192). -> (mean, low, high)."""
    per_prompt = prompt_means(x)
    if per_prompt.size < 2:
        m = float(per_prompt.mean()) if per_prompt.size else float("nan")
        return m, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, per_prompt.size, (draws, per_prompt.size))
    boots = per_prompt[idx].mean(axis=1)
    return float(per_prompt.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (nan with fewer than two values)."""
    x = np.asarray(x, dtype=float).ravel()
    if x.size < 2:
        return float(x.mean()) if x.size else float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def cluster_se(x: np.ndarray) -> tuple[float, float]:
    """Mean of a (prompts, seeds) array and its standard error over PROMPTS: a prompt's images share its difficulty,
    so their scores are one cluster (a 1-D array is one value per cluster)."""
    return mean_se(prompt_means(x))


def grouped_se(x: np.ndarray, groups: Sequence[str]) -> float:
    """Cluster-robust standard error of the mean of x (one value per row) when rows of one group are not independent
    (Liang-Zeger with the small-sample factor C / (C - 1)); with every row its own group it equals the plain SE up to
    the factor N / (N - 1) vs C / (C - 1). nan with fewer than two groups."""
    x = np.asarray(x, dtype=float).ravel()
    if len(groups) != x.size:
        raise ValueError(f"groups has {len(groups)} entries for {x.size} values; pass one group per value.")
    ids = np.unique(np.asarray(groups, dtype=object), return_inverse=True)[1]
    c = int(ids.max()) + 1 if x.size else 0
    if c < 2:
        return float("nan")
    resid = np.bincount(ids, weights=x - x.mean(), minlength=c)  # per group: sum of its rows' deviations
    return float(math.sqrt(c / (c - 1) * np.sum(resid**2)) / x.size)


def paired(
    margins: dict[str, np.ndarray], judge: dict[str, np.ndarray], prompts: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """For every two versions a, b (in the order given): the differences a - b of implicit accuracy and of the judge
    score, each with its standard error over the SAME held-out pairs (t, eps draws) and the SAME probe images (the
    judge's over prompts: a prompt's seeds are one cluster).

    Paired, the noise two versions share (which pairs are hard, which draws are lucky) cancels out of their
    difference; two separate accuracies each carry all of it. A live run's gate rejected candidates on drops of
    0.05-0.07 in 256 pairs, about two of these standard errors.

    `prompts` (one per held-out pair): `acc_delta_se_prompts`, the same SE with a prompt's pairs (and every rating of
    one pair) as one cluster; jobs.gate reads it (over `acc_delta_se`) because in the live loop a pair is rated several
    times and the held-out split is drawn by prompt, so the rows are not independent."""
    names = list(dict.fromkeys([*margins, *judge]))
    out: dict[str, dict[str, float]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            row: dict[str, float] = {}
            if a in margins and b in margins and margins[a].size:
                diff = correct(margins[a]) - correct(margins[b])
                row["acc_delta"], row["acc_delta_se"] = mean_se(diff)
                if prompts is not None:
                    row["acc_delta_se_prompts"] = grouped_se(diff, prompts)
            if a in judge and b in judge:
                row["judge_delta"], row["judge_delta_se"] = cluster_se(judge[a] - judge[b])
            out[f"{a}-{b}"] = row
    return out


@torch.no_grad()
def judge_probe(
    pipe,
    adapter: str | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    decisions: list[dict[str, bool]] | None = None,
) -> np.ndarray:
    """Judge overall score of each (prompt, seed) probe image made by `adapter` (None = base); with `decisions`, each
    image's hard per-attribute decisions (`JudgeScore.attributes_correct`) are appended to it as well."""
    from ncp.shapes.judge import score

    if adapter is None:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([adapter])
    scores = []
    for seed in seeds:
        gens = [torch.Generator().manual_seed(int(seed) * 100003 + i) for i in range(len(prompts))]
        images = pipe(prompt=list(prompts), generator=gens, num_inference_steps=steps, guidance_scale=guidance).images
        judged = [score(img, p) for img, p in zip(images, prompts, strict=True)]
        scores.append([j.overall for j in judged])
        if decisions is not None:
            decisions += [dict(j.attributes_correct) for j in judged]
    pipe.enable_lora()
    return np.asarray(scores).T  # (prompts, seeds)


def mean_ci(x: np.ndarray, *, clustered: bool = False) -> tuple[float, float]:
    """Mean and 95% normal half-width; `clustered`: x is (prompts, seeds) and the error is taken over prompts."""
    mean, se = cluster_se(x) if clustered else mean_se(x)
    return mean, 1.96 * se


def evaluate(
    model: str,
    versions: dict[str, Path],
    data: Sequence[str | Path],
    *,
    shapes_probes: int = 0,
    probe_seeds: int = 2,
    steps: int = 20,
    guidance: float = 3.0,
    draws: int = 4,
    probe_cache: Path | None = None,
    timestep_low: float = 0.0,
    max_pairs: int = 0,
    probe_seed_offset: int = 0,
    attributes: bool = False,
    probe_set: str = "gate",
    space: str = "latent",
    coin_flip_labels: bool = False,
) -> dict:
    """Implicit reward accuracy of each version on held-out pairs, in `space` (the space the candidate was trained in;
    both spaces in `implicit_acc_by_space`) and, in the shapes world, its judge score on the
    probe set against the base's. `attributes`: also each version's share of probe images whose hard decision is right
    per attribute (`attributes`, and the base's in `base_attributes`), so a gain can be traced to what was learned;
    computed only for probe images judged in this call, not for cached scores. `probe_set`: "gate" (PROBE_SEED's
    prompts, which the gate selects on) or "test" (test_probe_prompts: prompts no gate or rater sees; pair it with a
    probe_seed_offset the gate never draws, e.g. TEST_SEED_OFFSET). Gains carry a bootstrap interval over prompts."""
    if probe_set not in PROBE_SETS:
        raise ValueError(f"probe_set must be one of {', '.join(PROBE_SETS)}, got {probe_set!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)} (the candidate's training space), got {space!r}")
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    # peft names modules after the adapter, and a module name takes no "." (a version called "2.5x steps" crashed):
    # each version loads under a slot name of its own.
    slot = {name: f"version_{i}" for i, name in enumerate(versions)}
    for name, folder in versions.items():
        pipe.load_lora_weights(str(folder), adapter_name=slot[name])  # raises on a corrupt or incompatible adapter
    result: dict = {"versions": {}, "space": space, "coin_flip_labels": coin_flip_labels}
    pairs = held_out_pairs(data, max_pairs) if data and versions else []
    by_space = (
        held_out_margins(
            pipe,
            list(slot.values()),
            data,
            draws=draws,
            timestep_low=timestep_low,
            coin_flip_labels=coin_flip_labels,
            pairs=pairs,
        )
        if data and versions
        else {}
    )
    by_space = {sp: {name: m[slot[name]] for name in versions} for sp, m in by_space.items()}
    margins = by_space.get(space, {})
    n_pairs = len(next(iter(margins.values()))) if margins else 0
    result["eval_pairs"] = n_pairs
    probes, cache = None, ProbeCache(probe_cache)
    if shapes_probes:
        probes = gate_probe_prompts(shapes_probes) if probe_set == "gate" else test_probe_prompts(shapes_probes)
        seeds = range(probe_seed_offset, probe_seed_offset + probe_seeds)
        seed_of_set = PROBE_SEED if probe_set == "gate" else TEST_PROBE_SEED
        settings = [str(model), shapes_probes, probe_seeds, steps, guidance, seed_of_set, probe_seed_offset]

        shares: dict[str | None, dict[str, float]] = {}

        def scores(name: str | None, folder: Path | None) -> np.ndarray:
            key = json.dumps([*settings, "base" if folder is None else adapter_identity(folder)])
            hit = cache.get(key)
            if hit is None:
                decisions: list[dict[str, bool]] | None = [] if attributes else None
                adapter = None if name is None else slot[name]
                hit = judge_probe(pipe, adapter, probes, seeds, steps=steps, guidance=guidance, decisions=decisions)
                cache.put(key, hit)
                if decisions:
                    shares[name] = {a: float(np.mean([d[a] for d in decisions])) for a in decisions[0]}
            return hit

        base = scores(None, None)
        result["base_judge"] = mean_ci(base)[0]
        if None in shares:
            result["base_attributes"] = shares[None]
    judged: dict[str, np.ndarray] = {}
    prompts = [p.prompt for p in pairs] if n_pairs else None  # one cluster per prompt
    for name in tqdm(versions, desc="evaluate", disable=len(versions) < 2):
        row = {"implicit_acc": accuracy(margins[name]) if margins else float("nan")}
        if n_pairs:  # against the base, whose margins are all 0 (accuracy 0.5): the candidate's own spread
            row["implicit_acc_se"] = mean_se(correct(margins[name]))[1]
            row["implicit_acc_se_prompts"] = grouped_se(correct(margins[name]), prompts)  # what the gate reads
            row["implicit_acc_by_space"] = {sp: accuracy(m[name]) for sp, m in by_space.items()}
        if probes is not None:
            s = judged[name] = scores(name, versions[name])
            row["judge"], row["judge_ci"] = mean_ci(s, clustered=True)
            row["judge_gain_vs_base"], row["judge_gain_ci"] = mean_ci(s - base, clustered=True)
            row["judge_gain_boot95"] = list(cluster_ci(s - base)[1:])
            if name in shares:
                row["attributes"] = shares[name]
        result["versions"][name] = row
    if prompts is not None:
        result["eval_prompts"] = len(set(prompts))
    result["paired"] = paired(margins if n_pairs else {}, judged, prompts)
    if n_pairs:  # the other space's paired accuracy differences, for the record (the gate reads `paired`)
        result["paired_by_space"] = {sp: paired(m, {}) for sp, m in by_space.items()}
    return result


def adapter_identity(folder: Path) -> str:
    """sha256 over an adapter folder's weight files (names and bytes; the LoRA alpha lives in their header): publishing
    copies them unchanged and adds only lineage files, so a version's probe scores computed when it was a round's
    candidate are reused in every later round where it is the serving version."""
    h = hashlib.sha256()
    files = sorted(Path(folder).rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors adapter weights in {folder}.")
    for f in files:
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class ProbeCache:
    """Probe scores by (model, probe settings, adapter identity) in one JSON file, so each round judges only its
    candidate: the base's and the serving version's scores were computed in earlier rounds (the serving version was
    that round's candidate). Keeps the newest `keep` entries; a missing or unreadable file is an empty cache."""

    def __init__(self, path: Path | None, keep: int = 16) -> None:
        self.path, self.keep = path, keep
        try:
            self.entries = json.loads(path.read_text())["entries"] if path is not None and path.exists() else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}

    def get(self, key: str) -> np.ndarray | None:
        hit = self.entries.get(key)
        return None if hit is None else np.asarray(hit, dtype=float)

    def put(self, key: str, scores: np.ndarray) -> None:
        self.entries.pop(key, None)
        self.entries[key] = np.asarray(scores).tolist()
        base = {k: v for k, v in self.entries.items() if k.endswith('"base"]')}  # the base entry is never evicted
        rest = [k for k in self.entries if k not in base][-self.keep :]
        self.entries = {**base, **{k: self.entries[k] for k in rest}}
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"entries": self.entries}))
            tmp.replace(self.path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder or cached hub id")
    p.add_argument("--data", nargs="*", default=[], help="held-out Pick-a-Pic v2 style Parquet file(s)")
    p.add_argument("--version", action="append", default=[], metavar="NAME=FOLDER", help="adapter to evaluate")
    p.add_argument("--shapes-probes", type=int, default=0, help="shapes world: number of judge probe prompts (0: off)")
    p.add_argument("--probe-seeds", type=int, default=2, help="seeds per probe prompt")
    p.add_argument(
        "--probe-seed-offset",
        type=int,
        default=0,
        help="first probe seed (the gate uses 0..N-1; another offset gives fresh images of the same prompts, to "
        "confirm a promoted version without the gate's selection bias)",
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps for probe images")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale for probe images")
    p.add_argument("--draws", type=int, default=4, help="(t, eps) draws per held-out pair")
    p.add_argument("--timestep-low", type=float, default=0.0, help="draw t from [this x T, T), as the rounds train")
    p.add_argument(
        "--max-pairs", type=int, default=0, help="score only the newest N held-out pairs (0: all), bounds the cost"
    )
    p.add_argument(
        "--probe-cache", type=Path, help="JSON file caching probe scores of base and versions across rounds"
    )
    p.add_argument(
        "--attributes", action="store_true", help="also each version's per-attribute share of right probe images"
    )
    p.add_argument(
        "--probe-set",
        choices=PROBE_SETS,
        default="gate",
        help="gate: the prompts the gate selects on; test: prompts no gate or rater sees (use a fresh --probe-seed-offset)",
    )
    p.add_argument(
        "--space",
        choices=SPACES,
        default="latent",
        help="the space the candidate was trained in: implicit_acc (what the gate reads) is measured there",
    )
    p.add_argument(
        "--coin-flip-labels",
        action="store_true",
        help="null arm: score held-out pairs against coin-flip labels (the loop's null arm flips every label it reads)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    args = p.parse_args(argv)
    if args.max_pairs < 0:
        p.error(f"--max-pairs must be >= 0 (0: all pairs), got {args.max_pairs}")
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    versions = {}
    for spec in args.version:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            p.error(f"--version must look like NAME=FOLDER, got {spec!r}")
        if not Path(folder).is_dir():  # e.g. a name holding "=" split early ("t >= 0.5 T=runs/a" reads name "t >")
            p.error(f"--version {spec!r}: no adapter folder {folder!r} (a NAME may not contain '=')")
        versions[name] = Path(folder)
    res = evaluate(
        args.model,
        versions,
        args.data,
        shapes_probes=args.shapes_probes,
        probe_seeds=args.probe_seeds,
        steps=args.steps,
        guidance=args.guidance,
        draws=args.draws,
        probe_cache=args.probe_cache,
        timestep_low=args.timestep_low,
        max_pairs=args.max_pairs,
        probe_seed_offset=args.probe_seed_offset,
        attributes=args.attributes,
        probe_set=args.probe_set,
        space=args.space,
        coin_flip_labels=args.coin_flip_labels,
    )
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
