"""bench/self_training.py on the shipped shapes model: both latent sources, every arm trained and judged, the section."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import self_training

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "models" / "shapes-base")


@pytest.mark.slow
def test_arms_train_on_the_sampler_latents_or_the_reencoded_pngs_and_publish(tmp_path: Path) -> None:
    args = argparse.Namespace(model=MODEL, prompts=8, probes=3, probe_seeds=1, threads=1)
    data = self_training.make_data(args, tmp_path)
    assert data["keep"] and data["base"].shape == (3, 1)
    own, reencoded = self_training.pairs(data, "own"), self_training.pairs(data, "reencoded")
    i, w, r = data["keep"][0]
    # The own-latent arm trains on exactly what the sampler produced; the re-encoded PNG is near it, not equal.
    assert torch.equal(own[0].chosen, data["own"][w]) and torch.equal(own[0].rejected, data["own"][r])
    assert own[0].prompt == reencoded[0].prompt == data["prompts"][i]
    assert 0 < data["relative_latent_error"] < 0.5 and not torch.equal(reencoded[0].chosen, own[0].chosen)

    out, docs = tmp_path / "r.json", tmp_path / "docs"
    docs.mkdir()
    self_training.main(["--model", MODEL, "--prompts", "8", "--steps", "2", "--checkpoints", "1", "--probes", "3",
                        "--probe-seeds", "1", "--threads", "1", "--out", str(out), "--docs", str(docs)])  # fmt: skip
    res = json.loads(out.read_text())
    assert list(res["arms"]) == list(self_training.ARMS)
    for rows in res["arms"].values():
        assert [r["steps"] for r in rows] == [2] and np.isfinite(rows[0]["judge"])
    text = (docs / "BENCHMARKS.md").read_text()
    assert "<!-- BEGIN self-training -->" in text and (docs / "self_training.png").stat().st_size > 0
    for name in self_training.ARMS:
        assert f"| {name} | " in text
    assert "**What it shows (generated).**" in text and "--prompts 8 --steps 2" in text
