"""`EdgeGuard`: the ASGI middleware in front of Gradio's routes, for what reaches the server besides the handlers.

Gradio serves every event handler by name on several routes, accepts uploads, and answers some malformed requests
with a 500 (an exception in its own routing code). EdgeGuard answers those itself, each with a JSON refusal
`{"error": code, "message": text}` (docs/API.md):
- `POST .../call/<name>` (and `/call/v2/<name>`, and the result stream `GET .../call/<name>/<event>`) only for
  PUBLIC_API names: 404 not_an_endpoint otherwise (hidden UI handlers are served there by their function name);
- `POST .../run/<name>` and `.../api/<name>`, Gradio's direct routes that skip the queue (its concurrency limits) and
  take any handler by name: 404 not_an_endpoint (scripts use /call or gradio_client; the page uses the queue);
- `POST .../upload`: 403 uploads_off (the app takes no files);
- `POST .../queue/join`, the page's route: a body that is not a JSON object is 400 bad_request, an fn_index that names
  no event 404 not_an_endpoint, an empty session hash 400 invalid_session (Gradio answers 500 to those);
- a call of a public endpoint (`/call/<name>` or the queue) with fewer arguments than it takes: the missing ones are
  sent as null, so the handler refuses or defaults them (Gradio would end the event with a bare `{"error": null}`);
- any other exception that Gradio's routing code raises on a request before answering: 400 bad_request with its
  one-line reason (the handlers themselves run in the queue and never raise: they return refusals);
- `GET .../file=images/<sha256>.png` and `.../file=exports/<zip>`: served from the data dir, so API answers name
  files by these relative paths and never by a server path.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request as StarletteRequest
from starlette.responses import FileResponse, JSONResponse

logger = logging.getLogger(__name__)

PUBLIC_API = ("next_pair", "vote", "admin", "export")  # what /gradio_api/call/<name> accepts; the rest is the UI's
CHECKED_BODY_BYTES = 1 << 20  # bodies up to this size are checked at the edge; larger ones go to Gradio as sent

_API_PREFIX = "/gradio_api/"
_CALL_RE = re.compile(r"/call/(?:v2/)?([^/]*)/?$")
_CALL_V1_RE = re.compile(r"/gradio_api/call/([^/]*)/?$")
_RESULT_RE = re.compile(r"/call/(?:v2/)?([^/]*)/[^/]+/?$")
_DIRECT_RE = re.compile(r"/gradio_api/(?:run|api)/([^/]*)/?$")
_FILE_RE = re.compile(r"/file=(images/[0-9a-f]{64}\.png|exports/ncp-arena-[0-9A-Za-z_-]{1,80}\.zip)$")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def refusal(code: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status)


def _not_an_endpoint(name: str) -> JSONResponse:
    msg = f"{name!r:.60} is not an API endpoint; scripts use {', '.join(PUBLIC_API)} (docs/API.md)"
    return refusal("not_an_endpoint", msg, 404)


def _one_line(err: BaseException, n: int = 200) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:n]


class EdgeGuard:
    """ASGI middleware in front of Gradio's routes (module docstring)."""

    def __init__(self, app: Callable, data_dir: str, image_dir: str) -> None:
        self.app = app
        self.roots = {"images": Path(image_dir), "exports": Path(data_dir) / "exports"}

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        answer = self._by_path(scope, path, method)
        if answer is not None:
            return await answer(scope, receive, send)
        if method == "POST" and (path.endswith("/queue/join") or _CALL_V1_RE.search(path)):
            body = await _read_body(receive)
            if body is None:
                return  # the client went away before sending its body
            if len(body) <= CHECKED_BODY_BYTES:
                answer, body = self._check_body(scope, path, body)
                if answer is not None:
                    return await answer(scope, receive, send)
            receive = _replay(body, receive)
        await self._answered(scope, receive, send)

    def _by_path(self, scope: dict, path: str, method: str) -> JSONResponse | FileResponse | None:
        """The answer that the method and path alone decide, or None."""
        if method == "POST":
            direct = _DIRECT_RE.search(path)
            if direct:
                msg = f"POST /gradio_api/call/{direct.group(1)[:60]} (or gradio_client) instead; docs/API.md"
                return refusal("not_an_endpoint", f"this route skips the queue; use {msg}", 404)
            call = _CALL_RE.search(path)
            if call and call.group(1) not in PUBLIC_API:
                return _not_an_endpoint(call.group(1))
            if path.rstrip("/").endswith("/upload"):
                return refusal("uploads_off", "this app takes no uploads", 403)
        if method in ("GET", "HEAD"):
            result = _RESULT_RE.search(path)
            if result and path.startswith(_API_PREFIX):
                if result.group(1) not in PUBLIC_API:
                    return _not_an_endpoint(result.group(1))
                if not _known_event(scope, path.rstrip("/").rsplit("/", 1)[1]):
                    return refusal("unknown_event", "no such event (or its result was already read)", 404)
            served = _FILE_RE.search(path)
            if served:
                folder, name = served.group(1).split("/", 1)
                file = self.roots[folder] / name
                if not file.is_file():
                    return refusal("not_found", f"{served.group(1)} does not exist (any more)", 404)
                return FileResponse(file, filename=name if folder == "exports" else None)
        return None

    def _check_body(self, scope: dict, path: str, body: bytes) -> tuple[JSONResponse | None, bytes]:
        """Refuse a queue/join body Gradio would answer with a 500; fill in missing arguments of a public call."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            return refusal("bad_request", f"the body is not JSON ({_one_line(err, 120)})", 400), body
        if not isinstance(payload, dict):
            return refusal("bad_request", "the body must be a JSON object", 400), body
        fns = _event_handlers(scope) or {}
        if path.endswith("/queue/join"):
            fn_index, session = payload.get("fn_index"), payload.get("session_hash")
            if fn_index is not None and fns and (type(fn_index) is not int or fn_index not in fns):
                return refusal("not_an_endpoint", f"fn_index {str(fn_index)[:40]!r} names no event", 404), body
            if session is not None and (not isinstance(session, str) or not session):
                return refusal("invalid_session", "session_hash must be a non-empty string", 400), body
            fn = fns.get(fn_index) if fn_index is not None else None
        else:
            name = _CALL_V1_RE.search(path).group(1)  # type: ignore[union-attr]
            fn = next((f for f in fns.values() if getattr(f, "api_name", None) == name), None)
        data = payload.get("data")
        if getattr(fn, "api_name", None) in PUBLIC_API and isinstance(data, list) and len(data) < len(fn.inputs):
            payload["data"] = data + [None] * (len(fn.inputs) - len(data))  # missing: null, refused or defaulted
            return None, json.dumps(payload).encode()
        return None, body

    async def _answered(self, scope: dict, receive: Receive, send: Send) -> None:
        """Run Gradio; an exception its routing code raises on an API request before answering becomes a 400."""
        started = False

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as err:
            if started or not scope["path"].startswith(_API_PREFIX):
                raise
            logger.info("refused %s %s: %s", scope["method"], scope["path"][:80], _one_line(err))
            await refusal("bad_request", f"the request could not be read ({_one_line(err)})", 400)(
                scope, receive, send
            )


def _event_handlers(scope: dict) -> dict | None:
    """The running Blocks' event handlers by fn_index (None when this is not a Gradio app)."""
    get_blocks = getattr(scope.get("app"), "get_blocks", None)
    return getattr(get_blocks(), "fns", None) if callable(get_blocks) else None


def _known_event(scope: dict, event_id: str) -> bool:
    """Whether Gradio's result stream has messages for this event (its own lookup, which answers an unknown id by
    breaking the stream after it started). True when that cannot be told (another Gradio version)."""
    get_blocks = getattr(scope.get("app"), "get_blocks", None)
    queue = getattr(get_blocks(), "_queue", None) if callable(get_blocks) else None
    try:
        event = queue.event_ids_to_events.get(event_id)  # type: ignore[union-attr]
        session = (
            event.session_hash
            if event is not None
            else next(
                (s for s, ids in queue.pending_event_ids_session.items() if event_id in ids),
                event_id,  # type: ignore
            )
        )
        return session in queue.pending_messages_per_session  # type: ignore[union-attr]
    except AttributeError:
        return True


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (None when the client went away before sending it)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that hands the already-read body to the app, then the connection's own messages."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def unknown_endpoint(request: StarletteRequest, exc: Exception) -> JSONResponse:
    """Gradio raises FnIndexInferError (a 500) for a name it does not know; it is the caller's mistake: 404."""
    return refusal("not_an_endpoint", " ".join(str(exc).split())[:200], 404)


async def invalid_request(request: StarletteRequest, exc: RequestValidationError) -> JSONResponse:
    """A body or query that does not fit the route (FastAPI's own handler fails with a 500 when the body is not
    text): 422 with each problem's place and message, never the raw input."""
    problems = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()]
    return refusal("bad_request", "; ".join(problems)[:300] or "the request does not fit this route", 422)
