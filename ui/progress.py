"""The Progress tab: "is it getting better?" in one look.

A headline sentence, a chart of the served model's quality over votes (shapes world: the held-out judge score of
each version on the line the app served, its 95% band, the ceiling; any model: each version's win rate against the
base from raters), markers for every round promoted or rejected with the reason in plain words, the leaderboard with
a line saying which votes it counts, and a before/after gallery (the base and a version on the same prompts and seed).
The numbers come from jobs.progress (measured off the request path by jobs.quality); drawing is plain SVG/HTML with
every text escaped.
"""

from __future__ import annotations

import html
import time
from urllib.parse import quote

import gradio as gr

from jobs import progress, views
from jobs.quality import TEST_PROBES
from jobs.registry import BASE
from ui.common import Ctx, text_html

W, H = 640, 300
PAD = {"l": 52, "r": 110, "t": 18, "b": 44}
COLORS = {"line": "#2563eb", "band": "#2563eb33", "ceiling": "#16a34a", "rejected": "#dc2626", "base": "#6b7280"}


def _e(x: object) -> str:
    return html.escape(str(x))


def chart_svg(
    title: str,
    desc: str,
    points: list[dict],
    *,
    y_label: str,
    refs: list[tuple[float, str, str]] = (),
    rejected: list[dict] = (),
    fmt: str = ".2f",
) -> str:
    """A line with a 95% band over votes: points [{"votes", "y", "low", "high", "label"}], horizontal reference lines
    (value, label, colour), and × markers on the x axis for rejected rounds ([{"votes", "text"}]). Accessible: an
    SVG image with a title and a description."""
    xs = [p["votes"] for p in points] + [r["votes"] for r in rejected] + [1]
    ys = [v for p in points for v in (p["y"], p["low"], p["high"]) if v == v] + [r[0] for r in refs]
    x_max = max(xs) * 1.05
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    span = max(y_hi - y_lo, 0.05)
    y_lo, y_hi = y_lo - 0.1 * span, y_hi + 0.1 * span
    pw, ph = W - PAD["l"] - PAD["r"], H - PAD["t"] - PAD["b"]

    def px(v: float) -> float:
        return round(PAD["l"] + pw * v / x_max, 1)

    def py(v: float) -> float:
        return round(PAD["t"] + ph * (1 - (v - y_lo) / (y_hi - y_lo)), 1)

    out = [
        f'<svg viewBox="0 0 {W} {H}" role="img" aria-labelledby="qc-t qc-d" xmlns="http://www.w3.org/2000/svg" '
        f'font-size="12" fill="currentColor"><title id="qc-t">{_e(title)}</title><desc id="qc-d">{_e(desc)}</desc>',
        f'<line x1="{PAD["l"]}" y1="{PAD["t"] + ph}" x2="{PAD["l"] + pw}" y2="{PAD["t"] + ph}" stroke="currentColor" '
        f'stroke-opacity="0.5"/><line x1="{PAD["l"]}" y1="{PAD["t"]}" x2="{PAD["l"]}" y2="{PAD["t"] + ph}" '
        'stroke="currentColor" stroke-opacity="0.5"/>',
    ]
    for i in range(5):
        v = y_lo + (y_hi - y_lo) * i / 4
        out.append(f'<text x="{PAD["l"] - 6}" y="{py(v) + 4}" text-anchor="end">{format(v, fmt)}</text>')
    for i in range(3):
        v = x_max / 1.05 * i / 2
        out.append(f'<text x="{px(v)}" y="{PAD["t"] + ph + 16}" text-anchor="middle">{v:.0f}</text>')
    out.append(f'<text x="{PAD["l"] + pw / 2}" y="{H - 6}" text-anchor="middle">votes</text>')
    out.append(
        f'<text transform="translate(12 {PAD["t"] + ph / 2}) rotate(-90)" text-anchor="middle">{_e(y_label)}</text>'
    )
    for value, label, color in refs:
        out.append(
            f'<line x1="{PAD["l"]}" x2="{PAD["l"] + pw}" y1="{py(value)}" y2="{py(value)}" stroke="{color}" '
            f'stroke-dasharray="6 4"/><text x="{PAD["l"] + pw + 4}" y="{py(value) + 4}" fill="{color}">'
            f"{_e(label)} {format(value, fmt)}</text>"
        )
    if points:
        band = [(px(p["votes"]), py(p["high"])) for p in points] + [
            (px(p["votes"]), py(p["low"])) for p in reversed(points)
        ]
        if all(p["low"] == p["low"] for p in points):
            pts = " ".join(f"{x},{y}" for x, y in band)
            out.append(
                f'<polygon points="{pts}" fill="{COLORS["band"]}" stroke="{COLORS["line"]}" stroke-opacity="0.3"/>'
            )
        line = " ".join(f"{px(p['votes'])},{py(p['y'])}" for p in points)
        out.append(f'<polyline points="{line}" fill="none" stroke="{COLORS["line"]}" stroke-width="2"/>')
        for p in points:
            x, y = px(p["votes"]), py(p["y"])
            tip = f"{p['label']}: {format(p['y'], fmt)} (95% {format(p['low'], fmt)} to {format(p['high'], fmt)})"
            out.append(
                f'<g class="promoted"><circle cx="{x}" cy="{y}" r="5" fill="{COLORS["line"]}"><title>{_e(tip)}</title>'
                f'</circle><text x="{x}" y="{y - 10}" text-anchor="middle">{_e(p["label"].split(" ")[0])}</text></g>'
            )
    for r in rejected:
        x, y = px(r["votes"]), PAD["t"] + ph
        out.append(
            f'<g class="rejected"><text x="{x}" y="{y - 4}" text-anchor="middle" fill="{COLORS["rejected"]}" '
            f'font-size="16">×</text><title>{_e(r["text"])}</title></g>'
        )
    out.append("</svg>")
    return "".join(out)


def _interval(p: dict, fmt: str = ".2f") -> str:
    return f"{format(p['judge'], fmt)} (95% {format(p['low'], fmt)} to {format(p['high'], fmt)})"


def quality_view(ctx: Ctx, rows: list[dict], events: list[dict]) -> tuple[str, str]:
    """(headline, chart SVG or an empty state) for the served model's quality."""
    rt = ctx.runtime
    rejected = [{"votes": e["votes"], "text": f"Round {e['round']}: {e['reason']}"} for e in events
                if e["status"] != "promoted"]  # fmt: skip
    q = progress.quality_series(rt) if rt.config.is_shapes else None
    if q is not None and q["points"]:
        pts = [p | {"y": p["judge"], "label": progress.version_label(rt, p["version"])} for p in q["points"]]
        ceiling = q["ceiling"]
        refs = [(ceiling["judge"], "ceiling", COLORS["ceiling"])] if ceiling else []
        base, last = q["points"][0], q["points"][-1]
        where = f"on {TEST_PROBES} held-out prompts"
        if last["version"] == BASE:
            head = f"Serving the base model: judge score {_interval(base)} {where}. No version has been promoted yet."
        else:
            gain = last["judge"] - base["judge"]
            verdict = "Yes" if last["low"] > base["judge"] else "Not clearly" if gain > 0 else "Not yet"
            head = f"{verdict}: {last['version']} scores {_interval(last)} {where}, the base {base['judge']:.2f}"
            head += f" ({gain:+.2f})."
            if ceiling and ceiling["judge"] > base["judge"]:
                head += f" That is {gain / (ceiling['judge'] - base['judge']):.0%} of the gap to the ceiling."
        if ceiling:
            head += f" Ceiling (the same world's model trained on clean captions): {ceiling['judge']:.2f}."
        if q["pending"]:
            head += f" Still measuring: {', '.join(q['pending'])}."
        title = "Judge score of the served model over votes"
        svg = chart_svg(title, head, pts, y_label="judge score (held-out)", refs=refs, rejected=rejected)
        return head, svg
    wins = progress.win_rate_series(rows, rt)
    if wins:
        pts = [p | {"y": p["rate"], "label": p["version"]} for p in wins]
        last = wins[-1]
        head = (
            f"{last['version']} wins {last['rate']:.0%} of its votes against the base "
            f"(95% {last['low']:.0%} to {last['high']:.0%}, {last['n']} votes)."
        )
        title = "Win rate against the base over votes"
        svg = chart_svg(title, head, pts, y_label="win rate vs base", refs=[(0.5, "even", COLORS["base"])],
                        rejected=rejected, fmt=".0%")  # fmt: skip
        return head, svg
    if q is not None:
        measuring = getattr(ctx.quality, "measuring", None) if ctx.quality is not None else None
        head = f"The chart appears once the base model has been scored on {TEST_PROBES} held-out prompts " + (
            f"(measuring {measuring} now, about a minute)." if measuring else "(this runs in the background)."
        )
    else:
        head = "The chart appears once a promoted version has met the base in cross-version pairs; raters' votes "
        head += "between the two give its win rate."
    return head, ""  # the headline says what will appear and when


def events_html(ctx: Ctx, events: list[dict]) -> str:
    """Every finished round, newest first, with its reason in plain words; or what will appear and when."""
    if not events:
        s = progress.round_status(ctx.runtime)
        need = s["min_new_votes"]
        return text_html(f"No training round yet: the first starts once {need} new votes have arrived. Each round "
                         "is listed here, promoted or not, with the reason.")  # fmt: skip
    now = time.time()
    items = "".join(
        f'<li class="{e["status"]}"><strong>Round {e["round"]}</strong> ({progress.ago(now - e["when"])}, '
        f"{e['votes']} votes): {_e(e['reason'])}</li>"
        for e in events[:12]
    )
    return f"<ul>{items}</ul>"


def on_progress(ctx: Ctx) -> dict:
    rt = ctx.runtime
    rows = progress.leaderboard_rows(rt)
    events = progress.round_events(rt)
    head, chart = quality_view(ctx, rows, events)
    cross, total = len(rt.store.cross_version_comparisons()), rt.store.counts().get("votes", 0)
    versions = views.gallery_versions(rt)
    after = rt.generation.serving_version if rt.generation.serving_version in versions else versions[-1]
    return {
        ctx.headline: text_html(head),
        ctx.chart: chart,
        ctx.events: events_html(ctx, events),
        ctx.round_md: "".join(text_html(line) for line in progress.status_lines(progress.round_status(rt))),
        ctx.board_note: text_html(progress.leaderboard_note(cross, total)),
        ctx.board: progress.leaderboard_frame(rows),
        ctx.after_pick: gr.Dropdown(choices=[v for v in versions if v != BASE] or [BASE], value=after),
    }


def on_progress_tick(ctx: Ctx) -> dict:
    """The timer's refresh: everything but the before/after choice, which the watcher may be holding."""
    return {k: v for k, v in on_progress(ctx).items() if k is not ctx.after_pick}


def file_url(path: str) -> str:
    return "gradio_api/file=" + quote(path)


def before_after_html(prompts: list[str], before: list[str], after: list[str], labels: tuple[str, str]) -> str:
    """Pairs of images of the same prompt and seed, before | after, each with its prompt as caption and alt text."""
    figs = []
    for prompt, b, a in zip(prompts, before, after, strict=True):
        p = _e(prompt)
        figs.append(
            f'<figure><div class="ba-imgs"><img src="{_e(file_url(b))}" alt="before ({_e(labels[0])}): {p}">'
            f'<img src="{_e(file_url(a))}" alt="after ({_e(labels[1])}): {p}"></div>'
            f'<div class="ba-labels"><span>{_e(labels[0])}</span><span>{_e(labels[1])}</span></div>'
            f"<figcaption>{p}</figcaption></figure>"
        )
    return f'<div class="ba-grid">{"".join(figs)}</div>'


def on_before_after(ctx: Ctx, version: str | None) -> dict:
    """The base and `version` (default: the served one) on the probe prompts with one fixed seed."""
    rt = ctx.runtime
    versions = views.gallery_versions(rt)
    if not isinstance(version, str) or version not in versions:
        version = rt.generation.serving_version if rt.generation.serving_version in versions else versions[-1]
    before = views.probe_gallery(rt, BASE)
    if version == BASE:
        note = "No version has been promoted yet: these are the base model's images. After the first promotion, the "
        note += "same prompts and seed appear here side by side, before and after."
        after = before
    else:
        after = views.probe_gallery(rt, version)
        note = (
            f"The same prompts and seed ({views.PROBE_SEED}): base on the left of each pair, {version} on the right."
        )
    labels = ("base", version)
    body = before_after_html([p for _, p in before], [b for b, _ in before], [a for a, _ in after], labels)
    return {ctx.ba_note: text_html(note), ctx.before_after: body}
