"""bench/loop.py's `--space latent` arm: everything but the space and its beta identical to the default NCP run, its own
result file, and a report that names the method it trained with."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from bench import loop_arms, loop_test_report
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


def _shifted(result: dict, by: float) -> dict:
    """The same run with every served version's test gain moved by `by`."""
    out = copy.deepcopy(result)
    for row in out["test"]["versions"].values():
        row["judge_gain_vs_base"] += by
        row["judge_gain_boot95"] = [x + by for x in row["judge_gain_boot95"]]
    return out


def _write_arms(folder: Path, ncp: list[dict], latent: list[dict]) -> Path:
    bench = folder / "benchmarks"
    bench.mkdir(parents=True)
    for stem, runs in (("loop_default", ncp), ("loop_default_latent", latent)):
        for i, run in enumerate(runs):
            (bench / f"{stem}{f'_replicate{i}' if i else ''}.json").write_text(json.dumps(run))
    return bench


def test_the_arms_section_compares_every_run_of_both_commands_over_runs(tmp_path: Path) -> None:
    ncp = [json.loads((ROOT / "docs" / "benchmarks" / f"loop_default{s}.json").read_text())
           for s in ("", "_replicate1", "_replicate2")]  # fmt: skip
    served = [loop_arms.served_at(r, 6000)["gain"] for r in ncp]
    assert loop_arms.publish(_write_arms(tmp_path / "none", ncp, []), tmp_path / "none") is False  # no latent runs yet

    # latent: every run 0.10 higher, beyond any spread three runs of the shipped loop have shown (up to 0.046 apart)
    bench = _write_arms(tmp_path / "up", ncp, [_shifted(r, 0.10) for r in ncp])
    assert loop_arms.publish(bench, tmp_path / "up")
    text = (tmp_path / "up" / "BENCHMARKS.md").read_text()
    assert "latent DPO served 0.100 more than NCP-DPO" in text and "beyond the spread between runs" in text
    assert "| NCP-DPO | 3 | " in text and f"{sum(served) / 3:+.3f} ({served[0]:+.3f}, " in text
    assert (tmp_path / "up" / "loop_arms.png").read_bytes().startswith(b"\x89PNG")
    t = ncp[0]["test"]  # one run: the share of the colour gap its 6,000-vote version closed, by hand
    after = t["versions"][loop_arms.served_at(ncp[0], 6000)["version"]]["attributes"]["color"]
    by_hand = (after - t["base_attributes"]["color"]) / (
        t["ceiling_attributes"]["color"] - t["base_attributes"]["color"]
    )
    assert abs(loop_arms.attribute_closed(ncp[:1])["color"] - by_hand) < 1e-12
    closed = loop_arms.attribute_closed(ncp)
    assert (
        f"| NCP-DPO | {closed['color']:.0%} | " in text
        and f"color ({t['base_attributes']['color']:.2f} -> {t['ceiling_attributes']['color']:.2f})" in text
    )

    same = _write_arms(tmp_path / "same", ncp, ncp[::-1])  # the same runs in another order: no difference
    assert loop_arms.publish(same, tmp_path / "same")
    assert "no reliable difference" in (tmp_path / "same" / "BENCHMARKS.md").read_text()

    other_base = copy.deepcopy(ncp[0])
    other_base["test"]["base_judge"] += 0.01  # a latent arm run on another base is never compared
    assert loop_arms.publish(_write_arms(tmp_path / "other", ncp, [other_base]), tmp_path / "other") is False


def test_welch_interval_over_runs() -> None:
    d, lo, hi = loop_arms.welch([0.10, 0.12, 0.14], [0.0, 0.02, 0.04])
    # equal variances 0.0004, se = sqrt(2 * 0.0004 / 3), Welch df = 4: t = 2.776
    assert abs(d - 0.10) < 1e-12 and abs((hi - lo) / 2 - 2.776 * (0.0008 / 3) ** 0.5) < 1e-9
    assert all(math.isnan(x) for x in loop_arms.welch([0.1], [0.0, 0.1])[1:])  # one run: no interval (nan)
