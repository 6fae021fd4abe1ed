"""Simulated raters voting through the app's real HTTP API (gradio_client), judged by the shapes-world pixel judge.

    python -m bench.raters --url http://127.0.0.1:7860 --raters 8 --votes 200 [--adversarial-share 0.2]

Each rater is a thread with its own gradio_client.Client and its own session id; it asks `/next_pair`, looks at the
two images, votes with `ncp.shapes.rater.SimulatedRater` and calls `/vote`. Prints a JSON summary (votes, errors,
latency percentiles, outcome counts). `run_raters(...)` is the same as a function (used by bench/loop.py and the
end-to-end test).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)


@dataclass
class RaterStats:
    votes: int = 0
    errors: list[str] = field(default_factory=list)
    next_pair_ms: list[float] = field(default_factory=list)
    vote_ms: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    vote_ids: list[int] = field(default_factory=list)
    versions: Counter = field(default_factory=Counter)


MAX_FAILURES = 8  # consecutive failed calls (with back-off: about 2.5 min) before a rater stops


def _image(value) -> Image.Image:
    """gradio_client gives a local file path (or a dict with one) for each image of the pair."""
    path = value.get("path") if isinstance(value, dict) else value
    return Image.open(path).convert("RGB")


def _rater_loop(
    url: str, session: str, votes: int, rater, stats: RaterStats, stop: threading.Event, pace_s: float
) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False, ssl_verify=False)  # plain-http localhost: skip re-reading the CA bundle
    failures = 0  # consecutive calls that raised: a person retries a slow page, and gives up on a dead one
    while stats.votes < votes and not stop.is_set() and failures < MAX_FAILURES:
        try:
            t0 = time.perf_counter()
            pair = client.predict(session, "", api_name="/next_pair")
            stats.next_pair_ms.append(1000 * (time.perf_counter() - t0))
            if "error" in pair:
                stats.errors.append(f"next_pair: {pair}")
                continue
            left, right = _image(pair["left_image"]), _image(pair["right_image"])
            outcome = rater.vote(pair["prompt"], left, right)
            if pace_s:
                time.sleep(pace_s)
            t0 = time.perf_counter()
            res = client.predict(session, pair["token"], outcome, "", api_name="/vote")
            stats.vote_ms.append(1000 * (time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - a timeout or a dropped connection: count it, wait, go on
            failures += 1
            stats.errors.append(f"{type(e).__name__}: {e}"[:300])
            stop.wait(min(30.0, 2.0**failures))
            continue
        failures = 0
        if "error" in res:
            stats.errors.append(f"vote: {res}")
            continue
        stats.votes += 1
        stats.outcomes[outcome] += 1
        stats.vote_ids.append(int(res["vote_id"]))
        stats.versions[res["left_version"]] += 1
        stats.versions[res["right_version"]] += 1
    client.close()


def run_raters(
    url: str,
    raters: int = 8,
    votes: int = 50,
    *,
    noise: float = 0.05,
    adversarial_share: float = 0.0,
    seed: int = 0,
    pace_s: float = 0.0,
    stop: threading.Event | None = None,
) -> dict:
    """Run `raters` simulated raters casting `votes` votes each; returns a summary dict."""
    from ncp.shapes.rater import SimulatedRater

    stop = stop or threading.Event()
    n_adv = round(adversarial_share * raters)
    stats = [RaterStats() for _ in range(raters)]
    threads = []
    for i in range(raters):
        rater = SimulatedRater(noise=noise, seed=seed * 1000 + i, adversarial=i < n_adv)
        session = f"bot-{seed}-{i}{'-adv' if i < n_adv else ''}"
        t = threading.Thread(
            target=_rater_loop, args=(url, session, votes, rater, stats[i], stop, pace_s), daemon=True
        )
        t.start()
        threads.append(t)
    t0 = time.time()
    for t in threads:
        t.join()
    wall = time.time() - t0
    all_votes = [v for s in stats for v in s.vote_ids]

    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else float("nan")

    nxt = [x for s in stats for x in s.next_pair_ms]
    vts = [x for s in stats for x in s.vote_ms]
    return {
        "raters": raters,
        "adversarial_raters": n_adv,
        "votes": len(all_votes),
        "distinct_vote_ids": len(set(all_votes)),
        "vote_ids": all_votes,
        "errors": [e for s in stats for e in s.errors],
        "wall_s": wall,
        "votes_per_s": len(all_votes) / wall if wall else float("nan"),
        "next_pair_ms": {"p50": pct(nxt, 50), "p95": pct(nxt, 95), "p99": pct(nxt, 99)},
        "vote_ms": {"p50": pct(vts, 50), "p95": pct(vts, 95), "p99": pct(vts, 99)},
        "outcomes": dict(sum((s.outcomes for s in stats), Counter())),
        "versions_seen": dict(sum((s.versions for s in stats), Counter())),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the running app, e.g. http://127.0.0.1:7860")
    p.add_argument("--raters", type=int, default=8, help="concurrent simulated raters")
    p.add_argument("--votes", type=int, default=50, help="votes per rater")
    p.add_argument("--noise", type=float, default=0.05, help="logistic temperature of each rater's choice")
    p.add_argument("--adversarial-share", type=float, default=0.0, help="share of raters that invert the judge")
    p.add_argument("--pace", type=float, default=0.0, help="seconds a rater 'looks' before voting")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = run_raters(
        args.url,
        args.raters,
        args.votes,
        noise=args.noise,
        adversarial_share=args.adversarial_share,
        seed=args.seed,
        pace_s=args.pace,
    )
    summary.pop("vote_ids")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
