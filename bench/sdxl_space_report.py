"""The docs/BENCHMARKS.md section of bench/sdxl_space.py (`render`), from its results JSON.

python bench/sdxl_space.py --render results.json
"""

from __future__ import annotations

import statistics

BATCH, LORA_RANK = 8, 8  # bench/sdxl_space.py's round: the loop's defaults (LoopConfig.batch_size, lora_rank)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _f(x: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if x is None else f"{format(x, spec)}{unit}"


def render(data: dict) -> str:
    m, s = data.get("machine") or {}, data.get("settings") or {}
    kind = "tiny SDXL pipeline (CPU smoke, not a result)" if data.get("tiny") else "full-size SDXL (random weights)"
    lines = [
        "## SDXL on one GPU as the Space runs it (`bench/sdxl_space.py`)",
        "",
        f"Device: {m.get('device', '?')} ({_f(m.get('total_gib'), '.0f')} GiB), torch {m.get('torch', '?')}, "
        f"diffusers {m.get('diffusers', '?')}, {m.get('date', '?')}. {kind}; fp16 serving, DPM-Solver++ 2M Karras "
        f"{s.get('steps')} steps, guidance 5, stock-VAE fp32 decode; rounds: NCP-DPO, {BATCH} pairs per step, LoRA "
        f"r{LORA_RANK}, the plan's options; {s.get('micro_steps')} timed micro-steps (round for 200 steps "
        f"extrapolated); a rater every {s.get('rater_period_s')} s. Idle pair: "
        f"{_f(_median(data.get('idle_pair_s', [])), '.2f', ' s')}; serving peak "
        f"{_f(data.get('serve_peak_gib'), '.1f', ' GiB')}. Rerun: `python bench/sdxl_space.py --device cuda`.",
        "",
        "| card | plan | trainer options | peak GiB | pair s during round | round, 200 steps | hot-swap stall | "
        "raters waited |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for gb, rec in data.get("cards", {}).items():
        plan = rec.get("plan") or {}
        rung = plan.get("rung") or {}
        opts = (f"{rung.get('precision')}, {rung.get('micro_batch')}x{rung.get('accumulation')}"
                + (", ckpt" if rung.get("checkpointing") else "")) if rung else "-"  # fmt: skip
        if "micro_step_s" not in rec:
            lines.append(f"| {gb} GB | {plan.get('mode', '-')} | {opts} | {_f(rec.get('peak_gib'))} | | "
                         f"failed: {str(rec.get('error', '?'))[:100]} | | |")  # fmt: skip
            continue
        during = _median(rec.get("pair_s_during_round") or [])
        during_text = "paused" if plan.get("mode") == "exclusive" else _f(during, ".2f", " s")
        r = rec.get("raters", {})
        waited = (f"{'yes' if rec.get('raters_waited') else 'no'} ({r.get('waited', 0)} waits, "
                  f"{r.get('refused', 0)} refused of {r.get('requests', 0)})")  # fmt: skip
        lines.append(
            f"| {gb} GB | {plan.get('mode')} | {opts} | {_f(rec.get('peak_gib'))} | {during_text} | "
            f"{_f(rec['round_200_steps_s'] / 60, '.1f', ' min')} | {_f(rec.get('swap_stall_s', 0) * 1e3, '.0f', ' ms')}"
            f" | {waited} |"
        )
    return "\n".join(lines)
