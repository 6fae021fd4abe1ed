"""bench/round_reach.py: its quick mode runs every phase (base pairs, a round through `ncp.train`, a guided round, the
first round's own pairs, a continued round, `ncp.evaluate` with the paired delta) and writes its JSON and the
research section; its pairs are never probes; and a guided round trains differently from a plain one (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from bench.round_reach import BUDGETS, arms
from ncp.evaluate import TEST_PROBES, gate_probe_prompts
from ncp.evaluate import test_probe_prompts as unseen_probe_prompts


def test_every_named_arm_exists_and_continued_rounds_name_a_parent() -> None:
    names = {a.name for a in arms(100)}
    assert set(BUDGETS["quick"].names) <= names
    for a in arms(100):
        assert (
            a.data in ("base", "color", "round2")
            and (a.data == "round2") == bool(a.parent)
            and (not a.parent or a.parent in names)
        )
        assert "/" not in a.name  # a folder name
    guided = [a for a in arms(100) if "--train-guidance" in a.extra]
    assert guided and all(a.space == "latent" for a in guided)


@pytest.mark.slow
def test_quick_mode_writes_json_and_section(tmp_path: Path) -> None:
    from bench.round_reach import main

    out, doc = tmp_path / "r.json", tmp_path / "page.md"
    main(["--quick", "--work", str(tmp_path / "w"), "--out", str(out), "--doc", str(doc)])
    res = json.loads(out.read_text())
    judged = {name for e in res["evals"] for name in e["versions"]}
    assert judged == {"ncp", "guided-4x", "color-labels", "round2-init"}
    assert 0 < res["data"]["color"]["pairs"] <= res["data"]["base"]["prompts"]
    assert res["data"]["base"]["pairs"] > 20 and res["data"]["round2"]["pairs"] > 10
    for e in res["evals"]:
        for v in e["versions"].values():
            lo, hi = v["judge_gain_boot95"]
            assert lo <= v["judge_gain_vs_base"] <= hi
    # the continued round was judged with its parent on the same probe images, and it moved from it
    joint = next(e for e in res["evals"] if "round2-init" in e["versions"])
    assert "ncp" in joint["versions"] and joint["paired"]
    w = tmp_path / "w"
    first, second = (
        load_file(w / "ncp" / "pytorch_lora_weights.safetensors"),
        load_file(w / "round2-init" / "pytorch_lora_weights.safetensors"),
    )
    assert first.keys() == second.keys() and any(not first[k].equal(second[k]) for k in first)
    assert json.loads((w / "guided-4x" / "metrics.json").read_text())["config"]["train_guidance"] == 4.0
    captions = set(pq.read_table(w / "base" / "train.parquet").column("caption").to_pylist())
    captions |= set(pq.read_table(w / "round2" / "train.parquet").column("caption").to_pylist())
    assert not captions & (set(gate_probe_prompts(256)) | set(unseen_probe_prompts(TEST_PROBES)))
    text = doc.read_text()
    assert "<!-- BEGIN round-reach -->" in text and "python -m bench.round_reach --quick" in text
    assert "| round2-init |" in text and "Second round against the first" in text
    # another draw of the data is shown beside draw 0, each arm's gains side by side
    (tmp_path / "r_draw1.json").write_text(
        json.dumps({**res, "draw": 1, "rerun": "python -m bench.round_reach --draw 1"})
    )
    main(["--render", "--out", str(out), "--doc", str(doc)])
    text = doc.read_text()
    assert "gain, draw 0 (95% CI) | gain, draw 1 (95% CI)" in text and "`python -m bench.round_reach --draw 1`" in text
    row = next(line for line in text.splitlines() if line.startswith("| ncp |"))
    assert row.count("..") == 2
