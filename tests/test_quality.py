"""The Progress chart's numbers and words: the quality tracker measures base, ceiling and each published version of the
real shapes model in child processes (a few test probes here, 96 x 2 in the app), once per version; the chart shows
them with their intervals and the ceiling; rounds are explained in plain words; versions get human names."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from feedback_store.records import TrainingRun
from jobs import progress
from jobs.quality import QualitySettings, QualityTracker, read_quality
from jobs.registry import BASE, AdapterRegistry
from jobs.runtime import SHAPES_CEILING, SHAPES_MODEL, ArenaConfig, Runtime
from ncp.pipelines import load_pipeline
from tests.helpers.adapters import random_adapter
from ui import progress as ui_progress
from ui.common import Ctx

SETTINGS = QualitySettings(probes=4, seeds=1, threads=1, nice=0)


def _shapes_adapter(folder: Path) -> Path:
    return random_adapter(load_pipeline(str(SHAPES_MODEL)), folder, rank=4, std=0.05)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("quality")
    data = tmp / "data"
    registry = AdapterRegistry(data / "adapters")
    version = registry.publish(_shapes_adapter(tmp / "adapter"), parent=BASE, snapshot_id=None, metrics={}).version
    registry.set_current(version, reason="test")
    tracker = QualityTracker(registry, data, str(SHAPES_MODEL), str(SHAPES_CEILING), SETTINGS)
    assert tracker.pending() == [BASE, "ceiling", version]
    assert tracker.run_pending() == 3, tracker.failed
    assert tracker.pending() == []  # measured once: a restart or the next poll measures nothing again
    other = QualityTracker(registry, data, str(SHAPES_CEILING), None, SETTINGS)
    assert other.pending() == [BASE, version]  # another served model: its records are not current
    return data, version


def test_records_hold_a_score_and_its_interval(measured) -> None:
    data, version = measured
    recs = read_quality(data)
    assert set(recs) == {BASE, "ceiling", version}
    for name, r in recs.items():
        assert 0.0 <= r["low"] <= r["judge"] <= r["high"] <= 1.0, (name, r)
        assert (r["probes"], r["seeds"], r["name"]) == (4, 1, name)
    assert recs["ceiling"]["key"]["model"] == str(SHAPES_CEILING)
    assert recs[version]["key"]["weights"] == AdapterRegistry(data / "adapters").info(version).weights_sha256


def test_shapes_chart_shows_the_served_line_band_and_ceiling(measured) -> None:
    data, version = measured
    runtime = Runtime(ArenaConfig(data_dir=data, schedule=False, prefetch=1))
    runtime.start()
    try:
        runtime.serve_current()
        series = progress.quality_series(runtime)
        assert [p["version"] for p in series["points"]] == [BASE, version] and series["pending"] == []
        assert progress.version_label(runtime, version).startswith(f"{version} (")
        assert progress.version_label(runtime, BASE) == "base (the starting model)"
        ctx = Ctx(runtime=runtime, quality=None)
        rows = progress.leaderboard_rows(runtime)
        rejected = [{"round": 2, "status": "rejected", "votes": 40, "reason": "not promoted: it scored <0.5>"}]
        head, svg = ui_progress.quality_view(ctx, rows, rejected)
        assert f"{version} scores" in head and "Ceiling" in head
        assert svg.startswith("<svg") and 'role="img"' in svg and "<title" in svg
        assert "ceiling" in svg and svg.count('class="promoted"') == 2 and svg.count('class="rejected"') == 1
        assert "&lt;0.5&gt;" in svg and "<0.5>" not in svg  # reasons are text
        assert "<polygon" in svg  # the 95% band
    finally:
        runtime.stop()


def _run(status: str, reason: str | None, metrics: dict, version: str | None = None) -> TrainingRun:
    now = datetime(2026, 1, 1)
    return TrainingRun(4, version, "v0002", "s1", {}, status, reason, metrics, now, now)


def test_rounds_in_plain_words() -> None:
    ev = {"versions": {"candidate": {"judge": 0.721, "implicit_acc": 0.5}, "serving": {"judge": 0.743}}}
    gate = "gate: only 0 held-out pairs: accuracy criterion not used; judge 0.721 vs 0.743 (delta -0.023 < +0.000)"
    text = progress.plain_reason(_run("failed", gate, {"eval": ev}))
    assert text == "not promoted: it scored 0.72 on the judge's probe prompts, not above v0002's 0.74"
    acc = {"versions": {"candidate": {"implicit_acc": 0.41}, "serving": {"implicit_acc": 0.55}}}
    acc_gate = "gate: implicit acc 0.41 vs 0.55 (SE 0.03) (delta -0.140 + 1.96 SE < -0.020)"
    text = progress.plain_reason(_run("failed", acc_gate, {"eval": acc}))
    assert text == "not promoted: it agreed with held-out votes less often than v0002 (41% vs 55%)"
    won = {"versions": {"candidate": {"judge": 0.8}, "serving": {"judge": 0.7}}}
    ok = progress.plain_reason(_run("succeeded", None, {"eval": won}, "v0003"))
    assert ok == "promoted: it scored 0.80 on the judge's probe prompts, vs 0.70 for v0002; now serving v0003"
    # The evidence rule (the shapes world): promoted on held-out votes, rejected within noise, vetoed by the judge.
    ev = {"versions": {"candidate": {"judge": 0.68, "implicit_acc": 0.636}}, "base_judge": 0.60}
    won = _run("succeeded", None, {"eval": ev, "gate": "implicit acc (ncp) 0.636 vs 0.500 (SE 0.047); judge"}, "v0003")
    assert progress.plain_reason(won) == (
        "promoted: it agreed with 64% of held-out votes (chance 50%, judge 0.68 vs 0.60); now serving v0003"
    )
    chained = {"versions": {"candidate": {"implicit_acc": 0.62}, "serving": {"implicit_acc": 0.61}}}
    won = _run("succeeded", None, {"eval": chained, "gate": "implicit acc (ncp) 0.620 vs 0.610"}, "v0003")
    assert (
        progress.plain_reason(won)
        == "promoted: it agreed with 62% of held-out votes (chance 50%, v0002 61%); now serving v0003"
    )
    ev["versions"]["candidate"]["implicit_acc"] = 0.55
    noise = "gate: implicit acc (ncp) 0.550 vs 0.500 (SE 0.040) (no evidence it learned the votes: delta +0.050 - 1.96 SE <= 0)"
    assert progress.plain_reason(_run("failed", noise, {"eval": ev})) == (
        "not promoted: it agreed with 55% of held-out votes, not clearly more than chance (50%)"
    )
    veto = "gate: implicit acc (ncp) 0.700 vs 0.500 (SE 0.040); judge 0.550 vs 0.600 (delta -0.050 < -0.020)"
    ev["versions"]["candidate"] |= {"implicit_acc": 0.7, "judge": 0.55}
    assert progress.plain_reason(_run("failed", veto, {"eval": ev})).endswith("too far below v0002's 0.60")
    few = progress.plain_reason(_run("failed", "only 9 trainable strict-preference pairs; need 16", {}))
    assert few.startswith("not trained: not enough votes with a clear winner yet")
    crash = progress.plain_reason(_run("failed", "training: killed by signal SIGKILL", {}))
    assert crash == "the round failed: training: killed by signal SIGKILL; the served version was kept"
    assert [progress.ago(s) for s in (5, 540, 7200, 3 * 86400)] == ["just now", "9 min ago", "2 h ago", "3 days ago"]
    assert progress.wilson(0, 0) != progress.wilson(0, 0)  # nan: no votes, no interval
    low, high = progress.wilson(12, 20)
    assert 0.38 < low < 0.6 < high < 0.8


def test_the_status_says_a_round_is_waiting_for_held_out_votes() -> None:
    s = {"serving": "base", "state": "idle", "paused": False, "new_votes": 3, "min_new_votes": 150, "next_run_in_s": 9,
         "last": {"status": "skipped", "reason": "waiting for votes: 48 of the 100 held-out pairs the gate needs to "
                  "tell learning from noise"}, "gpu_plan": ""}  # fmt: skip
    line = progress.status_lines(s)[0]
    assert "The last round waited for votes: 48 of the 100 held-out pairs" in line
    s["last"] = {"status": "skipped", "reason": "a round is already running"}
    assert "waited" not in progress.status_lines(s)[0]
