"""Plumbing every handler shares: the context object, timing, binding it to handlers, rater ids, client addresses.

Handlers are plain top-level functions `fn(ctx, *inputs, request?, profile?) -> dict` keyed by component; `bind`
fixes their first parameters for Gradio without hiding the signature Gradio reads.
"""

from __future__ import annotations

import functools
import html
import inspect
import time
from collections.abc import Callable
from types import SimpleNamespace

import gradio as gr

from jobs import views


class Ctx(SimpleNamespace):
    """What handlers need: `runtime`, `clock` (views.PairClock), `timings` (views.HandlerTimes), the per-address
    limiters `admin_limiter` and `export_limiter`, `export_access` ("public" or "admin") and the UI's components by
    name."""


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


def username(profile: gr.OAuthProfile | None) -> str | None:
    return getattr(profile, "username", None) if profile is not None else None


def rater_key(ctx: Ctx, session: str, profile: gr.OAuthProfile | None, browser_id: str | None = None) -> str:
    """Pseudonymous rater id: the HF username when logged in, else the browser's signed id (kept in its storage, so
    a reload is the same rater), else the session (UI session hash / API session_id)."""
    user = username(profile)
    if user:
        return ctx.runtime.rater_id(f"hf:{user}")
    if browser_id:
        return ctx.runtime.rater_id(f"browser:{browser_id}")
    return ctx.runtime.rater_id(f"session:{session}")


def address(ctx: Ctx, request: gr.Request | None, *, always: bool = False) -> str | None:
    """The client address for the per-address limits, kept in memory only: the vote limit (None when it is off) and,
    with `always`, admin attempts and exports. None without a request. The app's one reader of the client address."""
    if request is None:
        return None
    peer = request.client.host if request.client else None
    forwarded = request.headers.get("x-forwarded-for")
    if always:
        return views.request_address(ctx.runtime, peer, forwarded)
    return views.vote_address(ctx.runtime, peer, forwarded)


def text_html(message: str, *, role: str | None = None, cls: str = "") -> str:
    """A message as HTML that shows any user text in it as plain text: everything is escaped, nothing is markup."""
    attrs = (f' role="{role}"' if role else "") + (f' class="{cls}"' if cls else "")
    return f"<p{attrs}>{html.escape(message)}</p>" if message else ""
