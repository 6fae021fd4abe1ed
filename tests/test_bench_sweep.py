"""bench/alignment_sweep.py: the real sweep at its `--smoke` budget on a copy of the shipped model (so it counts as
"another base"), rendered under a name into a temporary docs folder; and the headroom finding computed from a
sweep on another base against the shipped model's published sweep.

    python -m pytest -q tests/test_bench_sweep.py      # about 2 min on 2 CPU cores
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import alignment_sweep as sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_on_another_base_renders_its_own_section(tmp_path: Path) -> None:
    model = tmp_path / "other-base"
    shutil.copytree(ROOT / "models" / "shapes-base", model)
    out, docs = tmp_path / "r.json", tmp_path / "docs"
    sweep.main(["--smoke", "--model", str(model), "--out", str(out)])
    res = json.loads(out.read_text())
    assert len(res["runs"]) == 2 and all(len(r["curve"]) == 3 for r in res["runs"].values())  # step 0 + 2 checkpoints
    # configs 12 and 13 in one worker: attn+conv at rank 8, then at rank 32, each judged with its own LoRA shape
    assert sorted(sweep.lora(r["config"]) for r in res["runs"].values()) == ["attn+conv", "attn+conv r32"]
    sweep.render(out, "headroom", docs=docs)
    text = (docs / "BENCHMARKS.md").read_text()
    assert "<!-- BEGIN alignment-sweep-headroom -->" in text and "<!-- BEGIN alignment-sweep -->" not in text
    assert f"move `{model}`?" in text  # a base outside the repo is named by its path, not as the shipped model
    assert f"Base built by `{sweep.HEADROOM_RECIPE}`" in text
    assert f"--model {model} --pairs 12 --val 4 --steps 4" in text and "--render r.json --name headroom`" in text
    assert (docs / "alignment_sweep_headroom.png").stat().st_size > 0
    assert json.loads((docs / "benchmarks" / "alignment_sweep_headroom.json").read_text()) == res


def test_headroom_share_is_measured_against_the_shipped_sweep(tmp_path: Path) -> None:
    shipped = json.loads((ROOT / "docs" / "benchmarks" / "alignment_sweep.json").read_text())
    top = shipped["base_val"]["judge"]
    res = {"settings": {"model": str(tmp_path), "val": shipped["settings"]["val"]}}
    base, best = top - 0.10, top - 0.075
    (line,) = sweep._headroom(res, base, best)
    assert f"{top - base:.3f} of headroom" in line and "closes 25% of it" in line
    assert sweep._headroom({"settings": {"model": str(tmp_path), "val": 7}}, base, best) == []  # other prompts
    on_shipped = {"settings": {"model": str(ROOT / "models" / "shapes-base"), "val": shipped["settings"]["val"]}}
    assert sweep._headroom(on_shipped, base, best) == []


def test_each_detuned_base_names_the_command_that_builds_it() -> None:
    from ncp.shapes.pretrain import parse_caption_noise

    assert sweep.base_recipe("headroom") == sweep.base_recipe("headroom-options") == sweep.HEADROOM_RECIPE
    for name, q in (("headroom", 0.7), ("deficit0.9", 0.9), ("deficit1.0", 1.0)):
        recipe = sweep.base_recipe(name)
        noise = recipe.split("--caption-noise ")[1].split()[0]
        assert parse_caption_noise(noise) == {"color": q, "background": q, "size": q}
        folder = "runs/shapes-headroom" if name == "headroom" else f"runs/shapes-{name}"
        assert f"--out {folder} " in recipe and recipe.startswith("python -m ncp.shapes.pretrain --init-model ")
    # the loop's section points at `alignment-sweep-<folder without shapes->`: a sweep of that name holds the recipe
    assert sweep.base_recipe("deficit") is None and sweep.base_recipe("") is None


def test_attribute_line_traces_the_gain_to_the_best_final_run() -> None:
    def run(config: list, last: float, color: float) -> dict:
        return {"config": config, "curve": [[0, 0.5], [800, last]], "accuracy_last": {"color": color, "size": 0.6}}

    res = {"base_val": {"accuracy": {"color": 0.12, "size": 0.38}},
           "runs": {"a": run(["dpo", "ncp", 1e-3, 5e5, "attn"], 0.55, 0.16),
                    "b": run(["dpo", "ncp", 3e-3, 5e5, "attn"], 0.53, 0.29)}}  # fmt: skip
    (line,) = sweep._attributes(res)
    assert "(ncp-dpo, lr 0.001): color 0.12 -> 0.16, size 0.38 -> 0.60." in line
    assert sweep._attributes({"base_val": {}, "runs": res["runs"]}) == []  # sweeps from before the accuracy field


def test_wider_lora_is_compared_with_the_attention_only_run_of_the_same_method() -> None:
    def run(config: list, curve: list) -> dict:
        return {"config": config, "curve": [[0, 0.6], *curve]}

    res = {"runs": {
        "a": run(["dpo", "ncp", 1e-3, 5e5, "attn"], [[300, 0.62], [600, 0.63]]),
        "b": run(["dpo", "ncp", 1e-3, 5e5, "attn+conv", 32], [[300, 0.55], [600, 0.50]]),
        "c": run(["dpo", "latent", 1e-3, 5e2, "attn+conv"], [[300, 0.61], [600, 0.60]]),  # no attn-only partner
    }}  # fmt: skip
    (line,) = sweep._capacity(res, 0.6)
    assert "ncp-dpo with attn+conv r32: best +0.000, last -0.100 (attn r8: +0.030, +0.030)" in line
    assert "latent" not in line
    assert sweep._capacity({"runs": {"a": res["runs"]["a"]}}, 0.6) == []
    assert sweep.lora(["dpo", "ncp", 1e-3, 5e5, "attn+conv", 32]) == "attn+conv r32"


def test_merge_joins_runs_of_the_same_base_and_refuses_different_data(tmp_path: Path) -> None:
    def result(configs: list[int], wall_s: float, val: int = 64) -> dict:
        settings = {"model": "runs/b", "device": "cpu", "pairs": 800, "val": val, "steps": 600, "checkpoints": 4,
                    "sample_steps": 12, "workers": 2, "configs": "0,1,2"}  # fmt: skip
        runs = {f"k{i}": {"config": list(sweep.CONFIGS[i]), "curve": [[0, 0.6], [600, 0.61]]} for i in configs}
        return {
            "settings": settings,
            "data": {"kept": 734},
            "base_val": {"judge": 0.6},
            "runs": runs,
            "wall_s": wall_s,
        }

    paths = []
    for name, res in {"a": result([1, 4], 600.0), "b": result([12, 15], 1200.0), "c": result([14], 300.0)}.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(res))
    merged = sweep.merge(paths)
    assert len(merged["runs"]) == 5 and merged["wall_s"] == 2100.0
    assert merged["settings"]["configs"] == "1,4,12,15,14"  # what each run finished, not what it was asked for
    assert sweep._wall(merged) == ("in 3 runs on the same pairs and validation images (configs 1,4: 10.0 min, 2 "
                                   "worker(s); configs 12,15: 20.0 min, 2 worker(s); configs 14: 5.0 min, 2 worker(s))")  # fmt: skip
    assert sweep._wall(result([1], 90.0)) == "in 1.5 min with 2 worker processes"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(result([3], 60.0, val=32)))
    with pytest.raises(ValueError, match="val"):
        sweep.merge([paths[0], other])


def test_trainer_options_are_compared_with_plain_dpo_of_the_same_settings() -> None:
    def run(config: list, curve: list) -> dict:
        return {"config": config, "curve": [[0, 0.6], *curve]}

    res = {"runs": {
        "plain": run(["dpo", "ncp", 1e-3, 5e5, "attn"], [[300, 0.64], [600, 0.63]]),
        "pos": run(["dpo", "ncp", 1e-3, 5e5, "attn", 8, {"anchor": 5}], [[300, 0.62], [600, 0.61]]),
        "wide": run(["dpo", "ncp", 1e-3, 5e5, "attn+conv", 32, {"anchor": 50, "draws": 4}], [[300, 0.5], [600, 0.55]]),
    }}  # fmt: skip
    (line,) = sweep._trainer_options(res, 0.6)
    assert "ncp-dpo +pos 5 (lr 0.001, beta 500000, attn): best +0.020, last +0.010 (plain DPO: best +0.040, " in line
    assert "ncp-dpo +pos 50 x4 draws (lr 0.001, beta 500000, attn+conv r32): best +0.000, last -0.050." in line
    assert line.index("+pos 5 ") < line.index("+pos 50")  # best first
    assert sweep._trainer_options({"runs": {"plain": res["runs"]["plain"]}}, 0.6) == []
    assert sweep._capacity(res, 0.6) == []  # option runs are not read as wider-LoRA evidence
    assert sweep.method(["dpo", "ncp", 1e-3, 5e5, "attn", 8, {"uncond": 30, "seed": 1}]) == "ncp-dpo +uncond 30 seed 1"


def test_pairs_can_be_labelled_by_the_loop_benchmarks_simulated_rater(tmp_path: Path) -> None:
    """--labels rater: a rater's vote sets each label; its ties (and both_bad) are written as 0.5/0.5 (dropped)."""
    import pyarrow.parquet as pq

    from bench.alignment_engine import LABELS, _write_pairs
    from ncp.shapes.grammar import parse
    from ncp.shapes.judge import score
    from ncp.shapes.rater import SimulatedRater
    from ncp.shapes.render import render

    prompts = ["a large red circle on the left, gray background", "a small blue square on the right, white background"]
    right = [render(parse(p)) for p in prompts]
    images = [[right[0], right[1]], [right[0], right[1]]]  # pair 0: left matches; pair 1: right matches
    rows = [(0, 0, 1), (1, 0, 1)]
    judge = _write_pairs(tmp_path / "j.parquet", rows, prompts, images)
    labels = pq.read_table(tmp_path / "j.parquet").column("label_0").to_pylist()
    assert judge["ties"] == 0 and labels == [1.0, 0.0]
    assert score(right[0], prompts[0]).overall > score(right[1], prompts[0]).overall
    never = SimulatedRater(noise=0.0, both_bad_below=0.0, tie_margin=0.99)  # every pair a tie
    assert _write_pairs(tmp_path / "r.parquet", rows, prompts, images, never)["ties"] == 2
    exact = SimulatedRater(noise=0.0, both_bad_below=0.0)
    _write_pairs(tmp_path / "e.parquet", rows, prompts, images, exact)
    assert pq.read_table(tmp_path / "e.parquet").column("label_0").to_pylist() == labels
    assert LABELS["judge"] is None and LABELS["rater"].noise == 0.05 and LABELS["rater"].both_bad_below == 0.3
    assert "rater-labelled" in sweep._labelled({"labels": "rater"}) and sweep._labelled({}) == "judge-labelled"


def test_a_sweep_can_train_on_a_given_parquet_of_pairs(tmp_path: Path) -> None:
    """--pairs-file: the sweep trains on these rows (e.g. a live loop's snapshot) instead of sampling its own pairs."""
    from bench.alignment_engine import Bench, Budget, _write_pairs
    from ncp.shapes.grammar import parse
    from ncp.shapes.render import render

    prompts = ["a large red circle on the left, gray background", "a small blue square on the right, white background"]
    right = [render(parse(p)) for p in prompts]
    rows = tmp_path / "snapshot.parquet"
    _write_pairs(rows, [(0, 0, 1), (1, 0, 1)], prompts, [[right[0], right[1]], [right[0], right[1]]])
    budget = Budget(4, 0, 2, 1, 1, 1, steps=1, checkpoints=1, batch=2, seeds=1, ablation_seeds=0, sample_steps=2)
    bench = Bench("sweep", budget, {}, tmp_path / "work", ROOT / "models" / "shapes-base", "cpu", pairs_file=rows)
    bench.state.setdefault("evals", {})
    bench.make_data()
    assert bench.state["data"]["train"] == {"rows": 2, "ties": 0, "from": str(rows)}
    assert len(bench.datasets["all"]) == 2 and bench.datasets["all"][0].prompt == prompts[0]
    text = sweep._source({"pairs_file": "runs/snap.parquet", "pairs": 800})
    assert text.startswith("strict-preference pairs (ties dropped) read from `runs/snap.parquet`")
    assert sweep._source({"pairs": 800}) == "judge-labelled on-policy pairs from 800 held-in prompts"


def test_timestep_slices_are_compared_with_uniform_t_averaged_over_seeds() -> None:
    def run(options: dict, late: tuple[float, float], objective: str = "dpo") -> dict:
        config = [objective, "ncp", 1e-3, None if objective == "sft" else 5e5, "attn", 8, options]
        return {"config": config, "curve": [[0, 0.6], [300, 0.61], [600, late[0]], [900, late[1]]]}

    res = {"runs": {
        "uniform": run({}, (0.62, 0.62)),
        "uniform-seed": run({"seed": 1}, (0.61, 0.63)),
        "high": run({"t": [0.3, 1.0]}, (0.64, 0.66)),
        "low": run({"t": [0.0, 0.5]}, (0.55, 0.57)),
        "anchored": run({"t": [0.3, 1.0], "anchor": 5}, (0.70, 0.70)),  # another method: not in this comparison
        "sft": run({"t": [0.5, 1.0]}, (0.5, 0.5), objective="sft"),  # beta None renders as "-"
    }}  # fmt: skip
    (line,) = sweep._timesteps(res, 0.6)
    assert "t in [0.3, 1) T: +0.050; t in [0, 1) T: +0.020 (2 seeds); t in [0, 0.5) T: -0.040." in line
    assert "ncp-dpo, lr 0.001, beta 500000, attn" in line and "0.70" not in line
    assert sweep._timesteps({"runs": {"high": res["runs"]["high"]}}, 0.6) == []  # no uniform-t twin: no comparison
    assert sweep.method(res["runs"]["high"]["config"]) == "ncp-dpo t 0.3-1"
    assert "ncp-sft t 0.5-1 (lr 0.001, beta -, attn)" in sweep._trainer_options(res, 0.6)[0]
