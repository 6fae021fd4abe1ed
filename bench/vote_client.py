"""One voting client in its own process, for bench/serving.py (real clients do not share an interpreter).

    python -m bench.vote_client URL SESSION VOTES      # prints the vote round trips in ms (JSON list)

It casts VOTES + 1 (next pair, vote) rounds and times every vote after the first: gradio_client opens its event
stream on its first call, a one-off cost a browser session pays once, not per vote. Imports only gradio_client.
"""

from __future__ import annotations

import json
import sys
import time

from gradio_client import Client


def vote_round_trips(url: str, session: str, votes: int) -> list[float]:
    c, ms = Client(url, verbose=False, ssl_verify=False, analytics_enabled=False), []
    for k in range(votes + 1):
        pair = c.predict(session, "", api_name="/next_pair")
        t0 = time.perf_counter()
        res = c.predict(session, pair["token"], "left", "", api_name="/vote")
        if k > 0:
            ms.append(1000 * (time.perf_counter() - t0))
        if "error" in res:
            raise RuntimeError(res)
    return ms


if __name__ == "__main__":
    print(json.dumps(vote_round_trips(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
