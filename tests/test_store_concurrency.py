"""Concurrency and durability of the vote path, on real DuckDB files: 16 threads x 500 votes lose and duplicate
nothing; racing repeats of one token resolve to one vote; a SIGKILLed writer loses no acknowledged vote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

from store_fixtures import fast_images, root

from feedback_store import FeedbackStore, PairSpec, VoteRejected

THREADS, VOTES = 16, 500


def test_16_threads_x_500_votes_none_lost_none_duplicated(tmp_path) -> None:
    store = FeedbackStore(tmp_path / "arena.duckdb")
    pid = store.add_prompt("a large red circle")
    img = fast_images(store, pid, ("base", "v1"))
    specs = [
        PairSpec(pid, img["base"], img["v1"], "cross_version", f"s_{t}") for t in range(THREADS) for _ in range(VOTES)
    ]
    issued = store.issue_pairs(specs)  # one transaction; the vote path is what runs concurrently below
    receipts: dict[int, list] = {}
    errors: list[BaseException] = []
    outcomes = ("left", "right", "tie", "both_bad")

    def rater(t: int) -> None:
        try:
            store.ensure_rater(f"r_{t}")
            mine = []
            for i, pair in enumerate(issued[t * VOTES : (t + 1) * VOTES]):
                outcome = outcomes[(t + i) % 4]
                mine.append((pair.pair_id, outcome, store.record_vote(pair.token, f"s_{t}", outcome, f"r_{t}")))
            receipts[t] = mine
        except BaseException as e:  # surfaced below: a thread's failure must fail the test
            errors.append(e)

    start = time.perf_counter()
    threads = [threading.Thread(target=rater, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    assert not errors, errors[:3]
    store.close()

    with FeedbackStore(tmp_path / "arena.duckdb") as store:  # reopened: what is on disk, not in a cache
        rows = store._cur().execute("SELECT vote_id, pair_id, rater, outcome FROM votes").fetchall()
    assert len(rows) == THREADS * VOTES
    assert len({r[0] for r in rows}) == len({r[1] for r in rows}) == THREADS * VOTES
    stored = {r[0]: r[1:] for r in rows}
    for t, mine in receipts.items():
        assert len(mine) == VOTES
        for pair_id, outcome, receipt in mine:
            assert receipt.pair_id == pair_id
            assert stored[receipt.vote_id] == (pair_id, f"r_{t}", outcome)
    print(f"{THREADS * VOTES} votes from {THREADS} threads in {elapsed:.1f}s")


def test_racing_repeats_of_one_token_make_one_vote(tmp_path) -> None:
    with FeedbackStore(tmp_path / "race.duckdb") as store:
        pid = store.add_prompt("a small blue square")
        img = fast_images(store, pid, ("base", "v1"))
        store.ensure_rater("r_x")
        for round_ in range(5):
            pair = store.issue_pair(pid, img["base"], img["v1"], "cross_version", "s_x")
            results: list = []
            barrier = threading.Barrier(8)

            def vote(outcome: str, pair=pair, results=results, barrier=barrier) -> None:
                barrier.wait()
                try:
                    results.append(store.record_vote(pair.token, "s_x", outcome, "r_x"))
                except VoteRejected as e:
                    results.append(e.reason_code)

            # even rounds: 8 identical double-clicks; odd rounds: 4 "left" against 4 "right"
            outs = ["left"] * 8 if round_ % 2 == 0 else ["left", "right"] * 4
            threads = [threading.Thread(target=vote, args=(o,)) for o in outs]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            receipts = [r for r in results if not isinstance(r, str)]
            assert len({r.vote_id for r in receipts}) == 1
            winner = receipts[0].outcome
            assert all(r == receipts[0] for r in receipts)
            refused = Counter(r for r in results if isinstance(r, str))
            assert refused == ({} if round_ % 2 == 0 else {"conflicting_vote": 4})
            assert len(receipts) == outs.count(winner)
        assert store.counts()["votes"] == 5


CHILD = """
import sys, threading
from feedback_store import FeedbackStore
store = FeedbackStore(sys.argv[1])
pid = store.add_prompt("a durable prompt")
imgs = [store.add_image(pid, f"i{v}.png", base_model="m", adapter_version=v, seed=i, scheduler="ddim", steps=1,
                        guidance=1.0, width=8, height=8, sha256=f"{i:064x}") for i, v in enumerate(("base", "v1"))]
lock = threading.Lock()
def work(t):
    store.ensure_rater(f"r_{t}")
    for i in range(100000):
        pair = store.issue_pair(pid, imgs[0], imgs[1], "cross_version", f"s_{t}")
        outcome = ("left", "right")[i % 2]
        receipt = store.record_vote(pair.token, f"s_{t}", outcome, f"r_{t}")
        with lock:  # acknowledged = record_vote returned; only then is it reported
            print(receipt.vote_id, receipt.pair_id, outcome, flush=True)
threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for th in threads: th.start()
for th in threads: th.join()
"""


def test_sigkill_mid_stream_loses_no_acknowledged_vote(tmp_path) -> None:
    db = tmp_path / "durable.duckdb"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = dict(os.environ, PYTHONPATH=str(root()))
    child = subprocess.Popen([sys.executable, str(script), str(db)], stdout=subprocess.PIPE, text=True, env=env)
    acked: list[tuple[int, int, str]] = []
    deadline = time.monotonic() + 120
    try:
        while len(acked) < 400 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            vote_id, pair_id, outcome = line.split()
            acked.append((int(vote_id), int(pair_id), outcome))
        child.send_signal(signal.SIGKILL)  # mid-stream: the child is still issuing and voting
    finally:
        child.kill()
        child.wait()
    acked += [tuple(int(x) if x.isdigit() else x for x in ln.split()) for ln in child.stdout.read().splitlines()]
    assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 400, f"child acknowledged only {len(acked)} votes before the deadline"
    with FeedbackStore(db) as store:
        stored = {r[0]: r[1:] for r in store._cur().execute("SELECT vote_id, pair_id, outcome FROM votes").fetchall()}
    missing = [a for a in acked if stored.get(a[0]) != a[1:]]
    assert not missing, f"{len(missing)} acknowledged votes lost, e.g. {missing[:3]}"
    assert len(stored) >= len(acked)  # votes committed but not yet printed when the kill landed are fine
