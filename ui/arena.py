"""The Arena tab's handlers: a rater's identity and counter on load, a pair (pool or typed prompt), a vote and its
reveal. Every piece of user text (prompts, rejection messages that quote them) reaches the page escaped: shown as
text, never as markup."""

from __future__ import annotations

import html
import time
from pathlib import Path
from urllib.parse import quote

import gradio as gr

from feedback_store import InputRejected, VoteRejected
from jobs import progress, views
from jobs.prompts import MAX_PROMPT_CHARS, PromptRejected
from ui.assets import OUTCOMES
from ui.common import Ctx, address, rater_key, text_html, timed, username

FRIENDLY = {
    "expired": "This pair expired before your vote.",
    "conflicting_vote": "You already voted differently on this pair.",
    "unknown_token": "This pair is no longer known to the server.",
    "address_rate_limited": "Too many votes are coming from your network right now; wait a minute.",
}
EXAMPLES_SHAPES = [
    "a large red circle on the left, gray background",
    "a small blue square at the top, white background",
    "a large yellow triangle in the center, black background",
    "a small green circle left of a large purple square, white background",
]


def vocabulary_text(is_shapes: bool) -> str:
    """What the prompt box accepts, shown beside it (so nobody learns the vocabulary from a rejection)."""
    if not is_shapes:
        return f"Any short description in English, up to {MAX_PROMPT_CHARS} characters."
    from ncp.shapes.grammar import BACKGROUNDS, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES

    return (
        "This model knows a small world: a [size] [colour] [shape] [position], [background] background. "
        f"Sizes: {', '.join(SIZES)}. Colours: {', '.join(COLORS)}. Shapes: {', '.join(SHAPES)}. "
        f"Positions: {', '.join(POSITIONS.values())}. Two objects: {', '.join(RELATIONS)} "
        f"(“a small red circle left of a large blue square”). Backgrounds: {', '.join(BACKGROUNDS)}."
    )


def image_url(path: str) -> str:
    """Where the page fetches an arena image: EdgeGuard serves images/<sha256>.png from the data dir."""
    return "gradio_api/file=images/" + quote(Path(path).name)


def pair_html(prompt: str | None, left: str | None = None, right: str | None = None) -> str:
    """The prompt and the two images side by side; alt text says which side and the prompt (escaped)."""
    if prompt is None:
        return '<div class="pair-empty"><p>Loading a pair…</p></div>'
    text = html.escape(prompt)
    figs = "".join(
        f'<figure id="arena-{side}"><img src="{html.escape(image_url(path))}" alt="{side} image: {text}" '
        f'width="64" height="64"><figcaption>{side.capitalize()}</figcaption></figure>'
        for side, path in (("left", left), ("right", right))
    )
    return f'<p class="arena-prompt" id="arena-prompt">{text}</p><div class="pair-imgs">{figs}</div>'


def counter_html(counts: dict[str, int]) -> str:
    votes = f"{counts['today']} vote{'s' if counts['today'] != 1 else ''} today"
    checks = f"{counts['passed']} attention check{'s' if counts['passed'] != 1 else ''} passed"
    return text_html(f"{votes} · {checks}")


def _buttons(ctx: Ctx, enabled: bool) -> dict:
    return {b: gr.Button(interactive=enabled) for b in ctx.vote_buttons.values()}


def on_load(ctx: Ctx, stored_id: object, request: gr.Request, profile: gr.OAuthProfile | None) -> dict:
    """Who this rater is (the browser's signed id, made now on a first visit; the HF login when present), their
    counter, and whether the Admin tab is shown (an admin login, or `?admin` in the address: every admin action is
    still checked on the server)."""
    secret = ctx.runtime.config.rater_salt
    raw = views.check_browser_id(stored_id, secret)
    if raw is None:
        stored_id = views.new_browser_id(secret)
        raw = views.check_browser_id(stored_id, secret)
    rater = rater_key(ctx, request.session_hash, profile, raw)
    counts = views.rater_counts(ctx.runtime, rater)
    user = username(profile)
    admin = "admin" in request.query_params or (bool(user) and user in ctx.runtime.config.admin_users)
    return {
        ctx.browser_id: stored_id,
        ctx.me: {"rater": rater} | counts,
        ctx.counter: counter_html(counts),
        ctx.admin_tab: gr.Tab(visible=admin),
    }


def on_pair(ctx: Ctx, prompt: str, request: gr.Request) -> dict:
    """Show a new pair: the typed prompt when given, else one from the pool (prefetched, instant)."""
    try:
        pair = ctx.runtime.arena.next_pair(request.session_hash, (prompt or "").strip() or None)
    except PromptRejected as err:
        return {ctx.status: text_html(f"⚠️ {err}", role="alert")}
    except InputRejected as err:  # a session hash the store refuses, too many pairs without a vote
        return {ctx.status: text_html(f"⚠️ {err.message}", role="alert")}
    state = {"token": pair.token, "pair_id": pair.pair_id, "shown_at": time.monotonic()}
    out = {ctx.state: state, ctx.pair: pair_html(pair.prompt, pair.left_path, pair.right_path)}
    return out | {ctx.reasons: [], ctx.status: ""} | _buttons(ctx, True)


@timed("ui_next_pair")
def on_pool_pair(ctx: Ctx, request: gr.Request) -> dict:
    return on_pair(ctx, "", request)


def control_text(passed: bool, broken: str | None) -> str:
    """An attention check's result, with why when missed (`broken`: the side of the deliberately broken image)."""
    if broken not in ("left", "right"):
        return "This was an attention check " + ("(passed)." if passed else "(missed).")
    if passed:
        return f"This was an attention check: the {broken} image was deliberately broken, and you spotted it."
    intact = "Right" if broken == "left" else "Left"
    return (
        f"This was an attention check (missed): the {broken} image was deliberately broken, so “{intact} is better” "
        "was the answer; a tie or “both are bad” does not pass one."
    )


@timed("ui_vote")
def on_vote(
    ctx: Ctx,
    outcome: str,
    state: dict,
    reasons: list[str],
    me: dict,
    request: gr.Request,
    profile: gr.OAuthProfile | None,
) -> dict:
    """Record the vote (server-side time since the pair was issued), then reveal who made each image."""
    if not state or not state.get("token"):
        return {ctx.reveal: text_html("Nothing to vote on yet: wait for the pair to load.")}
    rater = (me or {}).get("rater") or rater_key(ctx, request.session_hash, profile)
    try:
        res = ctx.runtime.arena.vote(
            request.session_hash,
            state["token"],
            outcome,
            rater,
            reasons=tuple(reasons or ()),
            time_to_vote_ms=views.elapsed_ms(state["shown_at"]),
            address=address(ctx, request),
        )
    except VoteRejected as err:
        text = f"⚠️ Your vote was not counted. {FRIENDLY.get(err.reason_code, err.message)} Here is a new pair."
        return {ctx.state: {}, ctx.reveal: text_html(text)} | _buttons(ctx, False)
    left = progress.version_label(ctx.runtime, res.left_version)
    right = progress.version_label(ctx.runtime, res.right_version)
    reveal = (
        f"<p><strong>You chose: {html.escape(OUTCOMES[res.outcome])}.</strong> Left: {html.escape(left)}. "
        f"Right: {html.escape(right)}. Here is the next pair.</p>"
    )
    me = dict(me or {"today": 0, "controls": 0, "passed": 0}, rater=rater)
    me["today"] = me.get("today", 0) + 1
    if res.control_passed is not None:  # an attention check: one image was deliberately broken
        me["controls"] = me.get("controls", 0) + 1
        me["passed"] = me.get("passed", 0) + int(res.control_passed)
        pair = ctx.runtime.store.pair(state.get("pair_id"))
        reveal += text_html(control_text(res.control_passed, pair.control_bad_side if pair else None))
    out = {ctx.state: {}, ctx.reveal: reveal, ctx.me: me, ctx.counter: counter_html(me)}
    return out | _buttons(ctx, False)
