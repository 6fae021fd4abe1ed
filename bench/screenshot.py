"""Screenshots of every tab at a phone (390x844) and a laptop (1366x768) viewport, into docs/screenshots/.

    python -m bench.screenshot                                       # fresh data dir, the embedded shapes model
    python -m bench.loop --data-dir runs/loop-default                # a real improvement (about 25 min on a CPU)
    python -m bench.screenshot --data-dir runs/loop-default          # ... then its served version, votes and rounds

Starts the app in-process (schedule off) on `--data-dir` (a copy is not made: the app only adds rows, probe images and
quality records), serves `--version` (default: the data dir's registry pointer), measures the Progress chart's
held-out scores first (jobs/quality.py: base, ceiling and every kept version without a record; minutes on a CPU, once
per data dir), opens the page in headless Debian Chromium (Playwright), casts one vote per viewport so the reveal
shows, and saves `<tab>-<width>x<height>.png` for the Arena, Progress, Data and Admin tabs. The README shows
arena-1366x768.png and progress-1366x768.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from playwright.sync_api import Page, sync_playwright

from app import build_demo, launch_kwargs
from bench.net import free_port
from jobs.quality import QualitySettings, QualityTracker
from jobs.registry import BASE
from jobs.runtime import SHAPES_CEILING, ArenaConfig, Runtime
from ncp.serving import PairMix

ROOT = Path(__file__).resolve().parents[1]
VIEWPORTS = {"phone": (390, 844), "laptop": (1366, 768)}
TABS = ("arena", "progress", "data", "admin")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


ENABLED = "() => { const b = document.getElementById('vote-left'); return b && !b.disabled; }"
# the pair's pictures are in (the page hides a pair while its images load; ui/assets.py)
LOADED = (
    "() => { const p = document.getElementById('arena-pair'); return p && !p.classList.contains('pair-loading')"
    " && [...p.querySelectorAll('img')].every(i => i.complete); }"
)


def open_tab(page: Page, tab: str) -> None:
    if tab == "arena":
        page.wait_for_function(ENABLED)
        for _ in range(4):  # the reveal of an attention check (a deliberately broken image) is not the usual view
            page.wait_for_function(LOADED)
            page.keyboard.press("1") if page.viewport_size["width"] > 700 else page.tap("#vote-left")
            page.wait_for_selector("#arena-reveal strong")
            page.wait_for_function(ENABLED)
            page.wait_for_function(LOADED)  # the next pair's pictures, not the last pair's under the new prompt
            if "attention check" not in page.locator("#arena-reveal").inner_text():
                break
        time.sleep(1.5)  # the events chained after the vote (counter, focus) finish: no progress overlay
        page.wait_for_function(LOADED)
        return
    page.get_by_role("tab", name=tab.capitalize()).click()
    if tab == "progress":
        page.wait_for_selector("#quality-chart svg, #progress-headline p")
        page.wait_for_function("document.querySelectorAll('#before-after img').length >= 8", timeout=900_000)
        page.wait_for_function("[...document.querySelectorAll('#before-after img')].every(i => i.complete)")
    elif tab == "data":
        page.wait_for_selector("text=Rows in the store")
    time.sleep(1.0)  # the tab's own fade-in


def shoot(url: str, out: Path) -> list[Path]:
    saved = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
        try:
            for kind, (w, h) in VIEWPORTS.items():
                phone = kind == "phone"
                context = browser.new_context(viewport={"width": w, "height": h}, has_touch=phone, is_mobile=phone)
                page = context.new_page()
                page.set_default_timeout(60_000)
                page.goto(url + "?admin", wait_until="load")
                for tab in TABS:
                    open_tab(page, tab)
                    path = out / f"{tab}-{w}x{h}.png"
                    page.screenshot(path=str(path), full_page=tab != "arena")
                    saved.append(path)
                context.close()
        finally:
            browser.close()
    return saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="an app data dir (e.g. a bench.loop run's); default: a fresh one")
    p.add_argument("--version", help="serve this kept version (default: the data dir's registry pointer)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="where the PNGs go")
    p.add_argument("--no-quality", action="store_true", help="skip measuring the Progress chart's scores first")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="ncp-screens-")) / "data"
    # The pictures show the usual pair: no attention check (one pair in ten in the app, with a deliberately broken
    # image) is drawn for them.
    usual = PairMix(on_policy=0.6, cross_version=0.4, control=0.0)
    rt = Runtime(ArenaConfig(data_dir=data, schedule=False, prefetch=4, mix=usual))
    rt.start()
    tracker = None
    try:
        if args.version:
            if args.version != BASE and args.version not in rt.registry.versions():
                p.error(f"--version {args.version!r} is not kept in {data}; kept: {rt.registry.versions()}")
            rt.registry.set_current(args.version, reason="screenshots")
        rt.serve_current()
        if not args.no_quality:
            ceiling = str(SHAPES_CEILING) if SHAPES_CEILING.is_dir() else None
            settings = QualitySettings(threads=2, nice=0)
            tracker = QualityTracker(rt.registry, data, rt.config.model, ceiling, settings)
            print(f"measuring held-out quality of {tracker.pending() or 'nothing new'} ...", flush=True)
            tracker.run_pending()
        demo = build_demo(rt, quality=tracker)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs(rt))
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            for path in shoot(f"http://127.0.0.1:{port}/", args.out):
                print(path)
        finally:
            demo.close()
    finally:
        rt.stop()


if __name__ == "__main__":
    main()
