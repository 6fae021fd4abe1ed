"""ncp-arena: vote between two images of one prompt; the votes train the next version of the model, live.

    python app.py                      # fresh data dir, embedded shapes model, http://127.0.0.1:7860
    python app.py --print-config       # the configuration table (docs/CONFIG.md is generated from it)

Gradio UI only (DESIGN.md): `build_demo(runtime)` lays out the tabs (Arena, Progress, Data, Admin) and wires thin
top-level handlers that call the runtime's services (jobs/) and return dicts keyed by component; `main()` maps the
environment (ENV_VARS) onto `ArenaConfig`, starts the runtime and stops it on exit. No SQL and no tensors here.

HTTP API for scripts (`/next_pair`, `/vote`, `/admin`, `/export`; gradio_client or any HTTP client): docs/API.md.
The UI's own handlers are not API endpoints: `EdgeGuard` refuses them over REST (`/gradio_api/call/<name>`), refuses
uploads (the app takes no files) and serves the images and export zips that API answers name by relative path.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

for _key, _value in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(_key, _value)  # before gradio is imported: no outbound calls at start (STACK_NOTES)

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
from gradio.route_utils import FnIndexInferError  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request as StarletteRequest  # noqa: E402
from starlette.responses import FileResponse, JSONResponse  # noqa: E402

from feedback_store import InputRejected, VoteRejected  # noqa: E402
from feedback_store.export import __doc__ as EXPORT_DOC  # noqa: E402
from jobs import views  # noqa: E402
from jobs.arena import REASON_TAGS  # noqa: E402
from jobs.prompts import PromptRejected  # noqa: E402
from jobs.registry import RegistryError  # noqa: E402
from jobs.runtime import SHAPES_MODEL, AdminDenied, Runtime  # noqa: E402
from jobs.settings import ENV_VARS, config_from_env, config_markdown, env_value  # noqa: E402, F401

logger = logging.getLogger("app")

OUTCOMES = {"left": "Left is better", "right": "Right is better", "tie": "Tie", "both_bad": "Both are bad"}
KEYS = {"left": ("1", "a"), "right": ("2", "l"), "tie": ("3", "t"), "both_bad": ("4", "b")}
REASONS = list(REASON_TAGS)  # the only reasons the store takes (jobs.arena.check_reasons)
PUBLIC_API = ("next_pair", "vote", "admin", "export")  # what /gradio_api/call/<name> accepts; the rest is the UI's
EXPORT_ACCESS = ("public", "admin")
FRIENDLY = {
    "expired": "This pair expired before your vote.",
    "conflicting_vote": "You already voted differently on this pair.",
    "unknown_token": "This pair is no longer known to the server.",
    "address_rate_limited": "Too many votes are coming from your network right now; wait a minute.",
}


class Ctx(SimpleNamespace):
    """What handlers need: `runtime`, `clock` (views.PairClock), `timings` (views.HandlerTimes), the per-address
    limiters `admin_limiter` and `export_limiter`, `export_access` ("public" or "admin") and the UI's components by
    name."""


# -- edges: what reaches the server besides the handlers ---------------------------------------------------------
_CALL_RE = re.compile(r"/call/(?:v2/)?([^/]*)/?$")
_FILE_RE = re.compile(r"/file=(images/[0-9a-f]{64}\.png|exports/ncp-arena-[0-9A-Za-z_-]{1,80}\.zip)$")


class EdgeGuard:
    """ASGI middleware in front of Gradio's routes: (1) `POST .../call/<name>` only for PUBLIC_API names (Gradio
    serves every event handler by its function name there, hidden ones too); (2) no uploads (the app takes no
    files); (3) `GET .../file=images/<sha256>.png` and `.../file=exports/<zip>` served from the data dir, so API
    answers name files by these relative paths and never by a server path."""

    def __init__(self, app: Callable, data_dir: str, image_dir: str) -> None:
        self.app = app
        self.roots = {"images": Path(image_dir), "exports": Path(data_dir) / "exports"}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            call = _CALL_RE.search(path) if method == "POST" else None
            if call and call.group(1) not in PUBLIC_API:
                msg = (
                    f"{call.group(1)!r:.60} is not an API endpoint; scripts use {', '.join(PUBLIC_API)} (docs/API.md)"
                )
                return await JSONResponse({"error": "not_an_endpoint", "message": msg}, 404)(scope, receive, send)
            if method == "POST" and path.rstrip("/").endswith("/upload"):
                msg = "this app takes no uploads"
                return await JSONResponse({"error": "uploads_off", "message": msg}, 403)(scope, receive, send)
            served = _FILE_RE.search(path) if method in ("GET", "HEAD") else None
            if served:
                folder, name = served.group(1).split("/", 1)
                file = self.roots[folder] / name
                if not file.is_file():
                    return await JSONResponse({"error": "not_found"}, 404)(scope, receive, send)
                return await FileResponse(file, filename=name if folder == "exports" else None)(scope, receive, send)
        await self.app(scope, receive, send)


async def _unknown_endpoint(request: StarletteRequest, exc: Exception) -> JSONResponse:
    """Gradio raises FnIndexInferError (a 500) for a name it does not know; it is the caller's mistake: 404."""
    return JSONResponse({"error": "not_an_endpoint", "message": f"{' '.join(str(exc).split())[:200]}"}, 404)


# -- handler plumbing ------------------------------------------------------------------------------------------------
def timed(endpoint: str) -> Callable[[Callable], Callable]:
    """Record the handler's own wall time under `endpoint` in ctx.timings (signature kept for Gradio)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(ctx: Ctx, *args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return fn(ctx, *args, **kwargs)
            finally:
                ctx.timings.record(endpoint, 1000 * (time.perf_counter() - t0))

        return run

    return wrap


def bind(fn: Callable, *fixed: object) -> Callable:
    """`fn` with its first parameters fixed, keeping the rest of its signature and annotations (Gradio reads them to
    inject gr.Request / gr.OAuthProfile and to describe API endpoints; functools.partial hides both)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    hidden = {p.name for p in params[: len(fixed)]}

    @functools.wraps(fn)
    def bound(*args: object, **kwargs: object) -> object:
        return fn(*fixed, *args, **kwargs)

    bound.__signature__ = sig.replace(parameters=params[len(fixed) :])  # type: ignore[attr-defined]
    bound.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k not in hidden}
    return bound


def rater_key(ctx: Ctx, session: str, profile: gr.OAuthProfile | None) -> str:
    """Pseudonymous rater id: the HF username when logged in, else the session (UI session hash / API session_id)."""
    username = getattr(profile, "username", None) if profile is not None else None
    return ctx.runtime.rater_id(f"hf:{username}" if username else f"session:{session}")


def _buttons(ctx: Ctx, enabled: bool) -> dict:
    return {b: gr.Button(interactive=enabled) for b in ctx.vote_buttons.values()}


def _version_label(version: str) -> str:
    return version


# -- Arena handlers --------------------------------------------------------------------------------------------------
def on_pair(ctx: Ctx, prompt: str, request: gr.Request) -> dict:
    """Show a new pair: the typed prompt when given, else one from the pool (prefetched, instant)."""
    try:
        pair = ctx.runtime.arena.next_pair(request.session_hash, (prompt or "").strip() or None)
    except PromptRejected as err:
        return {ctx.status: f"⚠️ {err}"}
    except InputRejected as err:  # a session hash the store refuses, too many pairs without a vote
        return {ctx.status: f"⚠️ {err.message}"}
    state = {"token": pair.token, "pair_id": pair.pair_id, "shown_at": time.monotonic()}
    out = {ctx.state: state, ctx.left: pair.left_path, ctx.right: pair.right_path, ctx.prompt_shown: pair.prompt}
    return out | {ctx.reasons: [], ctx.status: ""} | _buttons(ctx, True)


@timed("ui_next_pair")
def on_pool_pair(ctx: Ctx, request: gr.Request) -> dict:
    return on_pair(ctx, "", request)


@timed("ui_vote")
def on_vote(
    ctx: Ctx, outcome: str, state: dict, reasons: list[str], request: gr.Request, profile: gr.OAuthProfile | None
) -> dict:
    """Record the vote (server-side time since the pair was issued), then reveal who made each image."""
    if not state or not state.get("token"):
        return {ctx.reveal: "Nothing to vote on yet: wait for the pair to load."}
    try:
        res = ctx.runtime.arena.vote(
            request.session_hash,
            state["token"],
            outcome,
            rater_key(ctx, request.session_hash, profile),
            reasons=tuple(reasons or ()),
            time_to_vote_ms=views.elapsed_ms(state["shown_at"]),
            address=_address(ctx, request),
        )
    except VoteRejected as err:
        text = f"⚠️ Your vote was not counted. {FRIENDLY.get(err.reason_code, err.message)} Here is a new pair."
        return {ctx.state: {}, ctx.reveal: text} | _buttons(ctx, False)
    reveal = (
        f"**You chose: {OUTCOMES[res.outcome]}.** Left was made by **{_version_label(res.left_version)}**, "
        f"right by **{_version_label(res.right_version)}**. Vote #{res.vote_id} recorded; here is the next pair."
    )
    if res.control_passed is not None:  # an attention check: one image was deliberately broken
        reveal += " This was an attention check " + ("(passed)." if res.control_passed else "(missed).")
    return {ctx.state: {}, ctx.reveal: reveal} | _buttons(ctx, False)


# -- Progress handlers -----------------------------------------------------------------------------------------------
def on_progress(ctx: Ctx) -> dict:
    history = pd.DataFrame(views.rating_points(ctx.runtime), columns=["until", "votes", "version", "rating"])
    versions = views.gallery_versions(ctx.runtime)
    return {
        ctx.board: views.leaderboard_frame(views.leaderboard_rows(ctx.runtime)),
        ctx.plot: history,
        ctx.round_md: views.status_markdown(views.round_status(ctx.runtime)),
        ctx.probe_slider: gr.Slider(maximum=max(1, len(versions) - 1), interactive=len(versions) > 1),
    }


def on_probes(ctx: Ctx, index: float) -> dict:
    versions = views.gallery_versions(ctx.runtime)
    try:
        at = int(index)
    except (TypeError, ValueError, OverflowError):  # a hand-made queue call: show the oldest
        at = 0
    version = versions[max(0, min(at, len(versions) - 1))]
    label = f"Showing **{version}** ({versions.index(version) + 1} of {len(versions)}; seed {views.PROBE_SEED})"
    return {ctx.gallery: views.probe_gallery(ctx.runtime, version), ctx.probe_label: label}


# -- Data and Admin handlers -----------------------------------------------------------------------------------------
def on_counts(ctx: Ctx) -> dict:
    counts = ctx.runtime.store.counts()
    return {ctx.counts: pd.DataFrame({"table": list(counts), "rows": list(counts.values())})}


def on_export(ctx: Ctx, token: str, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
    """The Data tab's download: the newest snapshot, its time and row count (with NCP_EXPORT_ACCESS=admin, only for
    admins: the Admin tab's token or an admin login)."""
    address = _address(ctx, request, always=True)
    try:
        if ctx.export_access == "admin":
            username = getattr(profile, "username", None) if profile is not None else None
            views.check_admin(ctx.runtime, token, username, address, ctx.admin_limiter)
        info = _export(ctx, address)
    except (views.RateLimited, AdminDenied) as err:
        return {ctx.export_info: f"⚠️ {err}"}
    return {ctx.export_file: str(info.zip_path), ctx.export_info: info.summary()} | on_counts(ctx)


def on_admin(
    ctx: Ctx, action: str, token: str, value: str, request: gr.Request, profile: gr.OAuthProfile | None
) -> dict:
    username = getattr(profile, "username", None) if profile is not None else None
    address = _address(ctx, request, always=True)
    try:
        text = views.admin_action(
            ctx.runtime,
            action,
            value,
            token or None,
            username,
            ctx.timings,
            address=address,
            limiter=ctx.admin_limiter,
        )
    except (AdminDenied, views.RateLimited) as err:
        return {ctx.admin_out: f"⛔ {err}"}
    except (ValueError, RegistryError, KeyError) as err:
        return {ctx.admin_out: f"⚠️ {err}"}
    out = {ctx.versions: gr.Dropdown(choices=views.gallery_versions(ctx.runtime))}
    if action == "read_blocklist":
        return out | {ctx.blocklist: text, ctx.admin_out: "Blocklist loaded."}
    return out | {ctx.admin_out: f"✅ {text}"}


# -- API (gr.api endpoints: plain JSON in and out) ------------------------------------------------------------------
def _address(ctx: Ctx, request: gr.Request | None, *, always: bool = False) -> str | None:
    """The client address for the per-address limits, kept in memory only: the vote limit (None when it is off) and,
    with `always`, admin attempts and exports. None without a request. The app's one reader of the client address."""
    if request is None:
        return None
    peer = request.client.host if request.client else None
    forwarded = request.headers.get("x-forwarded-for")
    if always:
        return views.request_address(ctx.runtime, peer, forwarded)
    return views.vote_address(ctx.runtime, peer, forwarded)


def _export(ctx: Ctx, address: str | None) -> views.ExportInfo:
    """The newest snapshot (views.latest_export), at most EXPORTS_PER_MINUTE calls a minute per address."""
    if address is not None:
        wait = ctx.export_limiter.retry_after(address)
        if wait > 0:
            raise views.RateLimited(f"Too many exports from your address; try again in {math.ceil(wait)} s.", wait)
        ctx.export_limiter.add(address)
    return views.latest_export(ctx.runtime)


def _refusal(code: str, message: str) -> dict:
    return {"error": code, "message": message}


@timed("next_pair")
def api_next_pair(ctx: Ctx, session_id: str, prompt: str = "") -> dict:
    """A pair for `session_id` (pool prompt when `prompt` is empty). See docs/API.md."""
    try:
        session = views.check_session(session_id)
    except InputRejected as err:
        return _refusal(err.reason_code, err.message)
    try:
        # Only text is stripped; anything else reaches validate_prompt, which refuses it ("not_text"). A prompt of
        # only spaces is the empty prompt: a pool pair (docs/API.md).
        text = prompt.strip() if isinstance(prompt, str) else prompt
        pair = ctx.runtime.arena.next_pair(session, text or None)
    except PromptRejected as err:
        return _refusal(err.code, str(err))
    except InputRejected as err:  # too_many_open_pairs
        return _refusal(err.reason_code, err.message)
    ctx.runtime.arena.register_rater(ctx.runtime.rater_id(f"session:{session}"))  # the same id api_vote uses
    ctx.clock.issued(pair.token)
    return {
        "token": pair.token,
        "pair_id": pair.pair_id,
        "prompt": pair.prompt,
        # Relative names that EdgeGuard serves (gradio_client downloads them): no server path in the answer.
        "left_image": gr.FileData(path=f"images/{Path(pair.left_path).name}"),
        "right_image": gr.FileData(path=f"images/{Path(pair.right_path).name}"),
    }


@timed("vote")
def api_vote(
    ctx: Ctx, session_id: str, token: str, outcome: str, reasons: list[str] | str = "", request: gr.Request = None
) -> dict:
    """Vote on a pair issued to `session_id`; returns the reveal or a refusal. See docs/API.md."""
    if isinstance(reasons, str):
        reasons = [r.strip() for r in reasons.split(",") if r.strip()]
    elif not isinstance(reasons, list):
        return _refusal("invalid_reasons", "reasons must be a list of short strings or one comma-separated string.")
    try:
        session = views.check_session(session_id)
        rater = ctx.runtime.rater_id(f"session:{session}")
        res = ctx.runtime.arena.vote(
            session,
            token,
            outcome,
            rater,
            reasons=reasons,
            time_to_vote_ms=ctx.clock.elapsed_ms(token),
            address=_address(ctx, request),
        )
    except InputRejected as err:  # VoteRejected included
        return _refusal(err.reason_code, err.message)
    reveal = {"vote_id": res.vote_id, "outcome": res.outcome, "left_version": res.left_version}
    reveal["right_version"] = res.right_version
    if res.control_passed is not None:  # an attention-check pair: did the rater pick the intact image?
        reveal["control_passed"] = res.control_passed
    return reveal


def api_admin(ctx: Ctx, token: str, action: str, value: str = "", request: gr.Request = None) -> dict:
    """Admin actions for scripts (needs NCP_ADMIN_TOKEN; failures throttled per address). See docs/API.md."""
    address = _address(ctx, request, always=True)
    try:
        message = views.admin_action(
            ctx.runtime, action, value, token or None, None, ctx.timings, address=address, limiter=ctx.admin_limiter
        )
        return {"ok": True, "message": message}
    except views.RateLimited as err:
        return _refusal("admin_rate_limited", str(err)) | {"retry_after_s": round(err.retry_after_s, 1)}
    except AdminDenied as err:
        return _refusal("admin_denied", str(err))
    except views.UnknownAction as err:
        return _refusal("unknown_action", str(err))
    except (ValueError, RegistryError) as err:
        return _refusal("invalid_value", str(err))


def api_export(ctx: Ctx, token: str = "", request: gr.Request = None) -> dict:
    """The newest Parquet snapshot with its manifest, taken at call time when votes arrived since the newest and it is
    older than 10 s; limited per address; NCP_EXPORT_ACCESS=admin asks for the admin token. See docs/API.md."""
    address = _address(ctx, request, always=True)
    try:
        if ctx.export_access == "admin":
            views.check_admin(ctx.runtime, token, None, address, ctx.admin_limiter)
        info = _export(ctx, address)
    except views.RateLimited as err:
        return _refusal("rate_limited", str(err)) | {"retry_after_s": round(err.retry_after_s, 1)}
    except AdminDenied as err:
        return _refusal("admin_denied", f"{err} (this Space sets NCP_EXPORT_ACCESS=admin)")
    return {
        "snapshot_id": info.snapshot_id,
        "created": info.created,
        "rows": info.rows,
        "newer_votes": info.newer_votes,
        "manifest": info.manifest,
        "file": gr.FileData(path=f"exports/{info.zip_path.name}", orig_name=info.zip_path.name),
    }


# -- layout ----------------------------------------------------------------------------------------------------------
CSS = """
.pixel img, .pixel canvas { image-rendering: pixelated; image-rendering: crisp-edges; }
.pixel img { width: 100%; height: 100%; object-fit: contain; }
#arena-reveal { min-height: 2.5em; }
"""
# Keyboard shortcuts: click the vote button for the key unless the user is typing; disabled buttons ignore clicks.
KEYS_JS = """() => {
  if (window.__ncpArena) return; window.__ncpArena = true;
  const style = document.createElement('style'); style.textContent = __CSS__; document.head.appendChild(style);
  const keys = __KEYS__;
  document.addEventListener('keydown', (e) => {
    const el = e.target, tag = ((el && el.tagName) || '').toLowerCase();
    const typing = tag === 'textarea' || tag === 'select' || (el && el.isContentEditable) ||
      (tag === 'input' && !['checkbox', 'radio', 'button', 'range'].includes((el.type || '').toLowerCase()));
    if (typing || e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const id = keys[e.key.toLowerCase()];
    const btn = id && document.getElementById(id);
    if (!btn || btn.disabled || btn.offsetParent === null) return;
    e.preventDefault(); btn.click();
  });
}""".replace("__CSS__", json.dumps(CSS)).replace(
    "__KEYS__", json.dumps({k: f"vote-{o}" for o, ks in KEYS.items() for k in ks})
)


def _schema_markdown() -> str:
    paragraphs = [p for p in EXPORT_DOC.split("\n\n") if p.startswith(("Rows:", "By default", "Split:"))]
    return "### What is in the export\n\n" + "\n\n".join(" ".join(p.split()) for p in paragraphs)


EXPORTS_PER_MINUTE = 6  # per client address, /export and the Data tab's button together


def build_demo(
    runtime: Runtime,
    oauth: bool = False,
    export_access: str = "public",
    limiter_clock: Callable[[], float] = time.monotonic,
) -> gr.Blocks:
    """The arena UI over a started Runtime. `oauth`: show the HF login button (Spaces with `hf_oauth: true`).
    `export_access`: "public" (anyone may download the export: a public dataset) or "admin" (needs admin credentials;
    the Data tab's button then asks for them too). `limiter_clock`: the per-address limiters' clock (tests)."""
    if export_access not in EXPORT_ACCESS:
        raise ValueError(f"export_access must be one of {EXPORT_ACCESS}, got {export_access!r}")
    ctx = Ctx(runtime=runtime, clock=views.PairClock(), timings=views.HandlerTimes(), export_access=export_access)
    ctx.admin_limiter = views.AddressLimiter(views.ADMIN_FAILURES_PER_MINUTE, 60.0, clock=limiter_clock)
    ctx.export_limiter = views.AddressLimiter(EXPORTS_PER_MINUTE, 60.0, clock=limiter_clock)
    with gr.Blocks(title="ncp-arena") as demo:
        with gr.Row():
            gr.Markdown("# ncp-arena\nVote for the better image. Every vote trains the next version of the model.")
            if oauth:
                gr.LoginButton()
        with gr.Tabs():
            with gr.Tab("Arena", id="arena") as arena_tab:
                ctx.state = gr.State({})
                with gr.Row():
                    ctx.prompt_in = gr.Textbox(
                        label="Your own prompt (optional)",
                        placeholder="Leave empty for prompts from the pool; press Enter to generate",
                        max_length=400,
                        scale=4,
                    )
                    gen_btn = gr.Button("Generate", scale=1)
                    skip_btn = gr.Button("Skip / new pair", scale=1)
                ctx.status = gr.Markdown(elem_id="arena-status")
                ctx.prompt_shown = gr.Textbox(label="Prompt", interactive=False, elem_id="arena-prompt")
                with gr.Row():
                    kw = {"type": "filepath", "interactive": False, "height": 384, "elem_classes": ["pixel"]}
                    ctx.left = gr.Image(label="Left", elem_id="arena-left", **kw)
                    ctx.right = gr.Image(label="Right", elem_id="arena-right", **kw)
                with gr.Row():
                    ctx.vote_buttons = {
                        o: gr.Button(
                            f"{label}  [{KEYS[o][0]}/{KEYS[o][1].upper()}]",
                            elem_id=f"vote-{o}",
                            variant="primary" if o in ("left", "right") else "secondary",
                            interactive=False,
                        )
                        for o, label in OUTCOMES.items()
                    }
                ctx.reasons = gr.CheckboxGroup(REASONS, label="Why? (optional)")
                ctx.reveal = gr.Markdown(elem_id="arena-reveal")
            with gr.Tab("Progress", id="progress") as progress_tab:
                gr.Markdown("## Watch it learn\nVersions compete in blind cross-version pairs; base = 1000.")
                ctx.board = gr.Dataframe(label="Leaderboard (Bradley-Terry, 95% bootstrap CI)", interactive=False)
                ctx.plot = gr.LinePlot(
                    x="until", y="rating", color="version", title="Rating over time", y_title="rating (base = 1000)"
                )
                ctx.round_md = gr.Markdown(elem_id="round-status")
                gr.Markdown("### Probe gallery: the same prompts and seed, from every version")
                ctx.probe_slider = gr.Slider(0, 1, value=0, step=1, label="Version (oldest to newest)")
                ctx.probe_label = gr.Markdown()
                ctx.gallery = gr.Gallery(
                    columns=4, height="auto", elem_classes=["pixel"], object_fit="contain", elem_id="probe-gallery"
                )
                timer = gr.Timer(5.0, active=False)
            with gr.Tab("Data", id="data") as data_tab:
                ctx.counts = gr.Dataframe(label="Rows in the store", interactive=False)
                export_btn = gr.Button("Download the latest export (Parquet, Pick-a-Pic v2 columns)", elem_id="export")
                ctx.export_info = gr.Markdown(elem_id="export-info")
                ctx.export_file = gr.File(label="Export (zip)", interactive=False, elem_id="export-file")
                gr.Markdown(_schema_markdown())
            with gr.Tab("Admin", id="admin") as admin_tab:
                gr.Markdown("Every action is checked on the server: give the admin token or sign in as an admin.")
                token = gr.Textbox(label="Admin token", type="password")
                with gr.Row():
                    admin_btns = {a: gr.Button(t) for a, t in [("run_round", "Run a round now"), ("pause", "Pause"),
                                                              ("resume", "Resume"), ("status", "Status")]}  # fmt: skip
                with gr.Row():
                    ctx.versions = gr.Dropdown(views.gallery_versions(runtime), label="Serve version", scale=3)
                    promote_btn = gr.Button("Promote / roll back", scale=1)
                ctx.blocklist = gr.Textbox(label="Prompt blocklist (one word or phrase per line)", lines=6)
                with gr.Row():
                    load_bl, save_bl = gr.Button("Load blocklist"), gr.Button("Save blocklist")
                ctx.admin_out = gr.Markdown(elem_id="admin-out")

        arena_out = {ctx.state, ctx.left, ctx.right, ctx.prompt_shown, ctx.reasons, ctx.status, ctx.reveal}
        arena_out |= set(ctx.vote_buttons.values())
        pairs = {"concurrency_id": "pairs", "concurrency_limit": 4, "api_visibility": "private"}
        # Typed prompts run the pipeline: one at a time, like GenerationService's lock (pool pairs are prefetched).
        generate = {"concurrency_id": "generate", "concurrency_limit": 1, "api_visibility": "private"}
        demo.load(bind(on_pool_pair, ctx), None, arena_out, **pairs)
        demo.load(None, js=KEYS_JS)
        for trigger in (gen_btn.click, ctx.prompt_in.submit):
            trigger(bind(on_pair, ctx), ctx.prompt_in, arena_out, **generate)
        skip_btn.click(bind(on_pool_pair, ctx), None, arena_out, **pairs)
        for outcome, btn in ctx.vote_buttons.items():
            btn.click(
                bind(on_vote, ctx, outcome),
                [ctx.state, ctx.reasons],
                arena_out,
                concurrency_id="votes",
                concurrency_limit=16,
                api_visibility="private",
                trigger_mode="once",
            ).then(bind(on_pool_pair, ctx), None, arena_out, **pairs)

        progress_out = {ctx.board, ctx.plot, ctx.round_md, ctx.probe_slider}
        probe_out = {ctx.gallery, ctx.probe_label}
        quiet = {"api_visibility": "private", "show_progress": "hidden"}
        progress_tab.select(bind(on_progress, ctx), None, progress_out, **quiet).then(
            bind(on_probes, ctx), ctx.probe_slider, probe_out, **generate
        )
        progress_tab.select(lambda: gr.Timer(active=True), None, timer, **quiet)
        for tab in (arena_tab, data_tab):
            tab.select(lambda: gr.Timer(active=False), None, timer, **quiet)
        timer.tick(bind(on_progress, ctx), None, progress_out, **quiet)
        ctx.probe_slider.release(bind(on_probes, ctx), ctx.probe_slider, probe_out, **generate)

        data_tab.select(bind(on_counts, ctx), None, ctx.counts, api_visibility="private")
        export_out = {ctx.export_file, ctx.export_info, ctx.counts}
        export_btn.click(bind(on_export, ctx), token, export_out, api_visibility="private")

        admin_out = {ctx.admin_out, ctx.versions, ctx.blocklist}
        admin_tab.select(lambda: gr.Dropdown(choices=views.gallery_versions(runtime)), None, ctx.versions, **quiet)
        for action, btn in admin_btns.items():
            btn.click(bind(on_admin, ctx, action), [token, ctx.versions], admin_out, api_visibility="private")
        promote_btn.click(bind(on_admin, ctx, "promote"), [token, ctx.versions], admin_out, api_visibility="private")
        save_bl.click(
            bind(on_admin, ctx, "set_blocklist"), [token, ctx.blocklist], admin_out, api_visibility="private"
        )
        load_bl.click(
            bind(on_admin, ctx, "read_blocklist"), [token, ctx.blocklist], admin_out, api_visibility="private"
        )

        gr.api(bind(api_next_pair, ctx), api_name="next_pair", concurrency_id="pairs", concurrency_limit=4)
        gr.api(bind(api_vote, ctx), api_name="vote", concurrency_id="votes", concurrency_limit=16)
        gr.api(bind(api_admin, ctx), api_name="admin", concurrency_limit=1)
        gr.api(bind(api_export, ctx), api_name="export", concurrency_id="export", concurrency_limit=1)
    demo.queue(default_concurrency_limit=4)
    return demo


MAX_UPLOAD = "4kb"  # the app takes no files; EdgeGuard refuses uploads, and this caps them should it be bypassed


def launch_kwargs(runtime: Runtime) -> dict:
    """What demo.launch needs besides host and port: only the image, probe and export folders are served; EdgeGuard
    in front of Gradio's routes (private handlers, uploads, files by relative name); unknown endpoints answer 404."""
    data = Path(runtime.config.data_dir)
    folders = [views.image_dir(runtime), data / "probes", views.export_dir(runtime)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    guard = Middleware(EdgeGuard, data_dir=str(data.resolve()), image_dir=str(views.image_dir(runtime).resolve()))
    return {
        "allowed_paths": [str(f.resolve()) for f in folders],
        "css": CSS,
        "max_file_size": MAX_UPLOAD,
        "app_kwargs": {"middleware": [guard], "exception_handlers": {FnIndexInferError: _unknown_endpoint}},
    }


# The pair generator's sampling loop is Python-bound (small models especially) and holds the GIL most of the time;
# HTTP handler threads then wait up to the interpreter's switch interval (5 ms) per hand-off. 1 ms cut the vote p99 at
# 16 concurrent clients from 862 to 195 ms on the shapes model (bench/serving.py, both in one run).
SWITCH_INTERVAL_S = 0.001


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (torch modules, the pipeline, Gradio's app) out of the garbage collector's
    reach. A full collection otherwise walks that whole heap with the GIL held: measured 240-290 ms pauses every few
    seconds under voting load, the whole vote p99 tail (bench/serving.py). Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-config", action="store_true", help="print the env-var table (Markdown) and exit")
    args = parser.parse_args(argv)
    if args.print_config:
        sys.stdout.write(config_markdown())
        return 0
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_env(os.environ)
    if Path(config.model).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model needs no hub; never stall on one
    if config.model == str(SHAPES_MODEL) and not SHAPES_MODEL.is_dir():
        parser.error(
            f"the embedded shapes model is not at {SHAPES_MODEL} yet: train it with `python -m ncp.shapes.pretrain "
            "--out models/shapes-base` or set NCP_MODEL to a diffusers pipeline folder."
        )
    logger.info("data dir %s, model %s, schedule %s", config.data_dir, config.model, config.schedule)
    runtime = Runtime(config)
    runtime.start()

    def stop_on_sigterm(signum: int, frame: object) -> None:  # `docker stop` / Space restart: shut down cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        access = os.environ.get("NCP_EXPORT_ACCESS", "public")
        if access not in EXPORT_ACCESS:
            parser.error(f"NCP_EXPORT_ACCESS must be one of {EXPORT_ACCESS}, got {access!r}")
        demo = build_demo(runtime, oauth=bool(os.environ.get("OAUTH_CLIENT_ID")), export_access=access)
        freeze_startup_heap()
        demo.launch(
            server_name=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
            server_port=int(env_value(os.environ, "GRADIO_SERVER_PORT", int, 7860)),
            **launch_kwargs(runtime),
        )
    finally:
        runtime.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
