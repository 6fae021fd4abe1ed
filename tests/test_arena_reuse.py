"""A pool pair is shown to up to `ratings_per_pair` different sessions, never twice to one, never after a hot-swap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.registry import BASE
from tests.app_fixtures import make_adapter_version, tiny_runtime


@pytest.fixture
def runtime(tmp_path: Path):
    torch.set_num_threads(1)
    rt = tiny_runtime(tmp_path, prefetch=2)
    yield rt
    rt.stop()


@pytest.fixture
def strict_runtime(tmp_path: Path):
    """Overflow showings off by configuration (ArenaConfig.overflow_wait_s=None): ratings_per_pair is a hard cap."""
    torch.set_num_threads(1)
    rt = tiny_runtime(tmp_path, prefetch=1, overflow_wait_s=None)
    yield rt
    rt.stop()


def images(rt, view) -> tuple[int, int]:  # noqa: ANN001
    pair = rt.store.pair(view.pair_id)
    return pair.left_image_id, pair.right_image_id


def test_a_pair_is_rated_by_three_sessions_each_with_its_own_token(runtime) -> None:
    runtime.arena.ratings_per_pair = 3
    runtime.arena.overflow_wait_s = None  # the plain rule; overflow showings are tested below
    first = runtime.arena.next_pair("s-a")
    others = [runtime.arena.next_pair(s) for s in ("s-b", "s-c")]
    assert all(images(runtime, v) == images(runtime, first) for v in others)
    assert len({first.token, *(v.token for v in others)}) == 3
    assert images(runtime, runtime.arena.next_pair("s-d")) != images(runtime, first), "shown 3 times: used up"
    # The first session never gets the same images again.
    assert images(runtime, runtime.arena.next_pair("s-a")) != images(runtime, first)
    # Every one of the sessions can vote on its own token; all votes count.
    for view, session in zip([first, *others], ["s-a", "s-b", "s-c"], strict=True):
        rater = runtime.rater_id(session)
        runtime.arena.vote(session, view.token, "left", rater, time_to_vote_ms=3000)
    assert runtime.store.counts()["votes"] == 3


def test_a_token_is_bound_to_its_session(runtime) -> None:
    from feedback_store import VoteRejected

    runtime.arena.ratings_per_pair = 2
    first = runtime.arena.next_pair("s-a")
    second = runtime.arena.next_pair("s-b")
    assert images(runtime, second) == images(runtime, first)
    with pytest.raises(VoteRejected):
        runtime.arena.vote("s-a", second.token, "left", runtime.rater_id("s-a"), time_to_vote_ms=3000)
    assert runtime.store.counts()["votes"] == 0


def test_no_reuse_across_a_hot_swap(runtime, tmp_path: Path) -> None:
    runtime.arena.ratings_per_pair = 3
    first = runtime.arena.next_pair("s-a")
    version = make_adapter_version(runtime.registry, tmp_path, runtime.config.loop.lora_rank)
    runtime.serve(version)
    after = runtime.arena.next_pair("s-b")
    assert images(runtime, after) != images(runtime, first)
    assert runtime.store.pair(after.pair_id).left_version in (version, BASE)


def test_one_rating_per_pair_means_every_pair_is_fresh(runtime) -> None:
    runtime.arena.ratings_per_pair = 1  # no overflow showings either: the operator asked for fresh pairs only
    seen = {images(runtime, runtime.arena.next_pair(f"s-{i}")) for i in range(4)}
    assert len(seen) == 4


def test_when_no_fresh_pair_is_ready_a_pair_is_shown_beyond_its_ratings_rather_than_wait(runtime) -> None:
    """The crowd outpaces the generator (here: no generator thread, an empty queue): a pair already shown
    ratings_per_pair times goes to one more session at once, up to twice as many showings, never twice to a session;
    then a fresh pair is generated."""
    arena = runtime.arena
    arena.prefetcher.stop()
    arena.prefetcher.flush()
    arena.ratings_per_pair = 2
    first = arena.next_pair("s-a")  # generated now (no thread)
    assert images(runtime, arena.next_pair("s-b")) == images(runtime, first)  # the planned second rating
    assert arena.overflow_issued == 0
    extra = [arena.next_pair(s) for s in ("s-c", "s-d")]
    assert all(images(runtime, v) == images(runtime, first) for v in extra)
    assert arena.overflow_issued == 2
    assert images(runtime, arena.next_pair("s-e")) != images(runtime, first), "4 showings = twice 2: used up"
    assert images(runtime, arena.next_pair("s-a")) != images(runtime, first), "never twice to one session"
    for view, session in zip([first, *extra], ["s-a", "s-c", "s-d"], strict=True):
        runtime.arena.vote(session, view.token, "left", runtime.rater_id(session), time_to_vote_ms=3000)
    assert runtime.store.counts()["votes"] == 3


def test_a_fresh_pair_in_the_queue_beats_an_overflow_showing(runtime) -> None:
    arena = runtime.arena
    arena.prefetcher.stop()
    arena.prefetcher.flush()
    arena.ratings_per_pair = 2
    first = arena.next_pair("s-a")
    arena.next_pair("s-b")
    arena.prefetcher.start()  # the queue refills; the next session waits up to overflow_wait_s for a fresh pair
    arena.overflow_wait_s = 30.0
    assert images(runtime, arena.next_pair("s-c")) != images(runtime, first)
    assert arena.overflow_issued == 0


def test_with_overflow_off_a_session_waits_for_a_fresh_pair_instead_of_a_fourth_showing(strict_runtime) -> None:
    arena = strict_runtime.arena
    assert arena.overflow_wait_s is None and arena.ratings_per_pair == 3
    first = arena.next_pair("s-a")
    for session in ("s-b", "s-c"):
        assert images(strict_runtime, arena.next_pair(session)) == images(strict_runtime, first)
    # The fourth session gets new images (generated while it waits), never a fourth showing of the first pair.
    assert images(strict_runtime, arena.next_pair("s-d")) != images(strict_runtime, first)
    assert arena.overflow_issued == 0
