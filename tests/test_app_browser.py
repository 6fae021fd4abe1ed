"""A real browser on the real app: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) at a phone
(390x844, touch) and a laptop (1366x768, mouse and keyboard) viewport votes by tap, click and key, and checks what a
rater sees: both images and the four outcomes on screen without scrolling, the reveal beside them, focus back on the
vote row, key hints only where there is a fine pointer, the same rater after a reload, typed markup shown as text, and
no console errors. The votes land in the store with full image lineage. Progress, Data and Admin follow.

    apt-get install -y chromium      # never `playwright install` (no network for it)
    python -m pytest -q -m browser tests/test_app_browser.py
"""

from __future__ import annotations

import hashlib
import re
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
TIMEOUT_MS = 60_000
VIEWPORTS = {"phone": (390, 844), "laptop": (1366, 768)}
expect.set_options(timeout=TIMEOUT_MS)  # a loaded 2-core machine answers slowly; the default is 5 s
LOADED = "[...document.querySelectorAll('#arena-pair img')].every(i => i.complete)"
ENABLED = "() => { const b = document.getElementById('vote-left'); return b && !b.disabled; }"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("app_browser")
    runtime = tiny_runtime(tmp, steps=2, size=64, prefetch=4, serve_adapter=True)
    version = runtime.registry.current()
    # A few cross-version votes by other raters, so the Progress tab has a leaderboard and a win rate to show.
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
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _page(browser, kind: str) -> tuple[Page, list[str], list[str]]:
    """A fresh context (its own storage) at the viewport; console errors and requested URLs are collected."""
    w, h = VIEWPORTS[kind]
    phone = kind == "phone"
    context = browser.new_context(viewport={"width": w, "height": h}, has_touch=phone, is_mobile=phone)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    return page, errors, requests


def _left_src(page: Page) -> str:
    return page.locator("#arena-left img").get_attribute("src") or ""


def _wait_next_pair(page: Page, old_src: str, loaded: bool = True) -> None:
    """The next pair is in and votable: its src swapped, the buttons enabled and (`loaded`) its images loaded, since a
    click or key on a pair still loading is ignored by design (test_a_vote_waits_for_the_next_pairs_images)."""
    page.wait_for_function(
        "old => { const i = document.querySelector('#arena-left img'); return i && i.src && i.src !== old; }",
        arg=old_src,
    )
    page.wait_for_function(ENABLED)
    if loaded:
        page.wait_for_function(LOADED)


def _in_viewport(page: Page, selector: str) -> None:
    box = page.locator(selector).bounding_box()
    w, h = page.viewport_size["width"], page.viewport_size["height"]
    assert box is not None, selector
    inside = box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= w and box["y"] + box["height"] <= h
    assert inside, f"{selector} at {box} is not inside the {w}x{h} viewport"


def _on_screen(page: Page) -> None:
    page.wait_for_function("[...document.querySelectorAll('#arena-pair img')].every(i => i.complete)")
    for sel in ("#arena-left img", "#arena-right img", *(f"#vote-{o}" for o in app.OUTCOMES)):
        _in_viewport(page, sel)


def _focused(page: Page) -> str:
    page.wait_for_function("() => (document.activeElement || {}).id && document.activeElement.id.startsWith('vote-')")
    return page.evaluate("document.activeElement.id")


def _browser_votes(runtime) -> list:
    return sorted((v for v in runtime.store.votes() if v.session != "seed-session"), key=lambda v: v.vote_id)


@pytest.mark.parametrize("kind", list(VIEWPORTS))
def test_vote_on_screen_by_touch_click_and_key(served, browser, kind: str) -> None:
    runtime, url, version = served
    before = len(_browser_votes(runtime))
    page, errors, _ = _page(browser, kind)
    page.goto(url, wait_until="load")
    page.wait_for_selector("#arena-left img")
    page.wait_for_function(ENABLED)
    _on_screen(page)
    prompt = page.locator("#arena-prompt").inner_text()
    assert prompt and page.locator("#arena-left img").get_attribute("alt") == f"left image: {prompt}"
    assert page.locator("#arena-right img").get_attribute("alt") == f"right image: {prompt}"
    expect(page.locator("#my-counter")).to_contain_text("0 votes today")
    # key hints only with a fine pointer; the how-to line says "tap" on a touch screen
    hint = page.evaluate("getComputedStyle(document.getElementById('vote-left'), '::after').content")
    assert (hint == "none") == (kind == "phone"), hint
    expect(page.locator("#how-to .touch-only")).to_be_visible() if kind == "phone" else expect(
        page.locator("#how-to .kbd-only")
    ).to_be_visible()
    assert page.locator("#arena-reveal").get_attribute("aria-live") == "polite"

    src = _left_src(page)
    page.tap("#vote-left") if kind == "phone" else page.click("#vote-left")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Left is better")
    expect(page.locator("#arena-reveal")).to_contain_text("Left: ")
    _in_viewport(page, "#arena-reveal")
    _wait_next_pair(page, src)
    assert _focused(page) == "vote-left"
    _on_screen(page)  # the next pair scrolled into place
    expect(page.locator("#my-counter")).to_contain_text("1 vote today")

    src = _left_src(page)
    page.keyboard.press("2")  # focus is on the vote row, which is not a text field: the key votes
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Right is better")
    _in_viewport(page, "#arena-reveal")
    _wait_next_pair(page, src)
    assert _focused(page) == "vote-right"

    # a reload is the same rater (the browser keeps its signed id), in a new session
    page.reload(wait_until="load")
    page.wait_for_function(ENABLED)
    # keys vote once the page script is in and the pair's images have loaded (a key before that is ignored, by design:
    # test_a_vote_waits_for_the_next_pairs_images); on a busy machine both can come after the buttons are enabled
    page.wait_for_function("() => window.__ncpArena === true")
    page.wait_for_function(LOADED)
    expect(page.locator("#my-counter")).to_contain_text("2 votes today")
    src = _left_src(page)
    page.keyboard.press("3")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Tie")
    _wait_next_pair(page, src)

    votes = _browser_votes(runtime)[before:]
    assert [v.outcome for v in votes] == ["left", "right", "tie"]
    assert len({v.rater for v in votes}) == 1 and len({v.session for v in votes}) == 2
    for v in votes:
        assert v.time_to_vote_ms is not None and v.time_to_vote_ms > 0
        pair = runtime.store.pair(v.pair_id)
        for image_id in (pair.left_image_id, pair.right_image_id):
            img = runtime.store.image(image_id)
            data = (Path(runtime.config.data_dir) / img.path).read_bytes()
            assert img.sha256 == hashlib.sha256(data).hexdigest()
            assert img.adapter_version.split("+")[0] in ("base", version)
            assert (img.steps, img.scheduler, img.base_model) == (2, "DDIMScheduler", runtime.config.model)
    assert not errors, errors
    page.context.close()


def test_a_vote_waits_for_the_next_pairs_images(served, browser) -> None:
    """The next pair swaps the images' src in place; until the new pictures load the pair is hidden and neither a
    click nor a key votes (the browser would otherwise show the last pair's images under the new prompt)."""
    runtime, url, _ = served
    page, errors, _ = _page(browser, "laptop")
    held, holding = [], [False]
    page.route("**/gradio_api/file=images/**", lambda r: held.append(r) if holding[0] else r.continue_())
    page.goto(url, wait_until="load")
    page.wait_for_function(ENABLED)
    page.wait_for_function(LOADED)
    before = len(_browser_votes(runtime))
    holding[0] = True  # the next pair's images stay in flight
    src = _left_src(page)
    page.click("#vote-left")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Left is better")
    _wait_next_pair(page, src, loaded=False)
    expect(page.locator("#arena-pair")).to_have_class(re.compile(r"\bpair-loading\b"))
    assert page.locator("#arena-left img").evaluate("i => getComputedStyle(i).visibility") == "hidden"
    page.click("#vote-right")
    page.keyboard.press("2")
    page.wait_for_timeout(1500)
    assert len(_browser_votes(runtime)) == before + 1, "a vote went through before its images were shown"
    holding[0] = False
    assert held, "the next pair's image requests were not seen"
    for route in held:
        route.continue_()
    page.wait_for_function(LOADED)
    expect(page.locator("#arena-pair")).not_to_have_class(re.compile(r"\bpair-loading\b"))
    page.click("#vote-right")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Right is better")
    votes = _browser_votes(runtime)[before:]
    assert [v.outcome for v in votes] == ["left", "right"]
    assert not errors, errors
    page.context.close()


def test_typed_markup_is_text_and_reasons_and_double_click(served, browser) -> None:
    runtime, url, _ = served
    page, errors, requests = _page(browser, "laptop")
    page.goto(url, wait_until="load")
    page.wait_for_function(ENABLED)
    presses = 0  # the vote row comes right after the tabs and the images in the tab order
    while page.evaluate("(document.activeElement || {}).id") != "vote-left" and presses < 12:
        page.keyboard.press("Tab")
        presses += 1
    assert presses <= 8, f"{presses} Tab presses to reach 'Left is better'"
    box = page.get_by_label("Your own prompt (optional)")
    assert box.get_attribute("maxlength") == "300"  # the server's limit (jobs.prompts.MAX_PROMPT_CHARS)
    expect(page.locator("#vocabulary")).to_contain_text("300 characters")

    runtime.blocklist.write("dragon\n")
    markup = "<img src=x onerror=window.__hit=1> **bold** dragon"
    box.fill(markup)
    box.press("Enter")  # refused: the message is text, and nothing of the prompt became an element
    expect(page.locator("#arena-status")).to_contain_text("not allowed")
    assert page.locator("#arena-status img, #arena-status strong").count() == 0

    box.fill("<img src=y onerror=window.__hit=1> **bold** cat")
    src = _left_src(page)
    page.click("text=Generate")  # accepted: the pair's prompt and alt texts carry it, as text
    _wait_next_pair(page, src)
    expect(page.locator("#arena-prompt")).to_have_text("<img src=y onerror=window.__hit=1> **bold** cat")
    assert page.locator("#arena-pair img").count() == 2 and page.locator("#arena-pair strong").count() == 0
    assert page.evaluate("window.__hit") is None
    assert not [u for u in requests if u.rstrip("/").endswith(("/x", "/y"))], requests

    # a reason chip, then the T shortcut (a checkbox is not typing); keys typed into the prompt box are text
    page.get_by_text("Why? (optional, before you vote)").click()
    page.get_by_label("artifacts").check()
    src = _left_src(page)
    page.keyboard.press("t")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Tie")
    _wait_next_pair(page, src)
    n = len(_browser_votes(runtime))
    box.fill("")
    box.type("1 2 a")
    assert len(_browser_votes(runtime)) == n and _browser_votes(runtime)[-1].reasons == ("artifacts",)

    # a double click casts one vote (the buttons are disabled once voted)
    src = _left_src(page)
    page.dblclick("#vote-both_bad")
    expect(page.locator("#arena-reveal")).to_contain_text("You chose: Both are bad")
    _wait_next_pair(page, src)
    assert len(_browser_votes(runtime)) == n + 1
    assert not errors, errors
    page.context.close()


def test_progress_data_and_admin(served, browser, tmp_path: Path) -> None:
    runtime, url, version = served
    page, errors, _ = _page(browser, "laptop")
    page.goto(url, wait_until="load")
    expect(page.get_by_role("tab", name="Admin")).to_have_count(0)  # hidden from raters
    page.get_by_role("tab", name="Progress").click()
    # any model: the served version's win rate against the base from raters, as a chart with a title
    expect(page.locator("#progress-headline")).to_contain_text(f"{version} wins")
    expect(page.locator("#quality-chart svg #qc-t")).to_have_text("Win rate against the base over votes")
    expect(page.locator("#board-note")).to_contain_text("only cross-version votes")
    expect(page.get_by_role("gridcell", name=f"{version} (serving)")).to_be_visible()
    expect(page.locator("#round-status")).to_contain_text(f"Serving {version}")
    expect(page.locator("#round-events")).to_contain_text("No training round yet")
    # before/after: base and the served version, same prompts and seed, side by side, with alt text
    page.wait_for_function(  # generated once per version (views.probe_gallery): slow on a busy 2-core machine
        f"document.querySelectorAll('#before-after img').length >= {2 * views.PROBE_COUNT}", timeout=5 * TIMEOUT_MS
    )
    first = views.probe_prompts(runtime)[0]
    expect(page.locator("#before-after img").first).to_have_attribute("alt", f"before (base): {first}")
    expect(page.locator("#before-after img").nth(1)).to_have_attribute("alt", f"after ({version}): {first}")
    assert page.screenshot(path=str(tmp_path / "progress.png"), full_page=True).startswith(b"\x89PNG")
    assert page.get_by_role("button", name="Share").count() == 0  # no Share buttons off Spaces

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

    assert not errors, errors
    # Admin in a page of its own: navigating this one away would abort its open event stream and polls, and
    # the browser reports those aborts as console errors that say nothing about the app.
    page.context.close()
    page, errors, _ = _page(browser, "laptop")
    page.goto(url + "?admin", wait_until="load")  # shown on request; every action is still checked on the server
    page.get_by_role("tab", name="Admin").click()
    page.get_by_label("Admin token").fill("not-the-token")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#admin-out")).to_contain_text("credentials are missing or wrong")
    assert runtime.scheduler.paused
    assert not errors, errors
    page.context.close()
