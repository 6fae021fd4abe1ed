"""bench/serving.py at toy sizes: the app runs as its own process (`python app.py`), the latencies come from real
HTTP calls, the swap stall from the denoising steps of a live Runtime, and the results land where --out/--doc say.

    python -m pytest -q tests/test_bench_serving.py      # about 1.5 min (one app start, one Runtime)
"""

from __future__ import annotations

import json

import pytest

from bench import serving


@pytest.mark.slow
def test_serving_bench_measures_every_part(tmp_path) -> None:
    out, doc = tmp_path / "serving.json", tmp_path / "BENCH.md"
    # --no-compare: the other server set-ups run the same http_parts with fewer measures (CI time).
    args = "--pairs 3 --crowd 2 --votes 4 --pace 0.2 --warmup 1 --no-compare".split()
    r = serving.main([*args, "--out", str(out), "--doc", str(doc)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert r["server"].startswith("python app.py")
    assert r["next_pair_ms"]["n"] == 3 and r["next_pair_ms_crowd"]["n"] == 2 * 5
    votes = ("vote_ms_1_client", "vote_ms_16_clients", "vote_ms_1_client_browser", "vote_ms_16_clients_browser",
             "vote_ms_16_raters_paced", "vote_ms_16_raters_paced_browser")  # fmt: skip
    assert [r[part]["n"] for part in votes] == [4, 16 * 4, 4, 16 * 4, 16 * 4, 16 * 4]
    assert r["vote_ms_16_raters_paced"]["pace_s"] == 0.2
    for part in ("next_pair_ms", *votes):
        assert 0 < r[part]["p50"] <= max(r[part].get("p95", 0), r[part].get("p99", 0))
    handler = r["server_handler_ms"]["vote"]  # the app's own timings, read over the admin API
    assert handler["n"] >= 4 * (4 + 16 * 5) and 0 < handler["p50"] <= handler["p99"] <= handler["max"]
    # Each request's client time includes its handler time, and the handler's timings pool every part's votes: their
    # median cannot exceed the largest per-part client median (a single-client median can, on a loaded CPU).
    assert handler["p50"] <= max(r[part]["p50"] for part in votes)
    assert r["vote_ms_1_client_browser"]["p50"] < r["vote_ms_1_client"]["p50"]  # gradio_client polls every 50 ms
    (name, row), *others = r["variants"].items()
    assert not others and "default" in name
    assert row["vote_ms_16_raters_paced_browser"] == r["vote_ms_16_raters_paced_browser"]
    assert row["overflow_showings"] == r["overflow_showings"] >= 0
    swap = r["swap"]
    assert swap["swaps"] == 10 and 0 < swap["lock_held_ms_p50"] <= swap["lock_held_ms_max"]
    # A swap pauses generation at least as long as it holds the lock (it happens between two denoising steps).
    assert swap["step_gap_ms_max_during_swaps"] >= swap["step_gap_ms_median_without_swaps"] > 0
    assert swap["stall_ms"] == pytest.approx(
        swap["step_gap_ms_max_during_swaps"] - swap["step_gap_ms_median_without_swaps"]
    )
    text = doc.read_text()
    assert "<!-- BEGIN serving -->" in text and f"{swap['stall_ms']:.0f} ms" in text
    assert f"| {name} | {row['next_pair_ms_crowd']['p95']:.0f} ms |" in text
