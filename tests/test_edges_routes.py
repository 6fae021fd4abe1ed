"""Gradio's own routes on a real server (tiny SD1.5 pipeline, real DuckDB file, demo.launch, raw HTTP with httpx):
what EdgeGuard (ui/edges.py) answers that Gradio would answer with a 500, a broken stream or by running a hidden
handler: the direct routes that skip the queue (/run/<name>, /api/<name>), an unknown fn_index or an empty session
hash on the page's queue, a body that is not JSON, an unknown keyword on /call/v2, an unknown event's result; missing
arguments of a public endpoint reach the handler as null; and the retention rule deleting a pair that expired unvoted
on the request path, never a voted one.

    python -m pytest -q tests/test_edges_routes.py
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from app_fixtures import free_port, tiny_runtime

import app


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("edges_routes")
    runtime = tiny_runtime(tmp, steps=1, size=32, prefetch=2)
    demo = app.build_demo(runtime)
    port = free_port()
    kw = app.launch_kwargs(runtime)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **kw)
    try:
        yield runtime, demo, f"http://127.0.0.1:{port}"
    finally:
        demo.close()
        runtime.stop()


def post(url: str, path: str, **kw: object) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as http:  # a fresh connection: a 500 may have closed the last one
        return http.post(path, **kw)


def call(url: str, api: str, data: list) -> dict:
    event = post(url, f"/gradio_api/call/{api}", json={"data": data}).json()["event_id"]
    with httpx.Client(base_url=url, timeout=120) as http:
        text = http.get(f"/gradio_api/call/{api}/{event}").text
    kind = text.split("event:", 1)[1].split("\n", 1)[0].strip()
    assert kind == "complete", text[:300]
    return json.loads(text.split("data:", 1)[1])[0]


def fn_index(demo, name: str) -> int:
    return next(i for i, f in demo.fns.items() if f.name == name)


def stored(runtime) -> dict:
    """What a request could have written: the prefetch worker adds images and prompts in the background whenever the
    queue runs low, so those two counts move on their own and are left out."""
    counts = runtime.store.counts()
    return {k: v for k, v in counts.items() if k not in ("images", "prompts")}


def test_direct_routes_that_skip_the_queue_are_refused(served) -> None:
    runtime, demo, url = served
    before = stored(runtime)
    for route in ("run", "api"):
        for name in ("on_export", "on_admin", "export", "next_pair"):
            r = post(url, f"/gradio_api/{route}/{name}", json={"data": [""]})
            assert r.status_code == 404 and r.json()["error"] == "not_an_endpoint", (route, name, r.text)
            assert "/gradio_api/call/" in r.json()["message"]
    assert stored(runtime) == before  # on_export made no snapshot, next_pair issued no pair
    assert demo.api_open is False  # Gradio's own refusal of those routes, behind EdgeGuard's


def test_the_page_queue_refuses_unknown_events_and_empty_sessions(served) -> None:
    runtime, demo, url = served
    before = stored(runtime)
    pool = fn_index(demo, "on_pool_pair")
    for bad in (9999, -1, "x", 1.5):
        r = post(url, "/gradio_api/queue/join", json={"data": [], "fn_index": bad, "session_hash": "edge-q"})
        assert r.status_code == 404 and r.json()["error"] == "not_an_endpoint", (bad, r.text)
    for session in ("", 5):
        r = post(url, "/gradio_api/queue/join", json={"data": [], "fn_index": pool, "session_hash": session})
        assert r.status_code == 400 and r.json()["error"] == "invalid_session", (session, r.text)
    r = post(url, "/gradio_api/queue/join", content=b"\xff\xfe not json")
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert stored(runtime) == before


def test_malformed_bodies_get_a_json_refusal_never_a_500(served) -> None:
    _, _, url = served
    cases = {
        "bytes, no content type": dict(content=b"\xff\x00 not json"),
        "bytes, JSON content type": dict(content=b"\xff\xfe", headers={"content-type": "application/json"}),
        "a JSON list": dict(json=["left"]),
        "data not a list": dict(json={"data": "left"}),
    }
    for name, kw in cases.items():
        r = post(url, "/gradio_api/call/vote", **kw)
        assert r.status_code in (400, 422) and r.json()["error"] == "bad_request", (name, r.status_code, r.text)
    r = post(url, "/gradio_api/call/v2/export", json={"nope": 1})  # an unknown keyword: Gradio raises TypeError
    assert r.status_code == 400 and r.json()["error"] == "bad_request" and "nope" in r.json()["message"]
    assert post(url, "/gradio_api/call/v2/export", json={"token": ""}).status_code == 200  # the right keyword


def test_the_result_of_an_unknown_event_is_a_404_not_a_broken_stream(served) -> None:
    _, _, url = served
    with httpx.Client(base_url=url, timeout=120) as http:
        r = http.get("/gradio_api/call/export/0123456789abcdef")
        assert r.status_code == 404 and r.json()["error"] == "unknown_event"
        r = http.get("/gradio_api/call/on_export/0123456789abcdef")
        assert r.status_code == 404 and r.json()["error"] == "not_an_endpoint"


def test_missing_arguments_reach_the_handler_as_null(served) -> None:
    runtime, demo, url = served
    pair = call(url, "next_pair", ["edge-args"])  # prompt left out: the pool, as documented
    assert "token" in pair
    assert call(url, "next_pair", [])["error"] == "invalid_session"
    vote = call(url, "vote", ["edge-args", pair["token"], "left"])  # reasons left out: none
    assert "vote_id" in vote and runtime.store.vote(vote["vote_id"]).reasons == ()
    assert call(url, "admin", [])["error"] == "admin_denied"
    # The page's queue with an API handler and no arguments: a refusal in the event, not {"error": null}.
    body = {"data": [], "fn_index": fn_index(demo, "api_next_pair"), "session_hash": "edge-args-q"}
    assert post(url, "/gradio_api/queue/join", json=body).status_code == 200
    with httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": "edge-args-q"}) as s:
            done = next(json.loads(ln[5:]) for ln in s.iter_lines() if "process_completed" in ln)
    assert done["success"] and done["output"]["data"][0]["error"] == "invalid_session", done


def test_a_pair_that_expired_unvoted_is_deleted_on_the_request_path_a_voted_one_never(served) -> None:
    runtime, _, url = served
    arena = runtime.arena
    saved = arena.pair_ttl_s, arena.unvoted_retention_s, arena.purge_every_s
    arena.pair_ttl_s, arena.unvoted_retention_s, arena.purge_every_s = 1, 0.0, 0.0
    try:
        stale = call(url, "next_pair", ["edge-retain", ""])
        voted = call(url, "next_pair", ["edge-retain", ""])
        time.sleep(0.3)  # not "too fast"
        assert "vote_id" in call(url, "vote", ["edge-retain", voted["token"], "right", ""])
        time.sleep(1.6)  # both expire; the unvoted one is now past its retention (0 s after expiry)
        fresh = call(url, "next_pair", ["edge-retain-2", ""])  # any request runs the rule
        assert runtime.store.pair(stale["pair_id"]) is None
        assert runtime.store.pair(voted["pair_id"]) is not None and runtime.store.pair(fresh["pair_id"]) is not None
    finally:
        arena.pair_ttl_s, arena.unvoted_retention_s, arena.purge_every_s = saved
