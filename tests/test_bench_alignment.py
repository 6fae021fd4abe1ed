"""End-to-end smoke test of bench/alignment.py (issue 7): the real script in a subprocess, `--smoke` budget, on the
shapes model (models/shapes-base when it exists, else a freshly assembled random-weight shapes pipeline: same
architecture and code path). Checks every phase left real results, the published files are well formed, nothing under
docs/ was touched, and a rerun resumes from the state without training again.

    python -m pytest -q tests/test_bench_alignment.py
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = {f"{s}-{o}" for s in ("latent", "ncp") for o in ("dpo", "cpo", "sft")}


def _model(tmp_path: Path) -> Path:
    shipped = ROOT / "models" / "shapes-base"
    if (shipped / "model_index.json").is_file():
        return shipped
    from ncp.shapes.model import assemble_pipeline, build_text_encoder, build_unet, build_vae, write_tokenizer

    torch.manual_seed(0)
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    assemble_pipeline(build_unet(), build_vae(), build_text_encoder(tokenizer), tokenizer).save_pretrained(
        tmp_path / "model"
    )
    return tmp_path / "model"


def _run(model: Path, work: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench" / "alignment.py"), "--smoke", "--threads", "1"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--model", str(model), "--work", str(work)], env=env, capture_output=True, text=True, timeout=240
    )
    return proc, time.perf_counter() - start


def _docs_snapshot() -> dict[str, float | None]:
    paths = ["docs/BENCHMARKS.md", "docs/benchmarks/alignment.json", "docs/alignment_steps.png"]
    return {p: (ROOT / p).stat().st_mtime if (ROOT / p).exists() else None for p in paths}


@pytest.mark.slow
def test_smoke_runs_every_phase_and_resumes(tmp_path: Path) -> None:
    model, work = _model(tmp_path), tmp_path / "work"
    docs_before = _docs_snapshot()
    proc, seconds = _run(model, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 300, f"--smoke took {seconds:.0f} s"  # 64-px shapes model: about 2 min on a quiet 2-core CPU
    assert "[alignment] mode=smoke" in proc.stdout and "min (upper bound)" in proc.stdout  # estimate printed first

    state = json.loads((work / "alignment.json").read_text())
    data = state["data"]
    assert data["train"]["rows"] == 6 and data["pool"]["rows"] == 9  # 1 pair per prompt; 3 per pool prompt
    assert 1 <= data["loaded:all"]["kept"] == 6 - data["train"]["ties"]
    assert data["loaded:pool-aw"]["kept"] <= data["loaded:pool-all"]["kept"]  # the filter only removes pairs

    summary = state["summary"]
    assert set(summary["methods"]) == METHODS
    base = summary["base"]
    for name, m in summary["methods"].items():
        assert [p["step"] for p in m["curve"]] == [0, 1, 2], name
        assert m["curve"][0]["judge"] == pytest.approx(base)  # step 0 is the base model (LoRA B starts at zero)
        assert 0.0 <= m["judge"][0] <= 1.0 and 0.0 <= m["win_rate"][0] <= 1.0, name
        assert m["step_s"] > 0 and m["peak_mem_mb"] is not None, name
        assert m["curve"][2]["seconds"] > m["curve"][1]["seconds"] > 0, name  # cumulative training time
    # Two grid points for ncp-dpo in smoke: ranked on the validation prompts, the winner is the one reported.
    sel = summary["methods"]["ncp-dpo"]["selection"]["val_judge"]
    assert len(sel) == 2 and summary["methods"]["ncp-dpo"]["beta"] == max(sel, key=lambda r: r[2])[1]
    # Training changed the images: the LoRA moved the model away from the base for some run.
    changes = [e["pixel_change"] for k, e in state["evals"].items() if not k.startswith("base@")]
    assert max(changes) > 0
    assert len(summary["ablations"]) == 4 and all(math.isfinite(a["variant"]) for a in summary["ablations"])
    for rec in state["runs"].values():
        assert rec["steps"] == 2 and all((work / c["path"]).is_file() for c in rec["checkpoints"].values())

    md = (work / "BENCHMARKS.md").read_text()
    assert "<!-- BEGIN alignment -->" in md and "<!-- END alignment -->" in md
    assert "| ncp-dpo |" in md and "Project goal" in md and "Ablation" in md
    for png in ("alignment_steps.png", "alignment_time.png"):
        assert (work / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _docs_snapshot() == docs_before  # --smoke never writes under docs/

    # A rerun resumes: same records (no training), nothing left to do.
    proc2, _ = _run(model, work)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "remaining about 0 images + 0 steps" in proc2.stdout
    again = json.loads((work / "alignment.json").read_text())
    assert again["runs"] == state["runs"] and again["summary"]["methods"].keys() == summary["methods"].keys()
