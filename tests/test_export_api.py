"""The researcher's export from a running app: the `/export` API (the newest snapshot, taken at call time, with its
manifest; limited per address; public or admin-only by setting), `python -m feedback_store.export --url` that
downloads and verifies it, the Data tab's snapshot time and row count, and the CLI's one-line errors (the app's
DuckDB lock, a missing database). Real server (tiny SD1.5 pipeline, demo.launch), real DuckDB file, real
subprocesses.

    python -m pytest -q tests/test_export_api.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from app_fixtures import ADMIN_TOKEN, free_port, tiny_runtime
from gradio_client import Client

import app
from jobs import views

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("export_api")
    runtime = tiny_runtime(tmp, steps=1, size=32, prefetch=4)
    demos = {
        "public": app.build_demo(runtime, limiter_clock=CLOCK),
        "admin": app.build_demo(runtime, export_access="admin"),
    }
    urls = {}
    for name, demo in demos.items():
        port = free_port()
        kw = app.launch_kwargs(runtime)
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **kw)
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        yield runtime, urls, tmp
    finally:
        for demo in demos.values():
            demo.close()
        runtime.stop()


def _client(url: str) -> Client:
    return Client(url, verbose=False, ssl_verify=False)


def _votes(client: Client, session: str, n: int) -> None:
    for i in range(n):
        pair = client.predict(session, "", api_name="/next_pair")
        time.sleep(0.3)  # not "too fast"
        assert "vote_id" in client.predict(session, pair["token"], ("left", "right")[i % 2], "", api_name="/vote")


def test_export_returns_a_snapshot_taken_at_call_time_with_its_manifest(served) -> None:
    runtime, urls, _ = served
    c = _client(urls["public"])
    _votes(c, "exp-a", 3)
    top = runtime.store.votes()[-1].vote_id
    res = c.predict("", api_name="/export")
    assert res["manifest"]["vote_id_max"] == top and res["newer_votes"] == 0  # every vote stored at the call
    assert res["snapshot_id"] == res["manifest"]["snapshot_id"] and res["created"].endswith("Z")
    assert res["rows"] == res["manifest"]["rows"] and "/" not in json.dumps(res["manifest"]["files"])
    assert Path(res["file"]).read_bytes()[:2] == b"PK"  # gradio_client downloaded the zip
    _votes(c, "exp-a", 1)  # a vote right after: the newest snapshot is < 10 s old, so it is reused, and says so
    again = c.predict("", api_name="/export")
    assert again["snapshot_id"] == res["snapshot_id"] and again["newer_votes"] == 1
    assert "1 newer vote(s) are not in it yet" in views.latest_export(runtime).summary()
    time.sleep(views.EXPORT_MIN_INTERVAL_S + 0.5)
    fresh = c.predict("", api_name="/export")
    assert fresh["snapshot_id"] != res["snapshot_id"] and fresh["newer_votes"] == 0
    assert fresh["manifest"]["vote_id_max"] == runtime.store.votes()[-1].vote_id
    summary = views.latest_export(runtime).summary()  # the Data tab's line
    assert fresh["snapshot_id"] in summary and "UTC" in summary and f"{fresh['rows']['total']} rows" in summary


def test_export_is_limited_per_address(served) -> None:
    runtime, urls, _ = served
    c = _client(urls["public"])
    CLOCK.now += 120  # a fresh minute for this address
    answers = [c.predict("", api_name="/export") for _ in range(app.EXPORTS_PER_MINUTE + 1)]
    assert all("snapshot_id" in a for a in answers[:-1])
    assert answers[-1]["error"] == "rate_limited" and 0 < answers[-1]["retry_after_s"] <= 60
    CLOCK.now += 61
    assert "snapshot_id" in c.predict("", api_name="/export")


def test_admin_only_export_needs_the_token(served) -> None:
    _, urls, _ = served
    c = _client(urls["admin"])
    assert c.predict("", api_name="/export")["error"] == "admin_denied"
    assert "snapshot_id" in c.predict(ADMIN_TOKEN, api_name="/export")


def test_cli_url_downloads_and_verifies_the_snapshot(served, tmp_path: Path) -> None:
    runtime, urls, _ = served
    cmd = [sys.executable, "-m", "feedback_store.export", "--url", urls["public"], "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    folder = tmp_path / out["snapshot_id"]
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == meta["sha256"]
    assert pq.read_metadata(folder / "train.parquet").num_rows == manifest["rows"]["train"]
    denied = subprocess.run([*cmd[:4], urls["admin"], *cmd[5:]], env=ENV, capture_output=True, text=True, timeout=900)
    assert denied.returncode == 2 and "admin_denied" in denied.stderr and "Traceback" not in denied.stderr


def test_cli_db_errors_are_one_line_with_exit_2(served, tmp_path: Path) -> None:
    runtime, _, _ = served
    cases = {
        "locked": (str(runtime.store.path), "--url"),  # the app (this process) holds the file
        "missing": (str(tmp_path / "nope.duckdb"), "no such database"),
    }
    for name, (db, word) in cases.items():
        cmd = [sys.executable, "-m", "feedback_store.export", "--db", db, "--out", str(tmp_path / "out")]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and word in lines[0], (name, proc.stderr)
        assert db in lines[0]
