"""Abuse defences through the real HTTP API (gradio_client, a launched demo, a tiny SD1.5 pipeline, a DuckDB file):
the limits reach clients as refusal codes, too-fast votes succeed but are flagged, and no client IP or user agent
is stored anywhere under the data dir.

    python -m pytest -q tests/test_abuse_api.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from app_fixtures import free_port, tiny_runtime
from gradio_client import Client

import app
from feedback_store import FeedbackStore
from jobs.abuse import AbuseConfig, VoteGuard

ROOT = Path(__file__).resolve().parents[1]
UA = "CanaryBrowser/9.7 (ua-canary-5f3a)"
IP = "203.0.113.77"  # TEST-NET-3: cannot be anything else in the store


def test_limits_reach_the_api_and_no_ip_or_user_agent_is_stored(tmp_path: Path) -> None:
    runtime = tiny_runtime(tmp_path, steps=1, size=32, prefetch=2)
    # The per-address limit on (but generous): the address is read for it, and must still never be stored.
    config = AbuseConfig(votes_per_minute=0.5, burst=2, daily_cap=0, min_vote_ms=60_000, review_every_votes=0,
                         address_votes_per_minute=1000, trusted_proxy_hops=1)  # fmt: skip
    runtime.arena.guard = VoteGuard(runtime.store, config)
    demo = app.build_demo(runtime)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_kwargs(runtime))  # fmt: skip
    try:
        headers = {"User-Agent": UA, "X-Forwarded-For": IP, "X-Real-IP": IP}
        c = Client(f"http://127.0.0.1:{port}", verbose=False, ssl_verify=False, headers=headers, download_files=False)
        reveals = []
        for _ in range(2):
            pair = c.predict("canary-session", "", api_name="/next_pair")
            reveals.append(c.predict("canary-session", pair["token"], "left", "", api_name="/vote"))
        assert all("vote_id" in r for r in reveals), reveals  # a too-fast vote looks like any other to the client
        for r in reveals:  # ... but it is stored flagged, and never trained on
            assert runtime.store.vote(r["vote_id"]).excluded_reason == "too_fast"
        pair = c.predict("canary-session", "", api_name="/next_pair")
        runtime.arena.prefetcher.stop()  # it stores the pairs it makes in the background; only the refusal may act
        counts = runtime.store.counts()
        refused = c.predict("canary-session", pair["token"], "left", "", api_name="/vote")
        assert refused["error"] == "rate_limited" and "per minute" in refused["message"], refused
        assert runtime.store.counts() == counts
    finally:
        demo.close()
        runtime.stop()

    data = tmp_path / "data"
    with FeedbackStore(data / "arena.duckdb") as store:  # every value of every table, as text
        cur = store._cur()
        tables = [r[0] for r in cur.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        dump = "\n".join(str(cur.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables)
        assert store.counts()["votes"] == 2
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.name == "arena.duckdb" for p in files)
    for needle in (UA, "ua-canary", IP, "127.0.0.1"):
        assert needle not in dump
        for path in files:  # the DuckDB file, its WAL, images, adapters, anything else the app wrote
            assert needle.encode() not in path.read_bytes(), (needle, path)


def test_only_the_address_limit_reads_the_client_address_and_nothing_reads_the_user_agent() -> None:
    """Raters are Gradio's session hash or the OAuth username (pseudonymized). The one reader of the request's
    address is `app._address`, for the in-memory per-address limits (votes: an HMAC under a per-process salt; admin
    attempts and exports); nothing else reads the client address or any header, so neither can reach the store."""
    import inspect

    needles = ("request.client", "request.headers", "client.host", "user-agent", "user_agent", 'forwarded-for")')
    sources = {p: p.read_text() for p in [ROOT / "app.py", *(ROOT / "jobs").rglob("*.py"),
                                          *(ROOT / "feedback_store").rglob("*.py")]}  # fmt: skip
    sources[ROOT / "app.py"] = sources[ROOT / "app.py"].replace(inspect.getsource(app._address), "")
    hits = [f"{p.name}: {n}" for p, text in sources.items() for n in needles if n in text.lower()]
    assert not hits, hits
    reader = inspect.getsource(app._address)
    assert "request.client" in reader and "x-forwarded-for" in reader  # the test above would miss a renamed reader


def test_the_address_limit_spans_sessions_and_trusts_only_the_proxy_entry(tmp_path: Path) -> None:
    """Rotating session ids does not dodge the per-address limit; behind one trusted proxy the address is the
    entry that proxy appended to X-Forwarded-For, so a client-forged left part changes nothing."""
    runtime = tiny_runtime(tmp_path, steps=1, size=32, prefetch=4)
    config = AbuseConfig(votes_per_minute=100, burst=100, daily_cap=0, min_vote_ms=0, review_every_votes=0,
                         address_votes_per_minute=0.5, address_burst=3, trusted_proxy_hops=1)  # fmt: skip
    runtime.arena.guard = VoteGuard(runtime.store, config)
    demo = app.build_demo(runtime)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_kwargs(runtime))  # fmt: skip

    def vote(forwarded_for: str, session: str) -> dict:
        headers = {"X-Forwarded-For": forwarded_for}
        c = Client(f"http://127.0.0.1:{port}", verbose=False, ssl_verify=False, headers=headers, download_files=False)
        pair = c.predict(session, "", api_name="/next_pair")
        return c.predict(session, pair["token"], "left", "", api_name="/vote")

    try:
        assert all("vote_id" in vote("198.51.100.1", f"rotating-{i}") for i in range(3))  # the address's burst
        before = runtime.store.counts()["votes"]
        refused = vote("198.51.100.1", "rotating-3")  # a fresh session id, the same network
        assert refused["error"] == "address_rate_limited" and "your network" in refused["message"], refused
        forged = vote("203.0.113.5, 198.51.100.1", "rotating-4")  # the client's own entry is not trusted
        assert forged["error"] == "address_rate_limited", forged
        assert runtime.store.counts()["votes"] == before  # refused: nothing stored
        assert "vote_id" in vote("198.51.100.2", "elsewhere")  # another network has its own bucket
    finally:
        demo.close()
        runtime.stop()


def test_config_from_env_maps_the_abuse_variables() -> None:
    env = {"NCP_VOTES_PER_MINUTE": "12", "NCP_VOTE_BURST": "4", "NCP_DAILY_VOTE_CAP": "200", "NCP_MIN_VOTE_MS": "900",
           "NCP_MIN_TRUST": "0.6", "NCP_REVIEW_EVERY_VOTES": "0", "NCP_ADDRESS_VOTES_PER_MINUTE": "90",
           "NCP_ADDRESS_BURST": "20", "NCP_TRUSTED_PROXY_HOPS": "2"}  # fmt: skip
    abuse = app.config_from_env(env).abuse
    assert abuse == AbuseConfig(votes_per_minute=12.0, burst=4, daily_cap=200, min_vote_ms=900, min_trust=0.6,
                                review_every_votes=0, address_votes_per_minute=90.0, address_burst=20,
                                trusted_proxy_hops=2)  # fmt: skip
    local, space = app.config_from_env({}).abuse, app.config_from_env({"SPACE_ID": "alice/arena"}).abuse
    assert (local.address_votes_per_minute, local.trusted_proxy_hops) == (0.0, 0)  # scripts and benches on one host
    assert (space.address_votes_per_minute, space.trusted_proxy_hops) == (120.0, 1)  # public, behind the Space proxy
    assert app.config_from_env({}).abuse == AbuseConfig()  # on by default in the deployed app
    assert app.config_from_env({"NCP_ABUSE_DEFENCES": "0"}).abuse is None
    for bad, match in [({"NCP_ABUSE_DEFENCES": "yes"}, "NCP_ABUSE_DEFENCES"), ({"NCP_VOTE_BURST": "0"}, "burst"),
                       ({"NCP_DAILY_VOTE_CAP": "lots"}, "NCP_DAILY_VOTE_CAP")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            app.config_from_env(bad)
