"""What the Arena says, as text: user text escaped everywhere it appears, attention checks explained, the counter,
the vocabulary beside the prompt box, and signed browser ids (one rater across reloads, forged ids refused)."""

from __future__ import annotations

from jobs import views
from jobs.prompts import MAX_PROMPT_CHARS
from ui import arena
from ui.common import text_html


def test_user_text_is_escaped_everywhere() -> None:
    prompt = '<img src=x onerror="alert(1)"> **bold** & co'
    html = arena.pair_html(prompt, "/data/images/ab.png", "/data/images/cd.png")
    assert "<img src=x" not in html and "**bold**" in html  # markdown is not rendered either: it is plain HTML text
    assert 'alt="left image: &lt;img src=x onerror=&quot;alert(1)&quot;&gt; **bold** &amp; co"' in html
    assert 'src="gradio_api/file=images/ab.png"' in html and "/data/" not in html  # no server path
    assert text_html("⚠️ <b>no</b>", role="alert") == '<p role="alert">⚠️ &lt;b&gt;no&lt;/b&gt;</p>'
    assert text_html("") == ""


def test_attention_checks_say_why() -> None:
    assert "spotted it" in arena.control_text(True, "right")
    missed = arena.control_text(False, "right")
    assert "the right image was deliberately broken" in missed and "“Left is better” was the answer" in missed
    assert "does not pass" in missed
    assert arena.control_text(False, None) == "This was an attention check (missed)."


def test_counter_and_vocabulary() -> None:
    assert arena.counter_html({"today": 12, "passed": 3}) == "<p>12 votes today · 3 attention checks passed</p>"
    assert arena.counter_html({"today": 1, "passed": 1}) == "<p>1 vote today · 1 attention check passed</p>"
    words = arena.vocabulary_text(True)
    for w in ("small", "large", "purple", "triangle", "on the left", "left of", "gray"):
        assert w in words
    assert str(MAX_PROMPT_CHARS) in arena.vocabulary_text(False)


def test_browser_ids_are_signed() -> None:
    secret = "test-salt-0123456789abcdef"
    made = views.new_browser_id(secret)
    raw = views.check_browser_id(made, secret)
    assert raw and made.startswith(raw + ".")
    assert views.check_browser_id(made, "another-secret") is None
    assert views.check_browser_id(raw + ".0000", secret) is None
    for bad in (None, 3, "", "a.b.c", "x" * 200):
        assert views.check_browser_id(bad, secret) is None
    assert views.new_browser_id(secret) != made
