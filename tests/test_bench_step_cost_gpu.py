"""bench/step_cost_gpu.py on the tiny SDXL-type UNet, CPU, in-process (the GPU run uses the same worker): a record per
method with the intended weight/encoder precision, the encoder-precision override restored, a docs section rendered.

    python -m pytest -q tests/test_bench_step_cost_gpu.py
"""

import math
from pathlib import Path

import ncp.losses
from bench import step_cost_gpu as bench
from ncp.perception import per_sample_errors


def test_tiny_workers_and_docs(tmp_path: Path) -> None:
    methods = ["latent-dpo", "ncp-dpo-enc-autocast"]
    data = bench.skeleton("tiny", "cpu", methods, steps=1, warmup=0)
    for method in methods:
        rec = bench.worker("tiny", method, "cpu", steps=1, warmup=0)
        assert "error" not in rec, rec.get("traceback")
        assert math.isfinite(rec["step_ms"]) and rec["step_ms"] > 0 and len(rec["step_times_ms"]) == 1
        assert rec["latent"] == [2, 4, 8, 8] and rec["attention_processor"] == "AttnProcessor2_0"
        data["machine"] = rec.pop("machine")
        data["results"][method] = rec
    assert ncp.losses.per_sample_errors is per_sample_errors  # the encoder_fp32 override was undone
    latent, ncp_rec = data["results"]["latent-dpo"], data["results"]["ncp-dpo-enc-autocast"]
    assert (latent["unet_dtype"], latent["encoder_dtype"]) == ("bfloat16", None)  # trainer: latent casts the UNet
    assert (ncp_rec["unet_dtype"], ncp_rec["encoder_dtype"]) == ("float32", "bf16")
    assert abs(latent["losses"][0] - math.log(2)) < 1e-3  # LoRA starts as the identity: dpo loss = ln 2

    bench.add_ratios(data)
    assert data["results"]["latent-dpo"]["ratio_to_latent_dpo"] == 1.0
    docs = tmp_path / "BENCHMARKS.md"
    bench.write_section(docs, "step_cost_gpu", bench.render(data))
    text = docs.read_text()
    assert "<!-- BEGIN step_cost_gpu -->" in text and "| ncp-dpo-enc-autocast | float32 | bf16 |" in text
