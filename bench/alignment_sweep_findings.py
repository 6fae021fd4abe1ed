"""What a sweep's configs are called and what its results show: the method and LoRA columns, and the generated
findings under the table (bench/alignment_sweep.py renders them; split from it by concern)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def lora(config: list) -> str:
    """The LoRA column: targets, and the rank when a config sets another than the deployment's 8."""
    return config[4] + (f" r{config[5]}" if len(config) > 5 and config[5] != 8 else "")


def options(config: list) -> dict[str, Any]:
    """A config's trainer options (`anchor`, `draws`); {} for plain DPO with one draw."""
    return dict(config[6]) if len(config) > 6 else {}


def method(config: list) -> str:
    """The method column: space-objective, then DPO-Positive's lambda and the draws per pair when set."""
    o = options(config)
    extra = (
        (f" +pos {o['anchor']:g}" if o.get("anchor") else "")
        + (f" x{o['draws']} draws" if o.get("draws", 1) > 1 else "")
        + (f" +uncond {o['uncond']:g}" if o.get("uncond") else "")
        + (f" t {o['t'][0]:g}-{o['t'][1]:g}" if o.get("t") else "")
        + (f" seed {o['seed']}" if o.get("seed") else "")
    )
    return f"{config[1]}-{config[0]}{extra}"


def _findings(res: dict[str, Any], base: float, steps: int) -> list[str]:
    """The sweep's conclusion, generated from its numbers."""
    best_run, best = max(((r, max(j for _, j in r["curve"])) for r in res["runs"].values()), key=lambda kv: kv[1])
    c = best_run["config"]
    best_key = f"{method(c)}, lr {c[2]:g}, beta {_beta(c)}, {lora(c)}"
    accs = [(r.get("final_metrics") or {}).get("implicit_acc") for r in res["runs"].values()]
    accs = [a for a in accs if a is not None]
    return [
        "**What the sweep shows (generated).**",
        f"- The best validation score of any config at any checkpoint is {best:.3f} ({best - base:+.3f} vs base; "
        f"{best_key}), the maximum over {sum(len(r['curve']) - 1 for r in res['runs'].values())} "
        "noisy checkpoint scores, so an optimistic bound. "
        + (
            f"No config here reaches the live loop's goal of +0.10 within {steps} steps on one fixed set of pairs "
            "(the loop trains round after round on new pairs of the version it serves: its `loop-*` sections say "
            "what 30 minutes reach)."
            if best - base < 0.10
            else f"It clears the live loop's goal of +0.10 within {steps} "
            "steps; the loop must still show it on the test probes."
        ),  # fmt: skip
        *_signal(accs, best - base),
        *_headroom(res, base, best),
        *_attributes(res),
        *_capacity(res, base),
        *_trainer_options(res, base),
        *_timesteps(res, base),
        *(
            [
                "- Configs that move the LoRA a lot (sft, cpo, ncp-dpo at lr 3e-3) only lose score. Not because the "
                "arena's PNGs, re-encoded, lie off the sampler's latents, nor because the objectives score the "
                "conditional branch where the sampler guides: SFT loses as much on the sampler's own latents and "
                "with the guided prediction (section `self-training`)."
            ]
            if len(res["runs"]) >= 10 and any(r["config"][0] == "sft" for r in res["runs"].values())
            else []
        ),  # fmt: skip
    ]


def _signal(accs: list[float], gain: float) -> list[str]:
    if max(accs) < 0.6:
        return [f"- Training implicit accuracy (last 10 steps) stays between {min(accs):.2f} and {max(accs):.2f}: no "
                "config learns to tell the judge's winner from its loser on fresh noise, the signal is too weak in these "
                "pairs."]  # fmt: skip
    return [f"- Training implicit accuracy (last 10 steps) reaches {max(accs):.2f}, yet the validation score moves by at "
            f"most {gain:+.3f}: the runs learn to tell these pairs' winners from their losers, not the rule the judge "
            "scores on unseen prompts."]  # fmt: skip


def _capacity(res: dict[str, Any], base: float) -> list[str]:
    """Wider LoRA (convs too, or a higher rank) against the attention-only rank-8 run of the same method, lr and beta."""
    runs = list(res["runs"].values())
    runs = [r for r in runs if not options(r["config"])]  # plain DPO only; trainer options have their own finding
    narrow = {tuple(r["config"][:4]): r for r in runs if lora(r["config"]) == "attn"}
    pairs = [
        (r, narrow[tuple(r["config"][:4])])
        for r in runs
        if lora(r["config"]) != "attn" and tuple(r["config"][:4]) in narrow
    ]
    if not pairs:
        return []

    def gains(r: dict[str, Any], best: str = "best ", last: str = "last ") -> str:  # best and last validation gain
        return f"{best}{max(j for _, j in r['curve']) - base:+.3f}, {last}{r['curve'][-1][1] - base:+.3f}"

    parts = [f"{r['config'][1]}-{r['config'][0]} with {lora(r['config'])}: {gains(r)} (attn r8: {gains(n, '', '')})"
             for r, n in pairs]  # fmt: skip
    return ["- Wider LoRA against attention-only rank 8 (same method, lr and beta; gains vs base, best and last): "
            + "; ".join(parts) + "."]  # fmt: skip


def _beta(config: list) -> str:
    return "-" if config[3] is None else format(config[3], "g")


def _timesteps(res: dict[str, Any], base: float) -> list[str]:
    """Slices of the schedule the pairs are noised in, for the one method, lr, beta and LoRA that was run with several
    (uniform t included): the mean gain of the last two checkpoints, averaged over the seeds run."""
    groups: dict[tuple, dict[tuple[float, float], list[float]]] = {}
    for r in res["runs"].values():
        c, opts = r["config"], options(r["config"])
        if set(opts) - {"t", "seed"} or len(r["curve"]) < 3:
            continue
        late = sum(j for _, j in r["curve"][-2:]) / 2 - base
        groups.setdefault((*c[:4], lora(c)), {}).setdefault(tuple(opts.get("t", (0.0, 1.0))), []).append(late)
    groups = {k: v for k, v in groups.items() if len(v) > 1 and (0.0, 1.0) in v}
    if not groups:
        return []
    key, by_slice = max(groups.items(), key=lambda kv: len(kv[1]))
    parts = [f"t in [{lo:g}, {hi:g}) T: {sum(g) / len(g):+.3f}" + (f" ({len(g)} seeds)" if len(g) > 1 else "")
             for (lo, hi), g in sorted(by_slice.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))]  # fmt: skip
    return [f"- Training timesteps ({key[1]}-{key[0]}, lr {key[2]:g}, beta {_beta(list(key))}, {key[4]}; gain vs base "
            "averaged over the last two checkpoints and the seeds run): " + "; ".join(parts) + ". Uniform t is "
            "the paper's (METHOD.md); a slice reweights the expectation over t that eq. 14 takes."]  # fmt: skip


def _trainer_options(res: dict[str, Any], base: float) -> list[str]:
    """DPO-Positive and several draws per pair against plain DPO of the same method, lr, beta and LoRA (when run)."""
    runs = list(res["runs"].values())
    plain = {(*r["config"][:5], lora(r["config"])): r for r in runs if not options(r["config"])}
    tried = [r for r in runs if options(r["config"])]
    if not tried:
        return []

    def gains(r: dict[str, Any]) -> str:
        return f"best {max(j for _, j in r['curve']) - base:+.3f}, last {r['curve'][-1][1] - base:+.3f}"

    parts = []
    for r in sorted(tried, key=lambda r: -max(j for _, j in r["curve"])):
        twin = plain.get((*r["config"][:5], lora(r["config"])))
        parts.append(f"{method(r['config'])} (lr {r['config'][2]:g}, beta {_beta(r['config'])}, {lora(r['config'])}): "
                     f"{gains(r)}" + (f" (plain DPO: {gains(twin)})" if twin else ""))  # fmt: skip
    return ["- Trainer options against plain DPO of the same lr, beta and LoRA (`+pos`: DPO-Positive's lambda; `xK draws`: "
            "(t, eps) draws per pair; `+uncond`: weight holding the empty-prompt branch; `seed`: another LoRA init "
            "and data order, the run-to-run spread; gains vs base): " + "; ".join(parts) + "."]  # fmt: skip


def _headroom(res: dict[str, Any], base: float, best: float) -> list[str]:
    """On another base: how much of its gap to the shipped model (same validation prompts) the best run closed."""
    shipped_path = ROOT / "docs" / "benchmarks" / "alignment_sweep.json"
    if (
        not shipped_path.exists()
        or Path(res["settings"]["model"]).resolve() == (ROOT / "models" / "shapes-base").resolve()
    ):
        return []
    shipped = json.loads(shipped_path.read_text())
    if shipped["settings"]["val"] != res["settings"]["val"]:
        return []
    top = shipped["base_val"]["judge"]
    return [f"- This base scores {base:.3f} on the same validation prompts where the shipped model scores {top:.3f}: "
            f"{top - base:.3f} of headroom that the shipped model proves reachable. The best run closes "
            f"{(best - base) / (top - base):.0%} of it."]  # fmt: skip


def _attributes(res: dict[str, Any]) -> list[str]:
    """Which attributes the training moved: the base's accuracy next to the run with the best last score's (hard
    decisions on the validation images), so a gain can be traced to what the raters' pairs taught."""
    before = (res.get("base_val") or {}).get("accuracy")
    if not before or not res["runs"]:
        return []
    top = max(res["runs"].values(), key=lambda r: r["curve"][-1][1])
    after = top.get("accuracy_last") or {}
    c = top["config"]
    moved = ", ".join(f"{a} {before[a]:.2f} -> {after[a]:.2f}" for a in before if a in after)
    return [f"- Per attribute, base -> last checkpoint of the best final run ({method(c)}, lr {c[2]:g}): {moved}."]
