"""bench/loop.py's `--space latent` arm: everything but the space and its beta identical to the default NCP run, its own
result file, and a report that names the method it trained with."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from bench import loop_test_report
from bench.loop import SPACE_BETA, parse, result_stem

ROOT = Path(__file__).resolve().parents[1]


def test_the_latent_arm_differs_only_in_space_and_its_own_beta() -> None:
    ncp, latent = vars(parse([])), vars(parse(["--space", "latent"]))
    assert (ncp["space"], ncp["beta"]) == ("ncp", SPACE_BETA["ncp"]) == ("ncp", 5e5)
    assert (latent["space"], latent["beta"]) == ("latent", 5000.0)
    assert {k for k in ncp if ncp[k] != latent[k]} == {"space", "beta"}
    assert parse(["--space", "latent", "--beta", "100"]).beta == 100.0  # an explicit beta wins
    assert result_stem(parse([])) == "loop_default"
    assert result_stem(parse(["--space", "latent", "--null"])) == "loop_default_latent_null"
    assert result_stem(parse(["--replicate", "2"])) == "loop_default_replicate2"  # never overwrites the shown run


def test_the_report_names_the_space() -> None:
    result = json.loads((ROOT / "docs" / "benchmarks" / "loop_default.json").read_text())
    text = loop_test_report.markdown(result)
    assert "NCP-DPO steps" in text and "latent DPO" not in text
    latent = copy.deepcopy(result)
    latent["config"] |= {"space": "latent", "beta": 5000.0}
    text = loop_test_report.markdown(latent, stem="loop_default_latent")
    assert text.splitlines()[0].endswith("the latent DPO arm (`--space latent`, beta 5000)")
    assert "latent DPO steps" in text and "NCP-DPO" not in text
