"""ncp-arena: vote between two images of one prompt; the votes train the next version of the model, live.

    python app.py                      # fresh data dir, embedded shapes model, http://127.0.0.1:7860
    python app.py --print-config       # the configuration table (docs/CONFIG.md is generated from it)

Gradio UI only (DESIGN.md): `build_demo(runtime)` lays out the tabs (Arena, Progress, Data, Admin) and wires thin
top-level handlers (ui/: arena.py, progress.py, api.py) that call the runtime's services (jobs/) and return dicts keyed
by component; `main()` maps the environment (ENV_VARS) onto `ArenaConfig`, starts the runtime and the quality tracker
(jobs/quality.py: the Progress chart's held-out scores, measured off the request path) and stops them on exit.

HTTP API for scripts (`/next_pair`, `/vote`, `/admin`, `/export`; gradio_client or any HTTP client): docs/API.md.
The UI's own handlers are not API endpoints: `EdgeGuard` (ui/edges.py) refuses them over REST and Gradio's direct
routes, refuses uploads and malformed requests Gradio would answer with a 500, and serves the images and export zips
that API answers name by relative path.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

for _key, _value in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(_key, _value)  # before gradio is imported: no outbound calls at start (STACK_NOTES)

import gradio as gr  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from gradio.route_utils import FnIndexInferError  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from jobs import views  # noqa: E402
from jobs.arena import REASON_TAGS  # noqa: E402
from jobs.prompts import MAX_PROMPT_CHARS  # noqa: E402
from jobs.quality import QualityTracker  # noqa: E402
from jobs.runtime import SHAPES_CEILING, SHAPES_MODEL, Runtime  # noqa: E402
from jobs.settings import ENV_VARS, config_from_env, config_markdown, env_value  # noqa: E402, F401
from ui import api, arena, progress  # noqa: E402
from ui.api import EXPORT_ACCESS, EXPORTS_PER_MINUTE  # noqa: E402, F401
from ui.assets import CSS, KEYS, OUTCOMES, PAGE_JS, after_vote_js  # noqa: E402, F401
from ui.common import Ctx, address, bind  # noqa: E402, F401
from ui.edges import PUBLIC_API, EdgeGuard, invalid_request, unknown_endpoint  # noqa: E402, F401

logger = logging.getLogger("app")
_address = address  # the name tests and benches use
REASONS = list(REASON_TAGS)  # the only reasons the store takes (jobs.arena.check_reasons)
HOW_TO = (
    '<p>Which image matches the prompt better? <span class="touch-only">Tap a button below the images.</span>'
    '<span class="kbd-only">Click a button or press <kbd>1</kbd> left, <kbd>2</kbd> right, <kbd>3</kbd> tie, '
    "<kbd>4</kbd> both bad.</span> Versions are revealed after your vote.</p>"
)


def build_demo(
    runtime: Runtime,
    oauth: bool = False,
    export_access: str = "public",
    limiter_clock: Callable[[], float] = time.monotonic,
    quality: QualityTracker | None = None,
) -> gr.Blocks:
    """The arena UI over a started Runtime. `oauth`: show the HF login button (Spaces with `hf_oauth: true`).
    `export_access`: "public" (anyone may download the export: a public dataset) or "admin" (needs admin credentials;
    the Data tab's button then asks for them too). `limiter_clock`: the per-address limiters' clock (tests).
    `quality`: the started tracker that measures the Progress chart's scores (its state shows in empty states)."""
    if export_access not in EXPORT_ACCESS:
        raise ValueError(f"export_access must be one of {EXPORT_ACCESS}, got {export_access!r}")
    ctx = Ctx(runtime=runtime, clock=views.PairClock(), timings=views.HandlerTimes(), export_access=export_access)
    ctx.admin_limiter = views.AddressLimiter(views.ADMIN_FAILURES_PER_MINUTE, 60.0, clock=limiter_clock)
    ctx.export_limiter = views.AddressLimiter(EXPORTS_PER_MINUTE, 60.0, clock=limiter_clock)
    ctx.quality = quality
    quiet = {"api_visibility": "private", "show_progress": "hidden"}
    with gr.Blocks(title="ncp-arena") as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(
                "# ncp-arena\nVote for the better image: every vote trains the next version.", elem_id="app-title"
            )
            if oauth:
                gr.LoginButton(scale=0)
        ctx.browser_id = gr.BrowserState(None, storage_key="ncp-arena-rater")
        ctx.me = gr.State({})
        with gr.Tabs():
            with gr.Tab("Arena", id="arena") as arena_tab:
                ctx.state = gr.State({})
                gr.HTML(HOW_TO, elem_id="how-to")
                ctx.counter = gr.HTML("", elem_id="my-counter")
                ctx.pair = gr.HTML(arena.pair_html(None), elem_id="arena-pair")
                with gr.Row(elem_id="vote-row"):
                    ctx.vote_buttons = {
                        o: gr.Button(
                            label,
                            elem_id=f"vote-{o}",
                            variant="primary" if o in ("left", "right") else "secondary",
                            interactive=False,
                            min_width=0,
                        )
                        for o, label in OUTCOMES.items()
                    }
                ctx.reveal = gr.HTML("", elem_id="arena-reveal")
                with gr.Accordion("Why? (optional, before you vote)", open=False):
                    ctx.reasons = gr.CheckboxGroup(REASONS, label="What was wrong with the other image?")
                ctx.status = gr.HTML("", elem_id="arena-status")
                with gr.Row(equal_height=True):
                    ctx.prompt_in = gr.Textbox(
                        label="Your own prompt (optional)",
                        placeholder="Leave empty for prompts from the pool; press Enter to generate",
                        max_length=MAX_PROMPT_CHARS,
                        scale=4,
                        elem_id="prompt-in",
                    )
                    gen_btn = gr.Button("Generate", scale=1, min_width=90)
                    skip_btn = gr.Button("New pair", scale=1, min_width=90)
                gr.HTML(arena.text_html(arena.vocabulary_text(runtime.config.is_shapes)), elem_id="vocabulary")
                examples = arena.EXAMPLES_SHAPES if runtime.config.is_shapes else views.probe_prompts(runtime, 4)
                gr.Examples([[e] for e in examples], ctx.prompt_in, label="Example prompts (click one, then Generate)")
            with gr.Tab("Progress", id="progress") as progress_tab:
                gr.Markdown("## Is it getting better?")
                ctx.headline = gr.HTML(elem_id="progress-headline")
                ctx.chart = gr.HTML(elem_id="quality-chart")
                gr.Markdown("### Training rounds")
                ctx.round_md = gr.HTML(elem_id="round-status")
                ctx.events = gr.HTML(elem_id="round-events")
                gr.Markdown("### Before and after")
                ctx.after_pick = gr.Dropdown([], label="After: version", elem_id="after-pick")
                ctx.ba_note = gr.HTML()
                ctx.before_after = gr.HTML(elem_id="before-after")
                gr.Markdown("### Leaderboard")
                ctx.board_note = gr.HTML(elem_id="board-note")
                ctx.board = gr.Dataframe(label="Leaderboard", interactive=False, elem_id="leaderboard")
                timer = gr.Timer(5.0, active=False)
            with gr.Tab("Data", id="data") as data_tab:
                ctx.counts = gr.Dataframe(label="Rows in the store", interactive=False)
                export_btn = gr.Button("Download the latest export (Parquet, Pick-a-Pic v2 columns)", elem_id="export")
                ctx.export_info = gr.HTML(elem_id="export-info")
                ctx.export_file = gr.File(label="Export (zip)", interactive=False, elem_id="export-file")
                gr.Markdown(api.schema_markdown())
            with gr.Tab("Admin", id="admin", visible=False) as ctx.admin_tab:
                gr.Markdown("Every action is checked on the server: give the admin token or sign in as an admin.")
                token = gr.Textbox(label="Admin token", type="password")
                with gr.Row():
                    admin_btns = {a: gr.Button(t) for a, t in [("run_round", "Run a round now"), ("pause", "Pause"),
                                                              ("resume", "Resume"), ("status", "Status")]}  # fmt: skip
                with gr.Row():
                    ctx.versions = gr.Dropdown([], label="Serve version", scale=3)
                    promote_btn = gr.Button("Promote / roll back", scale=1)
                ctx.blocklist = gr.Textbox(label="Prompt blocklist (one word or phrase per line)", lines=6)
                with gr.Row():
                    load_bl, save_bl = gr.Button("Load blocklist"), gr.Button("Save blocklist")
                ctx.admin_out = gr.HTML(elem_id="admin-out")

        arena_out = {ctx.state, ctx.pair, ctx.reasons, ctx.status, ctx.reveal, *ctx.vote_buttons.values()}
        pairs = {"concurrency_id": "pairs", "concurrency_limit": 4, "api_visibility": "private"}
        pairs |= {"show_progress_on": ctx.pair}  # the loading state shows on the images, not on the reveal
        # Typed prompts run the pipeline: one at a time, like GenerationService's lock (pool pairs are prefetched).
        generate = {"concurrency_id": "generate", "concurrency_limit": 1, "api_visibility": "private"}
        load_out = {ctx.browser_id, ctx.me, ctx.counter, ctx.admin_tab}
        demo.load(bind(arena.on_load, ctx), ctx.browser_id, load_out, **quiet)
        demo.load(bind(arena.on_pool_pair, ctx), None, arena_out, **pairs)
        demo.load(None, js=PAGE_JS)
        for trigger in (gen_btn.click, ctx.prompt_in.submit):
            trigger(bind(arena.on_pair, ctx), ctx.prompt_in, arena_out, **generate)
        skip_btn.click(bind(arena.on_pool_pair, ctx), None, arena_out, **pairs)
        for outcome, btn in ctx.vote_buttons.items():
            btn.click(
                bind(arena.on_vote, ctx, outcome),
                [ctx.state, ctx.reasons, ctx.me],
                arena_out | {ctx.me, ctx.counter},
                concurrency_id="votes",
                concurrency_limit=16,
                api_visibility="private",
                trigger_mode="once",
                show_progress="hidden",  # the buttons turn disabled at once; the reveal follows
            ).then(bind(arena.on_pool_pair, ctx), None, arena_out, **pairs).then(None, js=after_vote_js(outcome))

        progress_out = {ctx.headline, ctx.chart, ctx.events, ctx.round_md, ctx.board_note, ctx.board, ctx.after_pick}
        ba_out = {ctx.ba_note, ctx.before_after}
        progress_tab.select(bind(progress.on_progress, ctx), None, progress_out, **quiet).then(
            bind(progress.on_before_after, ctx), ctx.after_pick, ba_out, **generate
        )
        progress_tab.select(lambda: gr.Timer(active=True), None, timer, **quiet)
        for tab in (arena_tab, data_tab, ctx.admin_tab):
            tab.select(lambda: gr.Timer(active=False), None, timer, **quiet)
        timer.tick(bind(progress.on_progress_tick, ctx), None, progress_out - {ctx.after_pick}, **quiet)
        ctx.after_pick.input(bind(progress.on_before_after, ctx), ctx.after_pick, ba_out, **generate)

        data_tab.select(bind(api.on_counts, ctx), None, ctx.counts, api_visibility="private")
        export_out = {ctx.export_file, ctx.export_info, ctx.counts}
        export_btn.click(bind(api.on_export, ctx), token, export_out, api_visibility="private")

        admin_out = {ctx.admin_out, ctx.versions, ctx.blocklist}
        ctx.admin_tab.select(lambda: gr.Dropdown(choices=views.gallery_versions(runtime)), None, ctx.versions, **quiet)
        private = {"api_visibility": "private"}
        for action, btn in admin_btns.items():
            btn.click(bind(api.on_admin, ctx, action), [token, ctx.versions], admin_out, **private)
        promote_btn.click(bind(api.on_admin, ctx, "promote"), [token, ctx.versions], admin_out, **private)
        save_bl.click(bind(api.on_admin, ctx, "set_blocklist"), [token, ctx.blocklist], admin_out, **private)
        load_bl.click(bind(api.on_admin, ctx, "read_blocklist"), [token, ctx.blocklist], admin_out, **private)

        gr.api(bind(api.api_next_pair, ctx), api_name="next_pair", concurrency_id="pairs", concurrency_limit=4)
        gr.api(bind(api.api_vote, ctx), api_name="vote", concurrency_id="votes", concurrency_limit=16)
        gr.api(bind(api.api_admin, ctx), api_name="admin", concurrency_limit=1)
        gr.api(bind(api.api_export, ctx), api_name="export", concurrency_id="export", concurrency_limit=1)
    # api_open=False: Gradio's direct routes (/run/<name>, /api/<name>) would skip the queue and its limits.
    demo.queue(default_concurrency_limit=4, api_open=False)
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
        "app_kwargs": {
            "middleware": [guard],
            "exception_handlers": {FnIndexInferError: unknown_endpoint, RequestValidationError: invalid_request},
        },
    }


# The pair generator's sampling loop is Python-bound (small models especially) and holds the GIL most of the time;
# HTTP handler threads then wait up to the interpreter's switch interval (5 ms) per hand-off. 1 ms cut the vote p99 at
# 16 concurrent clients from 862 to 195 ms on the shapes model (bench/serving.py, both in one run).
SWITCH_INTERVAL_S = 0.001

# Third-party loggers whose INFO lines tell a user nothing: httpx logs every request Gradio makes to itself at start,
# APScheduler its job bookkeeping ("Adding job tentatively ...", every run of the round job). Their warnings still show.
QUIET_LOGGERS = ("httpx", "apscheduler")


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (torch modules, the pipeline, Gradio's app) out of the garbage collector's
    reach. A full collection otherwise walks that whole heap with the GIL held: measured 240-290 ms pauses every few
    seconds under voting load, the whole vote p99 tail (bench/serving.py). Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def quality_tracker(runtime: Runtime) -> QualityTracker | None:
    """The started tracker of the Progress chart's held-out scores: shapes-world models only (the judge reads
    shapes), with the ceiling line when models/shapes-ceiling is present."""
    if not runtime.config.is_shapes:
        return None
    ceiling = str(SHAPES_CEILING) if SHAPES_CEILING.is_dir() else None
    tracker = QualityTracker(runtime.registry, runtime.config.data_dir, runtime.config.model, ceiling)
    tracker.start()
    return tracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-config", action="store_true", help="print the env-var table (Markdown) and exit")
    args = parser.parse_args(argv)
    if args.print_config:
        sys.stdout.write(config_markdown())
        return 0
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
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
    quality = quality_tracker(runtime)

    def stop_on_sigterm(signum: int, frame: object) -> None:  # `docker stop` / Space restart: shut down cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        access = os.environ.get("NCP_EXPORT_ACCESS", "public")
        if access not in EXPORT_ACCESS:
            parser.error(f"NCP_EXPORT_ACCESS must be one of {EXPORT_ACCESS}, got {access!r}")
        oauth = bool(os.environ.get("OAUTH_CLIENT_ID"))
        demo = build_demo(runtime, oauth=oauth, export_access=access, quality=quality)
        freeze_startup_heap()
        host = os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
        port = int(env_value(os.environ, "GRADIO_SERVER_PORT", int, 7860))
        # quiet: Gradio's own lines offer a share link, which this app never uses (a Space has its own address)
        demo.launch(server_name=host, server_port=port, quiet=True, prevent_thread_lock=True, **launch_kwargs(runtime))
        logger.info("Running on local URL:  http://%s:%d", host, demo.server_port)
        demo.block_thread()
    finally:
        if quality is not None:
            quality.stop()
        runtime.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
