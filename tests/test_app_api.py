"""The app's HTTP API end to end through gradio_client: a real server (demo.launch), a real tiny SD1.5 pipeline and a
real DuckDB file. Concurrency (8 clients x 50 votes, each recorded exactly once), refusals that change nothing,
admin credentials checked on the server, and the configuration table kept in sync with the docs.

    python -m pytest -q tests/test_app_api.py
"""

from __future__ import annotations

import json
import random
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from app_fixtures import ADMIN_TOKEN, MIX, free_port, make_adapter_version, tiny_runtime
from gradio_client import Client

import app
from jobs.loop_config import LoopConfig
from jobs.registry import BASE
from jobs.runtime import SHAPES_MODEL, base_model_id
from ncp.serving import PairMix
from ncp.shapes.model import (
    DEFAULT_GATE_PAIRS,
    DEFAULT_ROUND_EVERY_S,
    DEFAULT_ROUND_LR,
    DEFAULT_ROUND_MIN_VOTES,
    DEFAULT_ROUND_STEPS,
)
from ncp.shapes.model import DEFAULT_STEPS as SHAPES_STEPS
from ncp.shapes.model import DEFAULT_TIMESTEP_LOW as SHAPES_TIMESTEP_LOW

ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("left", "right", "tie", "both_bad")


class Clock:
    """The per-address limiters' clock, moved by hand (a test waits a minute in no time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("app_api")
    runtime = tiny_runtime(tmp, steps=1, size=32, prefetch=8)
    demo = app.build_demo(runtime, limiter_clock=CLOCK)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_kwargs(runtime)
    )
    try:
        yield runtime, f"http://127.0.0.1:{port}", tmp
    finally:
        demo.close()
        runtime.stop()


def _client(url: str, download_files: bool = True) -> Client:
    # ssl_verify=False: plain http on localhost, and without it gradio_client loads the CA bundle on every call
    # (about 100 ms of CPU each; measured).
    return Client(url, verbose=False, ssl_verify=False, download_files=download_files)


def _pair(client: Client, session: str, prompt: str = "") -> dict:
    return client.predict(session, prompt, api_name="/next_pair")


def _vote(client: Client, session: str, token: str, outcome: str, reasons: object = "") -> dict:
    return client.predict(session, token, outcome, reasons, api_name="/vote")


def test_8_clients_x_50_votes_each_recorded_exactly_once(served) -> None:
    runtime, url, _ = served
    before = {v.vote_id for v in runtime.store.votes()}
    lock = threading.Lock()
    acked: list[tuple[int, str, str, int]] = []  # (vote_id, session, outcome, pair_id)
    files: list[str] = []

    def rater(i: int) -> None:
        client, rng, session = _client(url, download_files=i == 0), random.Random(i), f"bot-{i}"
        for n in range(50):
            pair = _pair(client, session)
            assert "error" not in pair, pair
            outcome = rng.choice(OUTCOMES)
            res = _vote(client, session, pair["token"], outcome, ["artifacts"] if n % 2 else "looks, prompt following")
            assert "error" not in res, res
            assert res["outcome"] == outcome
            with lock:
                acked.append((res["vote_id"], session, outcome, pair["pair_id"]))
                if i == 0 and n < 3:
                    files.extend([pair["left_image"], pair["right_image"]])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(rater, range(8)))  # re-raises any client's failure

    ids = [a[0] for a in acked]
    assert len(ids) == 400 and len(set(ids)) == 400
    stored = {v.vote_id: v for v in runtime.store.votes() if v.vote_id not in before}
    assert set(stored) == set(ids)  # every acknowledged vote is stored, and nothing else
    for vote_id, session, outcome, pair_id in acked:
        v = stored[vote_id]
        assert (v.session, v.outcome, v.pair_id) == (session, outcome, pair_id)
        assert v.rater == runtime.rater_id(f"session:{session}") and v.time_to_vote_ms is not None
    assert {len(stored[i].reasons) for i in ids} == {1, 2}
    for f in files:  # gradio_client downloaded real PNGs
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refusals_return_an_error_and_change_nothing(served) -> None:
    runtime, url, _ = served
    c = _client(url)
    first = _pair(c, "ref-a")
    ok = _vote(c, "ref-a", first["token"], "left")
    other = _pair(c, "ref-b")
    _vote(c, "ref-b", other["token"], "tie")  # ref-b is a known rater now: its refusals below must add nothing
    fresh = _pair(c, "ref-a")
    # The prefetch thread stores the pairs it makes (images, prompts) in the background; pause it so that any row
    # that appears below could only come from a refused request.
    runtime.arena.prefetcher.stop()
    counts = runtime.store.counts()
    refused = {
        "unknown_token": _vote(c, "ref-a", "Z" * 43, "left"),
        "invalid_outcome": _vote(c, "ref-a", fresh["token"], "sideways"),
        "conflicting_vote": _vote(c, "ref-a", first["token"], "right"),
        "wrong_session": _vote(c, "ref-b", fresh["token"], "left"),
        "reasons_too_large": _vote(c, "ref-a", fresh["token"], "left", ["x"] * 100),
        "invalid_session": _vote(c, "no spaces allowed", fresh["token"], "left"),
    }
    typed = {
        "control_chars": _pair(c, "ref-a", "a red\x00 circle"),
        "too_long": _pair(c, "ref-a", "a" * 400),
        "invalid_session": _pair(c, "x" * 200),
    }
    for code, res in [*refused.items(), *typed.items()]:
        assert res["error"] == code, (code, res)
        assert isinstance(res["message"], str) and len(res["message"]) > 10
    assert runtime.store.counts() == counts  # no row anywhere: no vote, pair, prompt, image or rater
    again = _vote(c, "ref-a", first["token"], "left")  # an identical retry is not a new vote
    assert again == ok and runtime.store.counts() == counts
    # the refused pair is still open: its rightful session votes on it
    assert _vote(c, "ref-a", fresh["token"], "both_bad")["outcome"] == "both_bad"


def test_admin_api_checks_credentials_on_the_server(served) -> None:
    runtime, url, tmp = served
    c = _client(url)
    loop = runtime.config.loop
    version = make_adapter_version(runtime.registry, tmp, loop.lora_rank, loop.lora_alpha)
    runtime.store.register_adapter_version(version, BASE, None, {"test": True}, status="published")  # as the loop does
    blocklist = runtime.blocklist.path.read_text() if runtime.blocklist.path.exists() else ""
    codes = []
    for token in ("", "wrong-token", ADMIN_TOKEN[:-1]):
        for action, value in [("run_round", ""), ("pause", ""), ("resume", ""), ("promote", version)]:
            codes.append(c.predict(token, action, value, api_name="/admin")["error"])
        codes.append(c.predict(token, "set_blocklist", "castle", api_name="/admin")["error"])
    # No token: refused, not counted. Wrong tokens: 5 refused, then this address is throttled for a minute.
    assert codes == ["admin_denied"] * 10 + ["admin_rate_limited"] * 5, codes
    assert runtime.scheduler.paused and runtime.registry.current() == BASE
    assert (runtime.blocklist.path.read_text() if runtime.blocklist.path.exists() else "") == blocklist
    assert runtime.generation.serving_version == BASE
    throttled = c.predict(ADMIN_TOKEN, "status", "", api_name="/admin")  # the right token waits too
    assert throttled["error"] == "admin_rate_limited" and 0 < throttled["retry_after_s"] <= 60
    CLOCK.now += 61

    admin = lambda action, value="": c.predict(ADMIN_TOKEN, action, value, api_name="/admin")  # noqa: E731
    assert admin("resume")["ok"] and not runtime.scheduler.paused
    assert admin("pause")["ok"] and runtime.scheduler.paused
    assert admin("fly")["error"] == "unknown_action"
    assert admin("promote", "v9999")["error"] == "invalid_value"
    assert admin("set_blocklist", "castle\n# comment\n")["ok"]
    assert _pair(c, "adm", "a castle on a hill")["error"] == "blocked"
    assert admin("promote", version)["ok"] and runtime.registry.current() == version
    seen = set()
    for _ in range(6):  # the queue was flushed on the swap: new pairs come from the new version
        pair = _pair(c, "adm")
        res = _vote(c, "adm", pair["token"], "tie")
        seen |= {res["left_version"].split("+")[0], res["right_version"].split("+")[0]}
    assert version in seen and seen <= {version, BASE}
    assert admin("promote", BASE) == {"ok": True, "message": f"Now serving base (was {version})."}
    assert runtime.generation.serving_version == BASE
    assert runtime.store.adapter_version(version).status == "rolled_back"
    # status reports the handlers' own server-side times: at least the 6 votes and 7 pairs of this test
    handler = json.loads(admin("status")["message"])["handler_ms"]
    assert handler["vote"]["n"] >= 6 and handler["next_pair"]["n"] >= 7
    assert 0 < handler["vote"]["p50"] <= handler["vote"]["p99"] <= handler["vote"]["max"]
    assert c.predict("wrong-token", "status", "", api_name="/admin")["error"] == "admin_denied"


def test_a_session_is_registered_when_it_gets_its_first_pair(served) -> None:
    """The API registers a new session's rater pseudonym when it issues the pair, so the first vote is one commit;
    a refused pair request registers nothing."""
    runtime, url, _ = served
    c = _client(url)
    rater = runtime.rater_id("session:first-timer")
    assert _pair(c, "first-timer", "x" * 5000)["error"] == "too_long"
    assert runtime.store.rater(rater) is None
    pair = _pair(c, "first-timer")
    assert runtime.store.rater(rater) is not None and runtime.store.rater(rater).status == "active"
    res = _vote(c, "first-timer", pair["token"], "right")
    assert runtime.store.vote(res["vote_id"]).rater == rater


def test_control_pairs_reach_the_rater(served) -> None:
    """Attention-check pairs (one deliberately broken image) are issued and voted on like any other pair."""
    runtime, url, _ = served
    c, prefetcher = _client(url), runtime.arena.prefetcher
    prefetcher.mix = PairMix(on_policy=0.0, cross_version=0.0, control=1.0)
    results = []
    try:
        prefetcher.flush()
        # A pair already being generated when the mix changed may still arrive: draw until 3 control pairs came.
        for _ in range(12):
            r = _pair(c, "ctl")
            assert "error" not in r, r
            if runtime.store.pair(r["pair_id"]).kind == "control":
                results.append(r)
            if len(results) == 3:
                break
    finally:
        prefetcher.mix = MIX
    assert len(results) == 3, "the prefetcher never produced control pairs"
    reveals = [_vote(c, "ctl", r["token"], "left") for r in results]
    for r, rev in zip(results, reveals, strict=True):
        pair = runtime.store.pair(r["pair_id"])
        assert pair.control_bad_side in ("left", "right")
        # Voting "left" passes the check exactly when the broken image is on the right.
        assert rev["control_passed"] == (pair.control_bad_side == "right"), (rev, pair)


def test_config_table_is_generated_and_in_sync() -> None:
    assert (ROOT / "docs" / "CONFIG.md").read_text() == app.config_markdown(), "run: python app.py --print-config"
    names = {v.name for v in app.ENV_VARS}
    readme = (ROOT / "README.md").read_text()
    assert not [n for n in names if f"`{n}`" not in readme], "README must list every variable of docs/CONFIG.md"


def test_config_from_env_maps_every_variable(tmp_path: Path) -> None:
    env = {
        "NCP_DATA_DIR": str(tmp_path / "d"),
        "NCP_MODEL": str(tmp_path / "m"),
        "NCP_ADMIN_TOKEN": "tok",
        "NCP_ADMIN_USERS": "alice, bob,",
        "NCP_RATER_SALT": "0123456789abcdef0123",
        "NCP_TRAIN_EVERY_S": "60",
        "NCP_MIN_NEW_VOTES": "5",
        "NCP_CONTINUE_REJECTED": "0",
        "NCP_TIMESTEP_LOW": "0.5",
        "NCP_DPO_REFERENCE": "init",
        "NCP_TRAIN_WINDOW": "serving",
        "NCP_ROUND_SPACE": "latent",
        "NCP_STEPS": "7",
        "NCP_GUIDANCE": "1.5",
        "NCP_SCHEDULE": "0",
        "NCP_PREFETCH": "3",
        "NCP_RATINGS_PER_PAIR": "2",
        "NCP_HUB_DATASET_REPO": "alice/prefs",
        "HF_TOKEN": "hf_x",
        "NCP_HUB_PUSH_EVERY_S": "600",
        "NCP_GENERATION_WORKER": "0",
        "NCP_GENERATION_NICE": "5",
        "NCP_DEVICE": "cuda:1",
    }
    cfg = app.config_from_env(env)
    assert cfg.ratings_per_pair == 2
    assert (cfg.generation_worker, cfg.generation_nice, cfg.device) == (False, 5, "cuda:1")
    assert (cfg.hub_push.repo_id, cfg.hub_push.token, cfg.hub_push.every_s) == ("alice/prefs", "hf_x", 600.0)
    assert cfg.data_dir == tmp_path / "d" and cfg.model == str(tmp_path / "m") and cfg.loop.model == cfg.model
    assert (cfg.admin_token, cfg.admin_users, cfg.rater_salt) == ("tok", ("alice", "bob"), "0123456789abcdef0123")
    assert (cfg.loop.train_every_s, cfg.loop.min_new_votes, cfg.loop.continue_rejected) == (60.0, 5, 0)
    assert (cfg.loop.timestep_low, cfg.loop.reference, cfg.loop.train_window) == (0.5, "init", "serving")
    assert (cfg.loop.space, cfg.loop.beta) == ("latent", 5000.0)  # latent rounds take their own beta (METHOD.md)
    assert (cfg.sampling.steps, cfg.sampling.guidance, cfg.schedule, cfg.prefetch) == (7, 1.5, False, 3)
    default = app.config_from_env({})
    assert default.schedule and default.admin_token is None and default.is_shapes and default.hub_push is None
    assert (default.loop.space, default.loop.beta) == ("ncp", 5e5)  # the product's method: NCP-DPO
    # lineage: the embedded model by its short id, any other base (a detuned shapes base too) as configured
    assert base_model_id(default.model) == "shapes-base" and app.config_from_env({}).is_shapes
    # A base pretrained from the embedded model (a detuned one: README) is a shapes model by its tokenizer, not its
    # name: it gets the grammar's pool, the judge-gated loop and the world's sampling, as bench/loop.py measures it.
    derived = tmp_path / "my-base"
    shutil.copytree(SHAPES_MODEL / "tokenizer", derived / "tokenizer")
    detuned = app.config_from_env({"NCP_MODEL": str(derived)})
    assert detuned.is_shapes and base_model_id(detuned.model) == str(derived)
    assert detuned.loop.shapes_probes > 0 and detuned.sampling.steps == SHAPES_STEPS == detuned.loop.probe_steps
    assert detuned.loop.timestep_low == SHAPES_TIMESTEP_LOW
    lookalike = tmp_path / "shapes-sd15"  # named like one, with another tokenizer
    (lookalike / "tokenizer").mkdir(parents=True)
    (lookalike / "tokenizer" / "tokenizer.json").write_text("{}")
    other_named = app.config_from_env({"NCP_MODEL": str(lookalike)})
    assert not other_named.is_shapes and other_named.loop.shapes_probes == 0
    assert default.generation_worker and default.device == "auto"  # the app generates in its own process
    # The shapes world trains on its high-noise slice; another model keeps the paper's uniform t unless told.
    other = app.config_from_env({"NCP_MODEL": str(tmp_path / "m")})
    assert default.loop.timestep_low == SHAPES_TIMESTEP_LOW > 0 == other.loop.timestep_low
    # ...and runs the rounds bench.loop measures (its lr and steps), another model the LoopConfig defaults.
    rounds = ("lr", "max_steps", "train_every_s", "min_new_votes", "eval_max_pairs")
    shapes_rounds = (
        DEFAULT_ROUND_LR,
        DEFAULT_ROUND_STEPS,
        DEFAULT_ROUND_EVERY_S,
        DEFAULT_ROUND_MIN_VOTES,
        DEFAULT_GATE_PAIRS,
    )
    assert tuple(getattr(default.loop, k) for k in rounds) == shapes_rounds
    assert tuple(getattr(other.loop, k) for k in rounds) == tuple(getattr(LoopConfig(), k) for k in rounds)
    assert app.config_from_env({"NCP_MIN_NEW_VOTES": "40"}).loop.min_new_votes == 40  # the variable still wins
    for bad, match in [
        ({"NCP_STEPS": "many"}, "NCP_STEPS"),
        ({"NCP_SCHEDULE": "yes"}, "NCP_SCHEDULE"),
        ({"NCP_RATER_SALT": "short"}, "NCP_RATER_SALT"),
        ({"NCP_STEPS": "0"}, "steps"),
        ({"NCP_HUB_DATASET_REPO": "alice/prefs"}, "token"),
        ({"NCP_GENERATION_WORKER": "yes"}, "NCP_GENERATION_WORKER"),
        ({"NCP_GENERATION_NICE": "20"}, "NCP_GENERATION_NICE"),
        ({"NCP_DEVICE": "tpu"}, "NCP_DEVICE"),
        ({"NCP_DEVICE": "cuda:first"}, "NCP_DEVICE"),
        ({"NCP_CONTINUE_REJECTED": "-1"}, "continue_rejected"),
        ({"NCP_TIMESTEP_LOW": "1"}, "timestep_low"),
        ({"NCP_DPO_REFERENCE": "previous"}, "reference"),
        ({"NCP_TRAIN_WINDOW": "recent"}, "train_window"),
        ({"NCP_ROUND_SPACE": "pixel"}, "NCP_ROUND_SPACE"),
    ]:
        with pytest.raises(ValueError, match=match):
            app.config_from_env(bad)


def test_the_browser_protocol_client_reaches_the_same_handlers(served) -> None:
    """bench/queue_client.py (the serving bench's keep-alive client) goes through Gradio's queue like the page: the
    vote is stored for the session's rater, refusals come back as the same error dicts, unknown endpoints raise."""
    from bench.queue_client import QueueClient, QueueError

    runtime, url, _ = served
    q = QueueClient(url)
    try:
        pair = q.call("next_pair", "queue-client", "")
        res = q.call("vote", "queue-client", pair["token"], "left", "")
        assert runtime.store.vote(res["vote_id"]).rater == runtime.rater_id("session:queue-client")
        assert q.call("vote", "queue-client", "forged", "left", "")["error"] == "unknown_token"
        with pytest.raises(QueueError, match="No endpoint 'nope'"):
            q.call("nope")
    finally:
        q.close()
