"""One voting client in its own process, for bench/serving.py (real clients do not share an interpreter).

    python -m bench.vote_client URL SESSION VOTES [gradio|browser]   # prints the vote round trips in ms (JSON list)

It casts VOTES + 1 (next pair, vote) rounds and times every vote after the first: a client opens its connections
and event stream on its first call, a one-off cost a browser session pays once, not per vote. `gradio` calls through
gradio_client (a new HTTP client per request, see bench/queue_client.py); `browser` through the keep-alive queue
client that speaks the protocol as the page does. Imports no torch.
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


def vote_round_trips(url: str, session: str, votes: int, client: str = "gradio") -> list[float]:
    call, ms = _caller(url, client), []
    for k in range(votes + 1):
        pair = call("next_pair", session, "")
        t0 = time.perf_counter()
        res = call("vote", session, pair["token"], "left", "")
        if k > 0:
            ms.append(1000 * (time.perf_counter() - t0))
        if "error" in res:
            raise RuntimeError(res)
    return ms


if __name__ == "__main__":
    kind = sys.argv[4] if len(sys.argv) > 4 else "gradio"
    print(json.dumps(vote_round_trips(sys.argv[1], sys.argv[2], int(sys.argv[3]), kind)))
