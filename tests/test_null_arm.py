"""The loop's null arm and its test probes: coin-flip labels (ncp.train --coin-flip-labels) in a real training
subprocess, and a test probe set that neither the gate nor the raters ever see."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.runtime import shapes_pool
from ncp.data import PreferencePair
from ncp.evaluate import TEST_PROBES, cluster_ci, gate_probe_prompts
from ncp.evaluate import test_probe_prompts as unseen_probe_prompts
from ncp.pipelines import build_tiny_sd15
from ncp.trainer import coin_flip

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _pair(i: int) -> PreferencePair:
    return PreferencePair(f"p{i}", f"c{i}".encode(), f"r{i}".encode(), (64, 64), (32, 32), False)


def test_coin_flip_swaps_about_half_of_the_pairs_reproducibly() -> None:
    pairs = [_pair(i) for i in range(400)]
    flipped = coin_flip(pairs, seed=3)
    swapped = [b.chosen == a.rejected and b.rejected == a.chosen for a, b in zip(pairs, flipped, strict=True)]
    kept = [b == a for a, b in zip(pairs, flipped, strict=True)]
    assert all(s or k for s, k in zip(swapped, kept, strict=True))
    assert 160 < sum(swapped) < 240  # Binomial(400, 1/2): 200 +- 40 is beyond 4 standard deviations
    assert all(b.chosen_size == a.rejected_size for a, b, s in zip(pairs, flipped, swapped, strict=True) if s)
    assert coin_flip(pairs, seed=3) == flipped and coin_flip(pairs, seed=4) != flipped


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_training_subprocess_with_coin_flip_labels_trains_on_flipped_pairs(tmp_path: Path) -> None:
    build_tiny_sd15(seed=0).save_pretrained(tmp_path / "sd15")
    n = 24
    table = pa.table({"caption": [f"prompt {i}" for i in range(n)], "jpg_0": [_png(200)] * n, "jpg_1": [_png(20)] * n,
                      "label_0": [1.0] * n, "label_1": [0.0] * n})  # fmt: skip
    pq.write_table(table, tmp_path / "pairs.parquet")
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "ncp.train", "--model", str(tmp_path / "sd15"), "--data", str(tmp_path / "pairs.parquet"),
           "--out", str(out), "--lora-rank", "4", "--lora-alpha", "4", "--batch-size", "4", "--max-steps", "2",
           "--threads", "1", "--no-progress-bar", "--coin-flip-labels"]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["coin_flip_labels"] is True
    assert 0 < metrics["labels_flipped"] < n and metrics["data"]["kept"] == n


def test_test_probes_are_disjoint_from_the_gate_probes_and_the_raters_pool() -> None:
    test = unseen_probe_prompts()
    assert len(test) == len(set(test)) == TEST_PROBES >= 96
    assert not set(test) & set(gate_probe_prompts(256))
    pool = {p for prompts in shapes_pool().by_category.values() for p in prompts}
    assert pool and not set(test) & pool and not set(gate_probe_prompts(256)) & pool
    assert 0.15 < np.mean([" of " in p or " above " in p or " below " in p for p in test]) < 0.5  # the raters' mix


def test_cluster_bootstrap_treats_a_prompts_images_as_one_sample() -> None:
    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 1, (96, 1))
    x = prompt_effect + rng.normal(0, 0.01, (96, 8))  # 8 near-identical seeds per prompt
    mean, lo, hi = cluster_ci(x)
    assert lo < mean < hi and mean == x.mean()
    naive = 1.96 * x.std(ddof=1) / np.sqrt(x.size)  # as if 768 independent images
    assert (hi - lo) / 2 > 2 * naive  # about sqrt(8) wider: the prompts, not the images, are the samples
