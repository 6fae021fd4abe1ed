"""The server bench/bad_input.py's cases run against, and how a request reaches it.

`BadInputServer` is app.py's own configuration (`config_from_env`) and UI (`build_demo`, `launch_kwargs`) on the
embedded shapes model, launched in this process so each case can compare the stored state before and after (`state`:
every table's row count and a sha256 of each of its rows, the registry pointer, the blocklist file, the schedule
and the served version). `send` posts a `Request` over plain HTTP (httpx) through Gradio's REST protocol (POST
/gradio_api/call/<api>, then read the event stream), or through the page's queue, so wrong types, raw bytes and
malformed bodies reach the server exactly as sent, and returns the `Response`.
"""

from __future__ import annotations

import hashlib
import html
import http.client
import json
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import app
from bench.harness import free_port
from jobs.runtime import Runtime

ADMIN_TOKEN = "bad-input-admin-token-0123456789abcdef"
BLOCKED = "forbiddenword"  # put on the blocklist before the cases run
FULL = "forbiddenword\n# the benchmark's blocklist\n"


@dataclass(frozen=True)
class Request:
    api: str  # "vote" | "next_pair" | "admin" | "export" | anything else (an endpoint that does not exist)
    data: list | None = None  # the JSON arguments, or ...
    raw: bytes | None = None  # ... a raw request body
    same_vote_id: int | None = None  # an identical replay: the answer must be this vote's first receipt
    upload: bytes | None = None  # POST these bytes to /gradio_api/upload as a file instead
    queue_fn: str | None = None  # run this UI handler through the queue (/queue/join) with session_hash=api
    fn_index: int | None = None  # with queue_fn="": send this fn_index as is (one that names no event)
    route: str = "call"  # or "run" / "api" (Gradio's direct routes) or "call/v2" (keyword arguments in `raw`)
    content_type: str | None = "application/json"  # the header sent with the body (None: no header)


class BadInputServer:
    """The app (shapes model, defences on, schedule off) serving on a free localhost port, plus setup helpers."""

    def __init__(self, tmp: Path, steps: int = 2) -> None:
        env = {
            "NCP_DATA_DIR": str(Path(tmp) / "data"),
            "NCP_ADMIN_TOKEN": ADMIN_TOKEN,
            "NCP_RATER_SALT": "bad-input-salt-0123456789",
            "NCP_STEPS": str(steps),
            "NCP_SCHEDULE": "0",
            "NCP_PREFETCH": "4",
            "NCP_VOTES_PER_MINUTE": "100000",  # the cases come from a few sessions: rate limits are not under test
            "NCP_VOTE_BURST": "10000",
            "NCP_REVIEW_EVERY_VOTES": "0",  # no background review changing rater rows between before and after
        }
        self.config = app.config_from_env(env)
        self.runtime = Runtime(self.config)
        self.runtime.start()
        # No background prefetch: it stores the pairs it makes (images, prompts) at any moment, and every row that
        # appears between "before" and "after" must come from the request under test. Pairs are made on demand.
        self.runtime.arena.prefetcher.stop()
        self.demo = app.build_demo(self.runtime)
        port = free_port()
        self.demo.launch(
            server_name="127.0.0.1",
            server_port=port,
            prevent_thread_lock=True,
            quiet=True,
            **app.launch_kwargs(self.runtime),
        )
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(timeout=120)
        self.runtime.admin_set_blocklist(FULL, ADMIN_TOKEN)

    def __enter__(self) -> BadInputServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()
        self.demo.close()
        self.runtime.stop()

    # -- setup helpers (their requests happen before the "before" state is read) --------------------------------------
    def fresh(self, session: str) -> str:
        """A new pair issued to `session`; returns its token."""
        res = send(self, Request("next_pair", [session, ""]))
        if "token" not in res.body:
            raise RuntimeError(f"setup failed: /next_pair gave {res}")
        return res.body["token"]

    def voted(self, session: str, outcome: str = "left") -> tuple[str, dict]:
        token = self.fresh(session)
        reveal = send(self, Request("vote", [session, token, outcome, ""])).body
        if "vote_id" not in reveal:
            raise RuntimeError(f"setup failed: /vote gave {reveal}")
        return token, reveal

    def expired(self, session: str) -> str:
        """A pair issued with a 1 s time-to-live (ArenaConfig.pair_ttl_s, 1 h by default), then waited out."""
        arena = self.runtime.arena
        ttl, arena.pair_ttl_s = arena.pair_ttl_s, 1
        try:
            token = self.fresh(session)
        finally:
            arena.pair_ttl_s = ttl
        time.sleep(2.5)
        return token

    def state(self) -> dict:
        """What a refused request must not change: rows and content of every table (a sha256 of each row, so a case
        that is answered with a pair can be checked to have only added rows), files the admin edits."""
        store, rt = self.runtime.store, self.runtime
        counts = store.counts()
        cur = store._cur()
        rows = {
            table: frozenset(
                hashlib.sha256(repr(r).encode()).hexdigest() for r in cur.execute(f"SELECT * FROM {table}").fetchall()
            )
            for table in counts  # fixed table names from the store itself
        }
        pointer = rt.registry.pointer
        return {
            "counts": counts,
            "rows": rows,
            "registry_pointer": pointer.read_text() if pointer.exists() else None,
            "blocklist": rt.blocklist.path.read_text() if rt.blocklist.path.exists() else None,
            "paused": rt.scheduler.paused,
            "serving": rt.generation.serving_version,
        }


@dataclass(frozen=True)
class Response:
    kind: str  # "complete" | "error" (a Gradio error event) | "http" (a non-200 status)
    status: int
    body: dict = field(default_factory=dict)
    text: str = ""

    @property
    def code(self) -> str:
        if self.kind == "http":
            return f"http_{self.status}"
        if self.kind == "error":
            return "gradio_error"
        return str(self.body.get("error", "vote" if "vote_id" in self.body else "ok"))

    @property
    def message(self) -> str:
        if self.kind == "complete":
            return str(self.body.get("message", json.dumps(self.body)[:120]))
        return self.text[:160]


def send(srv: BadInputServer, req: Request) -> Response:
    """POST /gradio_api/call/<api> (JSON arguments or a raw body), then read the result from the event stream."""
    if req.upload is not None:
        r = srv.http.post(f"{srv.url}/gradio_api/upload", files={"files": ("big.html", req.upload)})
        return Response("http", r.status_code, text=r.text) if r.status_code != 200 else Response("complete", 200)
    if req.queue_fn is not None:
        return _send_queue(srv, req)
    body = req.raw if req.raw is not None else json.dumps({"data": req.data}).encode()
    headers = {"content-type": req.content_type} if req.content_type else {}
    r = srv.http.post(f"{srv.url}/gradio_api/{req.route}/{req.api}", content=body, headers=headers)
    if r.status_code != 200:
        return Response("http", r.status_code, text=r.text)
    s = srv.http.get(f"{srv.url}/gradio_api/{req.route}/{req.api}/{r.json()['event_id']}")
    event, data = "", ""
    for line in s.text.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = line.split(":", 1)[1].strip()
    if event == "complete":
        payload = json.loads(data)
        return Response("complete", s.status_code, payload[0] if payload and isinstance(payload[0], dict) else {})
    return Response("error", s.status_code, text=data)


def _send_queue(srv: BadInputServer, req: Request) -> Response:
    """The browser's path: POST /queue/join {fn_index, session_hash}, then the session's event stream. A handled
    refusal is a completed event whose outputs carry a warning (code "ui_refused")."""
    fn_index = req.fn_index
    if fn_index is None:
        fn_index = next(i for i, f in srv.demo.fns.items() if f.name == req.queue_fn)
    body = {"data": req.data or [], "fn_index": fn_index, "session_hash": req.api, "event_data": None}
    r = srv.http.post(f"{srv.url}/gradio_api/queue/join", json=body)
    if r.status_code != 200:
        return Response("http", r.status_code, text=r.text)
    status, text = _get(srv, "/gradio_api/queue/data?" + urllib.parse.urlencode({"session_hash": req.api}))
    for line in text.splitlines():
        msg = json.loads(line[5:]) if line.startswith("data:") else {}
        if msg.get("msg") == "process_completed":
            out = msg.get("output") or {}
            if not msg.get("success"):
                return Response("error", status, text=str(out.get("error")))
            # The page shows messages as escaped HTML text (<p role="alert">⚠️ ...</p>): compare the text itself.
            texts = [html.unescape(re.sub(r"<[^>]*>", "", d)) for d in out.get("data", []) if isinstance(d, str)]
            warning = next((t for t in texts if t.startswith("⚠️")), None)
            return Response("complete", 200, {"error": "ui_refused", "message": warning} if warning else {})
    return Response("error", status, text=text[:160])


def _get(srv: BadInputServer, target: str) -> tuple[int, str]:
    """GET with the standard library: a hostile client puts a session hash of any length in the address (the server
    reads 100 KB), while httpx refuses a query over 64 KB before sending it."""
    url = urllib.parse.urlsplit(srv.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    try:
        conn.request("GET", target)
        res = conn.getresponse()
        return res.status, res.read().decode("utf-8", "replace")
    finally:
        conn.close()
