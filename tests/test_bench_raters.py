"""bench/raters.py: a simulated rater survives a timed-out call (a loop run once lost raters to one httpx ReadTimeout
each and ended with fewer votes than asked), and stops after MAX_FAILURES calls in a row fail."""

from __future__ import annotations

import threading

import httpx
import pytest
from PIL import Image

from bench import raters


class FlakyClient:
    """Fault injection only: the first `fail` calls raise a ReadTimeout, then it answers like the arena's API."""

    fail = 2

    def __init__(self, *args, **kwargs) -> None:
        self.calls = 0

    def predict(self, *args, api_name: str):
        self.calls += 1
        if self.calls <= self.fail:
            raise httpx.ReadTimeout("timed out")
        if api_name == "/next_pair":
            img = Image.new("RGB", (8, 8))
            return {"prompt": "a red circle", "left_image": img, "right_image": img, "token": "t"}
        return {"vote_id": self.calls, "left_version": "base", "right_version": "base"}

    def close(self) -> None:
        pass


class Rater:
    def vote(self, prompt, left, right) -> str:
        return "left"


@pytest.fixture
def flaky(monkeypatch):
    import gradio_client

    monkeypatch.setattr(gradio_client, "Client", FlakyClient)
    monkeypatch.setattr(raters, "_image", lambda value: value)
    monkeypatch.setattr(threading.Event, "wait", lambda self, timeout=None: self.is_set())  # no back-off sleep
    return FlakyClient


def test_a_rater_keeps_voting_after_a_timeout(flaky) -> None:
    stats = raters.RaterStats()
    raters._rater_loop("http://x", "s", 3, Rater(), stats, threading.Event(), 0.0)
    assert stats.votes == 3 and len(stats.errors) == 2 and stats.errors[0].startswith("ReadTimeout")


def test_a_rater_gives_up_on_a_dead_server(flaky, monkeypatch) -> None:
    monkeypatch.setattr(flaky, "fail", 10**6)
    stats = raters.RaterStats()
    raters._rater_loop("http://x", "s", 3, Rater(), stats, threading.Event(), 0.0)
    assert stats.votes == 0 and len(stats.errors) == raters.MAX_FAILURES
