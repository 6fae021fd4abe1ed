"""What reaches the server besides the page: the HTTP API for scripts (`/next_pair`, `/vote`, `/admin`, `/export`;
docs/API.md) and the Data and Admin tabs' handlers (they share the export and admin paths). What reaches Gradio's
routes around the handlers (the UI's own handlers by name, uploads, malformed requests, files) is `EdgeGuard`'s, in
ui/edges.py."""

from __future__ import annotations

import math
from pathlib import Path

import gradio as gr
import pandas as pd

from feedback_store import InputRejected
from feedback_store.export import __doc__ as EXPORT_DOC
from jobs import views
from jobs.prompts import PromptRejected
from jobs.registry import RegistryError
from jobs.runtime import AdminDenied
from ui.common import Ctx, address, text_html, timed, username
from ui.edges import PUBLIC_API, EdgeGuard, unknown_endpoint  # noqa: F401 (re-exported)

EXPORT_ACCESS = ("public", "admin")
EXPORTS_PER_MINUTE = 6  # per client address, /export and the Data tab's button together


# -- Data and Admin handlers -----------------------------------------------------------------------------------------
def on_counts(ctx: Ctx) -> dict:
    counts = ctx.runtime.store.counts()
    return {ctx.counts: pd.DataFrame({"table": list(counts), "rows": list(counts.values())})}


def on_export(ctx: Ctx, token: str, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
    """The Data tab's download: the newest snapshot, its time and row count (with NCP_EXPORT_ACCESS=admin, only for
    admins: the Admin tab's token or an admin login)."""
    addr = address(ctx, request, always=True)
    try:
        if ctx.export_access == "admin":
            user = username(profile)
            views.check_admin(ctx.runtime, token, user, addr, ctx.admin_limiter)
        info = _export(ctx, addr)
    except (views.RateLimited, AdminDenied) as err:
        return {ctx.export_info: text_html(f"⚠️ {err}", role="alert")}
    return {ctx.export_file: str(info.zip_path), ctx.export_info: text_html(info.summary())} | on_counts(ctx)


def on_admin(
    ctx: Ctx, action: str, token: str, value: str, request: gr.Request, profile: gr.OAuthProfile | None
) -> dict:
    user = username(profile)
    addr = address(ctx, request, always=True)
    try:
        text = views.admin_action(
            ctx.runtime,
            action,
            value,
            token or None,
            user,
            ctx.timings,
            address=addr,
            limiter=ctx.admin_limiter,
        )
    except (AdminDenied, views.RateLimited) as err:
        return {ctx.admin_out: text_html(f"⛔ {err}", role="alert")}
    except (ValueError, RegistryError, KeyError) as err:
        return {ctx.admin_out: text_html(f"⚠️ {err}", role="alert")}
    out = {ctx.versions: gr.Dropdown(choices=views.gallery_versions(ctx.runtime))}
    if action == "read_blocklist":
        return out | {ctx.blocklist: text, ctx.admin_out: text_html("Blocklist loaded.")}
    return out | {ctx.admin_out: text_html(f"✅ {text}")}


# -- API (gr.api endpoints: plain JSON in and out) ------------------------------------------------------------------
def _export(ctx: Ctx, addr: str | None) -> views.ExportInfo:
    """The newest snapshot (views.latest_export), at most EXPORTS_PER_MINUTE calls a minute per address."""
    if addr is not None:
        wait = ctx.export_limiter.retry_after(addr)
        if wait > 0:
            raise views.RateLimited(f"Too many exports from your address; try again in {math.ceil(wait)} s.", wait)
        ctx.export_limiter.add(addr)
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
    ctx: Ctx,
    session_id: str,
    token: str,
    outcome: str,
    reasons: list[str] | str | None = "",
    request: gr.Request = None,
) -> dict:
    """Vote on a pair issued to `session_id`; returns the reveal or a refusal. See docs/API.md."""
    if reasons is None:  # not sent (EdgeGuard sends a missing argument as null)
        reasons = []
    elif isinstance(reasons, str):
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
            address=address(ctx, request),
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
    addr = address(ctx, request, always=True)
    try:
        message = views.admin_action(
            ctx.runtime, action, value, token or None, None, ctx.timings, address=addr, limiter=ctx.admin_limiter
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
    addr = address(ctx, request, always=True)
    try:
        if ctx.export_access == "admin":
            views.check_admin(ctx.runtime, token, None, addr, ctx.admin_limiter)
        info = _export(ctx, addr)
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


def schema_markdown() -> str:
    """The Data tab's description of the export, from feedback_store.export's own docstring."""
    paragraphs = [p for p in EXPORT_DOC.split("\n\n") if p.startswith(("Rows:", "By default", "Split:"))]
    return "### What is in the export\n\n" + "\n\n".join(" ".join(p.split()) for p in paragraphs)
