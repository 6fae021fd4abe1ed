"""views.HandlerTimes: the app's record of time spent inside its handlers (admin "status" shows it)."""

from __future__ import annotations

import threading

from jobs.views import HandlerTimes


def test_percentiles_window_and_threads() -> None:
    times = HandlerTimes(window=100)
    for ms in range(1, 101):
        times.record("vote", float(ms))
    s = times.summary()["vote"]
    assert s == {"n": 100, "p50": 50.0, "p99": 99.0, "max": 100.0}
    times.record("vote", 1000.0)  # the oldest sample (1 ms) leaves the window
    s = times.summary()["vote"]
    assert s["n"] == 100 and s["max"] == 1000.0 and s["p50"] == 51.0
    assert "next_pair" not in times.summary()  # no calls, no entry

    threads = [threading.Thread(target=lambda: [times.record("next_pair", 2.0) for _ in range(50)]) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert times.summary()["next_pair"]["n"] == 100  # 400 records, bounded by the window
