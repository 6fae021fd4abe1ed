"""bench/loop_test_report.py: the out-of-the-box loop's verdicts are read from the test probes only, at the votes and
minutes the goals name, and a null arm is judged against its band."""

from __future__ import annotations

from pathlib import Path

from bench import loop_test_report as report


def _round(version: str | None, status: str, votes: int, minutes: float, round_s: float = 120.0) -> dict:
    return {"version": version, "status": status, "votes": votes, "finished_at_s": 60 * minutes, "round_s": round_s}


def _result(rounds: list[dict], gains: dict[str, tuple[float, float, float]], ceiling: float | None = 0.8) -> dict:
    versions = {v: {"judge_gain_vs_base": g, "judge_gain_boot95": [lo, hi], "attributes": {"color": 0.5}}
                for v, (g, lo, hi) in gains.items()}  # fmt: skip
    test = {"probes": 96, "seeds": 2, "seed_offset": 5000, "base_judge": 0.55, "base_attributes": {"color": 0.2},
            "versions": versions, "ceiling": ceiling, "ceiling_attributes": {"color": 0.95}}  # fmt: skip
    config = {"model": "models/shapes-base", "raters": 8, "max_steps": 200, "train_every": 15.0, "min_new_votes": 150}
    return {"config": config, "rounds": rounds, "test": test, "wall_s": 1800.0, "raters": {"votes": 6000}}


def test_served_version_at_a_vote_count_is_the_last_promoted_before_it() -> None:
    res = _result(
        [
            _round("v0001", "promoted", 900, 5),
            _round(None, "rejected", 1500, 9),
            _round("v0002", "promoted", 2400, 14),
            _round("v0003", "promoted", 5200, 25),
        ],  # fmt: skip
        {"v0001": (0.05, 0.02, 0.08), "v0002": (0.12, 0.08, 0.16), "v0003": (0.14, 0.10, 0.18)},
    )
    assert [p["version"] for p in report.served_curve(res)] == ["base", "v0001", "v0002", "v0003"]
    assert report.served_at(res, 2000, 1800)["version"] == "v0001"  # v0002 came after 2,000 votes
    assert report.served_at(res, 6000)["version"] == "v0003"
    lines = report.goal_lines(res, None)
    assert "not met (v0001: +0.050" in lines[1]  # +0.10 within 2,000 votes: only v0001 was served by then
    assert "met (v0003 closes 56%)" in lines[2]  # 0.14 of a 0.25 gap


def test_a_gain_needs_its_lower_bound_above_zero_and_the_null_arm_its_band() -> None:
    res = _result([_round("v0001", "promoted", 1500, 8)], {"v0001": (0.11, -0.01, 0.23)})
    assert (
        "- Gain >= +0.10 (bootstrap 95% lower bound > 0) within 2000 votes and 30 min: not met"
        in report.goal_lines(res, None)[1]
    )
    null_ok = _result([_round("v0001", "promoted", 1500, 8)], {"v0001": (0.015, -0.02, 0.05)})
    null_bad = _result([_round("v0001", "promoted", 1500, 8)], {"v0001": (0.04, 0.0, 0.08)})
    assert report.goal_lines(res, null_ok)[-1].startswith("- Null arm (coin-flip labels) within ±0.02: met")
    assert report.goal_lines(res, null_bad)[-1].startswith("- Null arm (coin-flip labels) within ±0.02: not met")
    slow = _result([_round("v0001", "promoted", 1500, 8, round_s=301)], {"v0001": (0.2, 0.1, 0.3)})
    assert any(
        line.startswith("- Every round <= 5 min: not met (longest 301 s") for line in report.goal_lines(slow, None)
    )


def test_section_and_plot_are_written(tmp_path: Path) -> None:
    res = _result([_round("v0001", "promoted", 1500, 8)], {"v0001": (0.12, 0.05, 0.19)})
    md = report.markdown(res, None)
    assert "| v0001 | 8.0 | 1500 | +0.120 (+0.050..+0.190) | 48% |" in md
    assert "color 0.20 -> 0.50 (ceiling 0.95)" in md
    report.plot(res, res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_other_runs_of_the_command_are_tabled_and_counted_against_the_goal(tmp_path: Path) -> None:
    """Issue goals hold "in every run": each replicate gets a row, and the count of runs that met +0.10 by 2,000 votes
    reads each run's own served version; a run of another base is left out."""
    shown = _result([_round("v0001", "promoted", 1500, 8)], {"v0001": (0.12, 0.05, 0.19)})
    short = _result([_round("v0001", "promoted", 2500, 12, round_s=250)], {"v0001": (0.15, 0.1, 0.2)})
    other_base = _result([_round("v0001", "promoted", 900, 5)], {"v0001": (0.3, 0.2, 0.4)})
    other_base["test"]["base_judge"] = 0.61
    md = report.markdown(shown, None, others=[("replicate1", short), ("replicate2", other_base)])
    assert "within 2000 votes in 1 of 2 runs" in md
    assert (
        "| shown above | 6000 in 30 min | v0001 +0.120 (+0.050..+0.190) | v0001 +0.120 (48%) | 1 of 1 | 120 s |" in md
    )
    assert "| replicate1 | 6000 in 30 min | base +0.000 (+0.000..+0.000) | v0001 +0.150 (60%) | 1 of 1 | 250 s |" in md
    assert "replicate2" not in md
    assert "Every run of this command" not in report.markdown(shown, None)
    report.plot(shown, None, tmp_path / "p.png", [short])
    assert (tmp_path / "p.png").stat().st_size > 10_000
