"""Malformed and hostile requests against the real HTTP server: each must be refused with a clear message (or, for
an identical replay, answered with the first receipt) and change nothing stored. A few cases are requests the API
documents as answered (a whitespace-only prompt is the empty prompt: a pool pair; a pair's answer names no server
path): they may add the rows of the one pair they issue, and nothing else.

    from bench.bad_input import BadInputServer, CASES, run_cases
    with BadInputServer(tmp) as srv:
        rows = run_cases(srv)       # one row per case: request, response, expected, stored state unchanged?

The server is app.py's own configuration (`config_from_env`) and UI (`build_demo`, `launch_kwargs`) on the embedded
shapes model, launched in this process so each case can compare the stored state before and after: every table's
row count and a sha256 of each of its rows, the registry pointer, the blocklist file, the schedule and the
served version. Requests go over plain HTTP (httpx) through Gradio's REST protocol (POST /gradio_api/call/<api>,
then read the event stream), so wrong types, raw bytes and malformed bodies reach the server exactly as sent. The
"edges" cases go around the API: an upload, the UI's private handlers called by name, the UI's queue with a hostile
session hash, oversized or wrongly typed admin values, free-text reasons, a session hoarding unvoted pairs, export
and admin-token flooding from one address.
The server and the transport: bench/bad_input_server.py. Used by bench/reliability.py (the table in
docs/RELIABILITY.md) and tests/test_bad_input.py (CI)."""

from __future__ import annotations

import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from bench.bad_input_server import ADMIN_TOKEN, BLOCKED, FULL, BadInputServer, Request, Response, send

TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    make: Callable[[BadInputServer], Request]  # runs the setup (fresh pairs, earlier votes) and builds the request
    expect: str  # the refusal code, or "same_vote", "http_400", "http_500", "gradio_error" (refused by Gradio), or
    # one of ANSWERED (a documented answer, checked by its function)
    shown: str = ""  # how the request appears in the docs' table (default: a shortened repr of the arguments)
    stores: tuple[tuple[str, int], ...] = ()  # (table, at most this many new rows) an answered request may add;
    # every other table and file, and every row that was there, must stay as it was


# What issuing one pair may add: its pair row, and for a pool pair made on demand (or a typed prompt) its prompt and
# two images; a new session's first pair also registers its rater pseudonym.
ONE_PAIR = (("pairs", 1), ("prompts", 1), ("images", 2), ("raters", 1))


def _forged() -> str:
    return secrets.token_urlsafe(32)  # the same shape as a real token, never issued by this server


def _vote(session: str, token: object, outcome: object = "left", reasons: object = "") -> Request:
    return Request("vote", [session, token, outcome, reasons])


def _pair(session: object, prompt: object = "") -> Request:
    return Request("next_pair", [session, prompt])


def _admin(token: object, action: str, value: str = "") -> Request:
    return Request("admin", [token, action, value])


def _replay(srv: BadInputServer) -> Request:
    token, reveal = srv.voted("bi-replay", "tie")
    return Request("vote", ["bi-replay", token, "tie", ""], same_vote_id=reveal["vote_id"])


def _many_terms(n: int) -> str:
    return "".join(f"t{i}\n" for i in range(n))


def _full_blocklist(srv: BadInputServer) -> Request:
    """A blocklist at its bound (jobs.prompts.MAX_BLOCKLIST_TERMS terms, the case's word last), then a long prompt
    whose last word is blocked: matched by set lookups, so in milliseconds."""
    from jobs.prompts import MAX_BLOCKLIST_TERMS

    srv.runtime.admin_set_blocklist(FULL + _many_terms(MAX_BLOCKLIST_TERMS - 2) + "zebra\n", ADMIN_TOKEN)
    return _pair("bi-bl", ("a red circle " * 22) + "zebra")


def _hoard(srv: BadInputServer) -> Request:
    for _ in range(srv.runtime.arena.max_open_pairs):
        srv.fresh("bi-hoard")
    return _pair("bi-hoard")


def _export_flood(srv: BadInputServer) -> Request:
    from app import EXPORTS_PER_MINUTE

    for _ in range(EXPORTS_PER_MINUTE):
        res = send(srv, Request("export", [""]))
        if "snapshot_id" not in res.body:
            raise RuntimeError(f"setup failed: /export gave {res}")
    return Request("export", [""])


def _guessing(srv: BadInputServer) -> Request:
    for i in range(5):
        send(srv, _admin(f"guess-{i}", "status"))
    return _admin(ADMIN_TOKEN, "status")


def server_paths(value: object, srv: BadInputServer) -> list[str]:
    """Every string in an answer that names a place on the server: an absolute path (POSIX or Windows), or text that
    contains the data folder, the repository or the temp folder."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in server_paths(v, srv)]
    if isinstance(value, list):
        return [p for v in value for p in server_paths(v, srv)]
    if not isinstance(value, str):
        return []
    places = (
        str(Path(srv.config.data_dir).resolve()),
        str(Path(__file__).resolve().parents[1]),
        tempfile.gettempdir(),
    )
    absolute = value.startswith(("/", "\\")) or PureWindowsPath(value).drive != ""
    return [value] if absolute or any(p in value for p in places) else []


def _issued(srv: BadInputServer, res: Response) -> str | None:
    """Why an answer is not a pair issued to the caller and stored (None when it is one)."""
    if not isinstance(res.body.get("token"), str):
        return "no_token"
    pair_id = res.body.get("pair_id")
    return None if isinstance(pair_id, int) and srv.runtime.store.pair(pair_id) is not None else "pair_not_stored"


def _pool_pair(srv: BadInputServer, res: Response) -> tuple[str, str]:
    """docs/API.md: a prompt of only spaces, tabs or newlines is the empty prompt, so the answer is a pool pair."""
    if res.code != "ok":
        return res.code, res.message
    wrong = _issued(srv, res)
    category = srv.runtime.arena.pool.category(str(res.body.get("prompt")))
    if wrong is None and category == "typed":
        wrong = "typed_pair"
    return (
        wrong or "pool_pair",
        f"pair {res.body.get('pair_id')} from the pool ({category}): {res.body.get('prompt')!r}",
    )


def _no_server_paths(srv: BadInputServer, res: Response) -> tuple[str, str]:
    """docs/API.md: a pair's images are named by relative paths ("images/<sha256>.png"); no answer names a server
    path."""
    if res.code != "ok":
        return res.code, res.message
    leaked = server_paths(res.body, srv)
    images = [str((res.body.get(side) or {}).get("path")) for side in ("left_image", "right_image")]
    wrong = _issued(srv, res) or ("server_path" if leaked else None)
    if wrong is None and not all(i.startswith("images/") for i in images):
        wrong = "not_an_image_name"
    named = f"left {images[0][:19]}....png, right {images[1][:19]}....png (relative)"
    return wrong or "no_server_paths", named + (f"; server paths: {leaked}" if leaked else "")


ANSWERED: dict[str, Callable[[BadInputServer, Response], tuple[str, str]]] = {
    "pool_pair": _pool_pair,
    "no_server_paths": _no_server_paths,
}

MB = 1 << 20
SQL = "x'); DROP TABLE votes; --"
CASES: tuple[Case, ...] = (
    # -- pair tokens ------------------------------------------------------------------------------------------------
    Case("forged_token", "token", lambda s: _vote("bi-a", _forged()), "unknown_token", "/vote(s, <43-char token never issued>, left)"),
    Case("short_token", "token", lambda s: _vote("bi-a", "abc"), "unknown_token"),
    Case("huge_token", "token", lambda s: _vote("bi-a", "A" * MB), "unknown_token", "/vote(s, 'A' x 1 MiB, left)"),
    Case("sql_token", "token", lambda s: _vote("bi-a", "' OR '1'='1' --  padding"), "unknown_token"),
    Case("binary_token", "token", lambda s: _vote("bi-a", bytes(range(256)).decode("latin-1")), "unknown_token", "/vote(s, bytes 0x00..0xff as text, left)"),
    Case("token_wrong_type", "token", lambda s: _vote("bi-a", {"token": 1}), "unknown_token"),
    Case("token_null", "token", lambda s: _vote("bi-a", None), "unknown_token"),
    Case("expired_token", "token", lambda s: _vote("bi-exp", s.expired("bi-exp")), "expired", "/vote(s, <token of a pair issued with a 1 s TTL, 2.5 s ago>, left)"),
    Case("foreign_token", "token", lambda s: _vote("bi-a", s.fresh("bi-b")), "wrong_session", "/vote(s, <token issued to another session>, left)"),
    Case("replayed_other_outcome", "token", lambda s: _vote("bi-r", s.voted("bi-r", "left")[0], "right"), "conflicting_vote", "/vote(s, <token already voted 'left'>, right)"),
    Case("replayed_same_vote", "token", _replay, "same_vote", "/vote(s, <token already voted 'tie'>, tie): the first receipt again"),
    # -- outcomes ---------------------------------------------------------------------------------------------------
    Case("outcome_unknown", "outcome", lambda s: _vote("bi-o", s.fresh("bi-o"), "sideways"), "invalid_outcome"),
    Case("outcome_empty", "outcome", lambda s: _vote("bi-o", s.fresh("bi-o"), ""), "invalid_outcome"),
    Case("outcome_case", "outcome", lambda s: _vote("bi-o", s.fresh("bi-o"), "LEFT"), "invalid_outcome"),
    Case("outcome_sql", "outcome", lambda s: _vote("bi-o", s.fresh("bi-o"), "left" + SQL), "invalid_outcome"),
    Case("outcome_list", "outcome", lambda s: _vote("bi-o", s.fresh("bi-o"), ["left"]), "invalid_outcome"),
    Case("outcome_number", "outcome", lambda s: _vote("bi-o", s.fresh("bi-o"), 1), "invalid_outcome"),
    Case("outcome_null", "outcome", lambda s: _vote("bi-o", s.fresh("bi-o"), None), "invalid_outcome"),
    # -- sessions ---------------------------------------------------------------------------------------------------
    Case("session_sql", "session", lambda s: _vote(SQL, s.fresh("bi-s")), "invalid_session"),
    Case("session_too_long", "session", lambda s: _pair("x" * 200), "invalid_session"),
    Case("session_control_char", "session", lambda s: _pair("bot\x00one"), "invalid_session"),
    Case("session_unicode", "session", lambda s: _pair("bøt-ünïcode"), "invalid_session"),
    Case("session_number", "session", lambda s: _pair(12345), "invalid_session"),
    Case("session_empty", "session", lambda s: _pair(""), "invalid_session"),
    # -- reasons ----------------------------------------------------------------------------------------------------
    Case("reasons_too_many", "reasons", lambda s: _vote("bi-re", s.fresh("bi-re"), "left", ["x"] * 100), "reasons_too_large"),
    Case("reasons_huge", "reasons", lambda s: _vote("bi-re", s.fresh("bi-re"), "left", ["x" * MB]), "invalid_reasons", "/vote(s, token, left, ['x' x 1 MiB])"),
    Case("reasons_control_char", "reasons", lambda s: _vote("bi-re", s.fresh("bi-re"), "left", ["\x07bell"]), "invalid_reasons"),
    Case("reasons_bidi", "reasons", lambda s: _vote("bi-re", s.fresh("bi-re"), "left", ["\u202eevil"]), "invalid_reasons"),
    Case("reasons_wrong_type", "reasons", lambda s: _vote("bi-re", s.fresh("bi-re"), "left", 5), "invalid_reasons"),
    Case("reasons_html", "reasons", lambda s: _vote("bi-re", s.fresh("bi-re"), "left", ["<img src=x onerror=alert(1)>"]), "invalid_reasons"),
    Case("reasons_free_text", "reasons", lambda s: _vote("bi-re", s.fresh("bi-re"), "left", "looks, call me +1 555 0100"), "invalid_reasons", "/vote(s, token, left, 'looks, call me +1 555 0100'): only the tags"),
    # -- typed prompts ----------------------------------------------------------------------------------------------
    Case("prompt_control_char", "prompt", lambda s: _pair("bi-p", "a red\x00 circle"), "control_chars"),
    Case("prompt_bidi", "prompt", lambda s: _pair("bi-p", "a red circle \u202eelcric der a"), "control_chars"),
    Case("prompt_binary", "prompt", lambda s: _pair("bi-p", bytes(range(256)).decode("latin-1")), "control_chars", "/next_pair(s, bytes 0x00..0xff as text)"),
    Case("prompt_lone_surrogate", "prompt", lambda s: Request("next_pair", raw=b'{"data": ["bi-p", "a red \\ud800 circle"]}'), "control_chars", 'raw JSON ["bi-p", "a red \\ud800 circle"]'),
    Case("prompt_too_long", "prompt", lambda s: _pair("bi-p", "a red circle " * 40), "too_long", "/next_pair(s, 'a red circle ' x 40)"),
    Case("prompt_huge", "prompt", lambda s: _pair("bi-p", "a" * (20 * MB)), "too_long", "/next_pair(s, 'a' x 20 MiB): oversized payload"),
    Case("prompt_sql", "prompt", lambda s: _pair("bi-p", "a red circle" + SQL), "model_grammar"),
    Case("prompt_markup", "prompt", lambda s: _pair("bi-p", "<script>alert(1)</script>"), "model_grammar"),
    Case("prompt_blocked", "prompt", lambda s: _pair("bi-p", f"a red {BLOCKED} circle"), "blocked"),
    Case("prompt_wrong_type", "prompt", lambda s: _pair("bi-p", 5), "not_text"),
    Case("prompt_whitespace", "prompt", lambda s: _pair("bi-ws", " \t\n  "), "pool_pair", "/next_pair(s, ' \\t\\n  '): the empty prompt, as documented", ONE_PAIR),
    # -- admin ------------------------------------------------------------------------------------------------------
    Case("admin_no_token_run_round", "admin", lambda s: _admin("", "run_round"), "admin_denied"),
    Case("admin_no_token_status", "admin", lambda s: _admin("", "status"), "admin_denied"),
    Case("admin_no_token_read_blocklist", "admin", lambda s: _admin(None, "read_blocklist"), "admin_denied"),
    Case("admin_wrong_token_promote", "admin", lambda s: _admin("wrong-token", "promote", "base"), "admin_denied"),
    Case("admin_token_prefix_pause", "admin", lambda s: _admin(ADMIN_TOKEN[:-1], "pause"), "admin_denied", "/admin(<the token minus its last character>, pause)"),
    Case("admin_sql_token_blocklist", "admin", lambda s: _admin("' OR '1'='1", "set_blocklist", ""), "admin_denied"),
    Case("admin_token_wrong_type", "admin", lambda s: _admin([ADMIN_TOKEN], "resume"), "admin_denied", "/admin([<the right token, in a list>], resume)"),
    Case("admin_unknown_action", "admin", lambda s: _admin(ADMIN_TOKEN, "drop_tables"), "unknown_action", "/admin(<token>, drop_tables)"),
    Case("admin_promote_unknown_version", "admin", lambda s: _admin(ADMIN_TOKEN, "promote", "v9999"), "invalid_value", "/admin(<token>, promote, v9999)"),
    Case("admin_promote_path_traversal", "admin", lambda s: _admin(ADMIN_TOKEN, "promote", "../../etc/passwd"), "invalid_value", "/admin(<token>, promote, ../../etc/passwd)"),
    # -- malformed HTTP ---------------------------------------------------------------------------------------------
    Case("body_not_json", "http", lambda s: Request("vote", raw=b"\xff\xfe not json"), "http_400", "POST /vote with body b'\\xff\\xfe not json'"),
    Case("body_wrong_shape", "http", lambda s: Request("vote", raw=b'{"data": "left"}'), "http_422"),
    Case("missing_arguments", "http", lambda s: Request("vote", ["bi-h"]), "unknown_token", "/vote('bi-h'): token and outcome left out (sent as null)"),
    Case("body_not_json_no_type", "http", lambda s: Request("vote", raw=b"\xff\x00 not json", content_type=None), "http_400", "POST /vote with body b'\\xff\\x00 not json' and no content type"),
    Case("v2_unknown_keyword", "http", lambda s: Request("export", raw=b'{"nope": 1}', route="call/v2"), "http_400", "POST /call/v2/export {'nope': 1}: a keyword it does not take"),
    Case("extra_arguments", "http", lambda s: Request("admin", ["", "status", "", "extra", "args"]), "admin_denied", "/admin('', status, '', 'extra', 'args'): extras ignored"),
    Case("unknown_endpoint", "http", lambda s: Request("drop_tables", ["x"]), "http_404"),
    # -- edges: around the API ----------------------------------------------------------------------------------------
    Case("upload_100kb", "edges", lambda s: Request("upload", upload=b"<html>" + b"x" * 100_000), "http_403", "POST /gradio_api/upload (100 KB file): the app takes no files"),
    Case("private_export_handler", "edges", lambda s: Request("on_export", []), "http_404", "POST /gradio_api/call/on_export (a UI handler, by name)"),
    Case("private_vote_handler", "edges", lambda s: Request("on_vote", ["left", {}, []]), "http_404", "POST /gradio_api/call/on_vote (a UI handler, by name)"),
    Case("private_admin_handler", "edges", lambda s: Request("on_admin", ["status", "", ""]), "http_404", "POST /gradio_api/call/on_admin (a UI handler, by name)"),
    Case("direct_route_private", "edges", lambda s: Request("on_export", [""], route="run"), "http_404", "POST /gradio_api/run/on_export (the direct route, skipping the queue)"),
    Case("direct_route_public", "edges", lambda s: Request("next_pair", ["bi-d", ""], route="api"), "http_404", "POST /gradio_api/api/next_pair (the direct route, skipping the queue)"),
    Case("queue_unknown_fn_index", "edges", lambda s: Request("bi-q", queue_fn="", fn_index=9999), "http_404", "queue: fn_index 9999 (names no event)"),
    Case("queue_empty_session", "edges", lambda s: Request("", queue_fn="on_pool_pair"), "http_400", "queue: on_pool_pair with session_hash ''"),
    Case("ui_session_8kb", "edges", lambda s: Request("s" * 8192, queue_fn="on_pool_pair"), "ui_refused", "queue: on_pool_pair with an 8 KB session_hash"),
    Case("ui_session_100kb", "edges", lambda s: Request("s" * 100_000, queue_fn="on_pool_pair"), "ui_refused", "queue: on_pool_pair with a 100 KB session_hash"),
    Case("ui_session_traversal", "edges", lambda s: Request("../../etc", queue_fn="on_pool_pair"), "ui_refused", "queue: on_pool_pair with session_hash '../../etc'"),
    Case("ui_session_nul", "edges", lambda s: Request("bad\x00hash", queue_fn="on_pool_pair"), "ui_refused", "queue: on_pool_pair with session_hash 'bad\\x00hash'"),
    Case("pair_paths_pool", "edges", lambda s: _pair("bi-paths", ""), "no_server_paths", "/next_pair(s): a pool pair's answer names no server path", ONE_PAIR),
    Case("pair_paths_typed", "edges", lambda s: _pair("bi-paths", "a large red square at the bottom, gray background"), "no_server_paths", "/next_pair(s, typed prompt): generated now; its answer names no server path", ONE_PAIR),
    Case("admin_value_list", "edges", lambda s: _admin(ADMIN_TOKEN, "promote", ["base"]), "invalid_value", "/admin(<token>, promote, ['base'])"),
    Case("admin_value_dict", "edges", lambda s: _admin(ADMIN_TOKEN, "set_blocklist", {"words": ["a"]}), "invalid_value", "/admin(<token>, set_blocklist, {'words': ['a']})"),
    Case("admin_action_list", "edges", lambda s: _admin(ADMIN_TOKEN, ["status"]), "unknown_action", "/admin(<token>, ['status'])"),
    Case("blocklist_30mb", "edges", lambda s: _admin(ADMIN_TOKEN, "set_blocklist", "word\n" * (6 * MB)), "invalid_value", "/admin(<token>, set_blocklist, 30 MB of words)"),
    Case("blocklist_30k_terms", "edges", lambda s: _admin(ADMIN_TOKEN, "set_blocklist", _many_terms(30_000)), "invalid_value", "/admin(<token>, set_blocklist, 30,000 short terms, 200 KB)"),
    Case("prompt_vs_full_blocklist", "edges", _full_blocklist, "blocked", "/next_pair(s, 300-char prompt) against a blocklist at its 20,000-term bound"),
    Case("open_pairs_cap", "edges", _hoard, "too_many_open_pairs", "/next_pair(s) after 20 pairs issued to s without a vote"),
    Case("export_flood", "edges", _export_flood, "rate_limited", "/export() after 6 exports from the same address this minute"),
    Case("admin_guessing", "edges", _guessing, "admin_rate_limited", "/admin(<the RIGHT token>, status) after 5 wrong tokens from the same address"),
)  # fmt: skip


def shown(case: Case, req: Request) -> str:
    if case.shown:
        return case.shown
    args = ", ".join(_short(a) for a in (req.data or []))
    return f"/{req.api}({args})" if req.raw is None else f"POST /{req.api} body {_short(req.raw)}"


def _short(value: object, n: int = 40) -> str:
    if isinstance(value, str) and TOKEN_RE.fullmatch(value):
        return "<token>"  # a real pair token from the setup (random each run)
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def run_cases(srv: BadInputServer, cases: tuple[Case, ...] = CASES) -> list[dict]:
    """Run every case on one server; a row per case with the response and whether the stored state changed."""
    rows = []
    for case in cases:
        req = case.make(srv)  # setup requests (fresh pairs, earlier votes) happen here, before the snapshot
        before = srv.state()
        t0 = time.perf_counter()
        res = send(srv, req)
        ms = 1000 * (time.perf_counter() - t0)
        after = srv.state()
        message = res.message
        if req.same_vote_id is not None:
            ok = res.code == "vote" and res.body.get("vote_id") == req.same_vote_id
            code = "same_vote" if ok else res.code
        elif case.expect in ANSWERED:
            code, message = ANSWERED[case.expect](srv, res)
        else:
            code = res.code
        changed, stored = state_changes(before, after, dict(case.stores))
        rows.append(
            {
                "case": case.name,
                "group": case.group,
                "request": shown(case, req),
                "expected": case.expect,
                "code": code,
                "message": message,
                "http_status": res.status,
                "ms": ms,
                "unchanged": not changed,  # no stored change beyond the rows an answered case may add
                "changed": changed,
                "stored": stored,  # rows an answered case added, table -> count (empty for a refusal)
                "passed": code == case.expect and not changed,
            }
        )
    return rows


def state_changes(before: dict, after: dict, stores: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """The unexpected changes between two `BadInputServer.state()`s, and the rows added where `stores` allows (at most
    that many new rows in that table, every row that was there unchanged)."""
    changed = sorted(k for k in before if k not in ("counts", "rows") and before[k] != after[k])
    if set(before["counts"]) != set(after["counts"]):
        return [*changed, "tables"], {}
    stored = {}
    for table, rows in before["rows"].items():
        new, added = after["rows"][table], after["counts"][table] - before["counts"][table]
        if new == rows and added == 0:
            continue
        if table in stores and rows <= new and len(new) - len(rows) == added and 0 < added <= stores[table]:
            stored[table] = added
        else:
            changed.append(f"table {table}")
    return changed, stored
