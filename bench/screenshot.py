"""Screenshot of the arena on the embedded shapes model (for the README): `python -m bench.screenshot`.

Starts the app in-process on a fresh data dir, opens it in headless Debian Chromium (Playwright), casts one vote so
the reveal shows, and saves docs/screenshots/arena-shapes.png."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from playwright.sync_api import sync_playwright

from app import build_demo, launch_kwargs
from bench.net import free_port
from jobs.runtime import ArenaConfig, Runtime

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main() -> None:
    torch.set_num_threads(1)
    rt = Runtime(ArenaConfig(data_dir=Path(tempfile.mkdtemp()) / "data", schedule=False, prefetch=4))
    rt.start()
    demo = build_demo(rt)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, **launch_kwargs(rt))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_selector("img", timeout=60_000)
            time.sleep(3)
            page.keyboard.press("1")
            time.sleep(3)
            page.screenshot(path=str(ROOT / "docs" / "screenshots" / "arena-shapes.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
        rt.stop()


if __name__ == "__main__":
    main()
