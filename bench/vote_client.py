"""One voting client in its own process, for bench/serving.py (real clients do not share an interpreter).

    python -m bench.vote_client URL SESSION VOTES [gradio|browser] [PACE_S]   # prints the round trips (ms, JSON)

It casts VOTES + 1 (next pair, vote) rounds and times every next pair and vote after the first: a client opens its connections
and event stream on its first call, a one-off cost a browser session pays once, not per vote. After that first
vote it prints `ready` and waits for a line on stdin, so the parent starts the timed votes of all clients together
(otherwise the first clients are timed while the others still import gradio_client on the same cores). `gradio` calls through
gradio_client (a new HTTP client per request, see bench/queue_client.py); `browser` through the keep-alive queue
client that speaks the protocol as the page does. PACE_S: seconds the rater looks at each pair before voting (0: at
machine speed, a stress test; a person takes seconds, and the defences flag votes under NCP_MIN_VOTE_MS, 1.5 s).
Imports no torch.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

CLIENTS = ("gradio", "browser")


def _caller(url: str, client: str) -> Callable[..., Any]:
    if client == "gradio":
        from gradio_client import Client

        c = Client(url, verbose=False, ssl_verify=False, analytics_enabled=False)
        return lambda api, *data: c.predict(*data, api_name=f"/{api}")
    if client == "browser":
        from bench.queue_client import QueueClient

        return QueueClient(url).call
    raise ValueError(f"client must be one of {CLIENTS}, got {client!r}")


def round_trips(
    url: str, session: str, votes: int, client: str = "gradio", pace_s: float = 0.0, ready: Callable | None = None
) -> dict[str, list[float]]:
    """{"next_pair": ms, "vote": ms}, a rater's rounds as the page makes them: the next pair right after each vote.
    `ready()`, if given, is called after the first (untimed) round and returns when all clients may go on: the start
    barrier, so no client is timed while others still import and connect."""
    call, ms = _caller(url, client), {"next_pair": [], "vote": []}
    for k in range(votes + 1):
        if k == 1 and ready is not None:
            ready()
        t0 = time.perf_counter()
        pair = call("next_pair", session, "")
        t1 = time.perf_counter()
        if "error" in pair:
            raise RuntimeError(pair)
        time.sleep(pace_s)
        t2 = time.perf_counter()
        res = call("vote", session, pair["token"], "left", "")
        if k > 0:
            ms["next_pair"].append(1000 * (t1 - t0))
            ms["vote"].append(1000 * (time.perf_counter() - t2))
        if "error" in res:
            raise RuntimeError(res)
    return ms


def _barrier() -> None:
    """Tell the parent (bench/serving.py) this client is warm, then wait for its go line on stdin."""
    print("ready", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    kind = sys.argv[4] if len(sys.argv) > 4 else "gradio"
    pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    print(json.dumps(round_trips(sys.argv[1], sys.argv[2], int(sys.argv[3]), kind, pace, _barrier)))
