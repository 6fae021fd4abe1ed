"""A real browser on the real app: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) votes by mouse
and by keyboard, sees the reveal and the next pair, and the votes land in the store with full image lineage.
Screenshots of both tabs go to the test's temporary folder (the README's come from bench/screenshot.py).

    apt-get install -y chromium      # never `playwright install` (no network for it)
    python -m pytest -q -m browser tests/test_app_browser.py
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from app_fixtures import free_port, tiny_runtime
from playwright.sync_api import Page, expect, sync_playwright

import app
from jobs import views
from ncp.serving import PairMix

pytestmark = pytest.mark.browser
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("app_browser")
    runtime = tiny_runtime(tmp, steps=2, size=64, prefetch=4, serve_adapter=True)
    version = runtime.registry.current()
    # A few cross-version votes by other raters, so the Progress tab has a leaderboard and a history to show.
    mix, runtime.arena.prefetcher.mix = runtime.arena.prefetcher.mix, PairMix(0.0, 1.0, 0.0)
    for i in range(16):
        pair = runtime.arena.next_pair("seed-session")
        stored = runtime.store.pair(pair.pair_id)
        outcome = "left" if (stored.left_version == version) != (i % 4 == 3) else "right"
        runtime.arena.vote("seed-session", pair.token, outcome, runtime.rater_id(f"seed-{i % 4}"))
    runtime.arena.prefetcher.mix = mix
    demo = app.build_demo(runtime)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_kwargs(runtime)
    )
    try:
        yield runtime, f"http://127.0.0.1:{port}/", version
    finally:
        demo.close()
        runtime.stop()


@pytest.fixture(scope="module")
def page(served):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(TIMEOUT_MS)
        try:
            yield pg
        finally:
            browser.close()


def _left_src(page: Page) -> str:
    return page.locator("#arena-left img").get_attribute("src") or ""


def _wait_next_pair(page: Page, old_src: str) -> None:
    page.wait_for_function(
        "old => { const i = document.querySelector('#arena-left img'); return i && i.src && i.src !== old; }",
        arg=old_src,
    )
    expect(page.locator("#vote-left")).to_be_enabled()


def _browser_votes(runtime) -> list:
    return [v for v in runtime.store.votes() if v.session != "seed-session"]


def test_vote_by_mouse_and_keyboard_with_reveal_and_lineage(served, page: Page, tmp_path: Path) -> None:
    runtime, url, version = served
    page.goto(url)
    page.wait_for_selector("#arena-left img")
    expect(page.locator("#vote-left")).to_be_enabled()
    assert page.locator("#arena-prompt textarea, #arena-prompt input").first.input_value()

    src = _left_src(page)
    page.click("#vote-left")  # by mouse
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Left is better")
    expect(page.locator("#arena-reveal")).to_contain_text("Left was made by")
    _wait_next_pair(page, src)

    src = _left_src(page)
    page.locator("h1").first.click()  # focus outside any text field
    page.keyboard.press("2")  # by keyboard
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Right is better")
    _wait_next_pair(page, src)

    src = _left_src(page)
    page.get_by_label("artifacts").check()  # a reason chip, then the T shortcut (a checkbox is not typing)
    page.keyboard.press("t")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Tie")
    _wait_next_pair(page, src)
    assert page.screenshot(path=str(tmp_path / "arena.png"), full_page=True).startswith(b"\x89PNG")

    # keys typed into the prompt box are text, not votes; a refused prompt shows why
    runtime.blocklist.write("dragon\n")
    box = page.get_by_label("Your own prompt (optional)")
    box.click()
    box.type("1 2 a dragon")
    box.press("Enter")
    expect(page.locator("#arena-status")).to_contain_text("not allowed")
    assert len(_browser_votes(runtime)) == 3

    # a double click casts one vote (the buttons are disabled once voted)
    src = _left_src(page)
    page.dblclick("#vote-both_bad")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Both are bad")
    _wait_next_pair(page, src)

    votes = sorted(_browser_votes(runtime), key=lambda v: v.vote_id)
    assert [v.outcome for v in votes] == ["left", "right", "tie", "both_bad"]
    assert votes[2].reasons == ("artifacts",)
    assert len({v.pair_id for v in votes}) == 4 and len({v.session for v in votes}) == 1
    for v in votes:
        assert v.time_to_vote_ms is not None and v.time_to_vote_ms > 0
        pair = runtime.store.pair(v.pair_id)
        for image_id in (pair.left_image_id, pair.right_image_id):
            img = runtime.store.image(image_id)
            data = (Path(runtime.config.data_dir) / img.path).read_bytes()
            assert img.sha256 == hashlib.sha256(data).hexdigest()
            assert img.adapter_version.split("+")[0] in ("base", version)
            assert (img.steps, img.scheduler, img.base_model) == (2, "DDIMScheduler", runtime.config.model)
            assert isinstance(img.seed, int) and (img.width, img.height) == (64, 64)


def test_progress_tab_and_admin_refusal(served, page: Page, tmp_path: Path) -> None:
    runtime, url, version = served
    page.goto(url)
    page.get_by_role("tab", name="Progress").click()
    expect(page.get_by_role("gridcell", name=f"{version} (serving)")).to_be_visible()
    expect(page.locator("#round-status")).to_contain_text(f"Serving: {version}")
    page.wait_for_function("document.querySelectorAll('#probe-gallery img').length >= 8")  # fixed-seed probes
    expect(page.locator("#probe-gallery")).to_contain_text(views.probe_prompts(runtime)[0][:20])
    assert page.screenshot(path=str(tmp_path / "progress.png"), full_page=True).startswith(b"\x89PNG")
    assert len(list((Path(runtime.config.data_dir) / "probes" / "base").glob("*.png"))) == views.PROBE_COUNT

    page.get_by_role("tab", name="Data").click()
    for _ in range(2):  # the second click within 10 s reuses the snapshot: a public button cannot fill the disk
        page.click("#export")
        expect(page.locator("#export-file")).to_contain_text(".zip")
        expect(page.locator("#export-info")).to_contain_text(" UTC: ")  # the snapshot's time and row count
        expect(page.locator("#export-info")).to_contain_text(" rows (")
    assert len(runtime.store.snapshots()) == 1
    with zipfile.ZipFile(next(views.export_dir(runtime).glob("*.zip"))) as z:
        names = z.namelist()
    assert {"manifest.json", "train.parquet"} <= {Path(n).name for n in names}

    page.get_by_role("tab", name="Admin").click()
    page.get_by_label("Admin token").fill("not-the-token")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#admin-out")).to_contain_text("credentials are missing or wrong")
    assert runtime.scheduler.paused
