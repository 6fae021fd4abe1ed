"""A keep-alive client of Gradio's queue protocol, as a browser speaks it, for bench/serving.py.

    client = QueueClient("http://127.0.0.1:7860/")
    pair = client.call("next_pair", session, "")
    result = client.call("vote", session, pair["token"], "left", "")

Why not only gradio_client: its reader thread hands the result over through a queue that the calling thread polls
every 50 ms (`gradio_client.utils.stream_sse_v1plus`, `time.sleep(0.05)`), which adds ~25 ms to every call on average,
and it sends each request with a module-level `httpx.post` (a new client per request). Its round trips measure that
client more than the server. This client does what the page does: POST
`/gradio_api/queue/join` on one reused connection, then read the event stream `/gradio_api/queue/data` until this
event's `process_completed`. Same endpoints, same queue, same handlers as gradio_client; no server shortcut.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import httpx


class QueueError(RuntimeError):
    """The server refused the call or reported the handler's failure."""


class QueueClient:
    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.base = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout, trust_env=False)  # reused: no per-call client or TLS set-up
        self.session_hash = secrets.token_hex(6)
        config = self.http.get(f"{self.base}/config").raise_for_status().json()
        self.api_prefix = config.get("api_prefix", "/gradio_api")
        self.fn_index = {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}

    def call(self, api_name: str, *data: Any) -> Any:
        """Run one endpoint through the queue and return its single output (the value gradio_client returns)."""
        if api_name not in self.fn_index:
            raise QueueError(f"No endpoint {api_name!r}; the server has {sorted(self.fn_index)}.")
        join = self.http.post(
            f"{self.base}{self.api_prefix}/queue/join",
            json={
                "data": list(data),
                "fn_index": self.fn_index[api_name],
                "session_hash": self.session_hash,
                "event_data": None,
                "trigger_id": None,
            },  # fmt: skip
        )
        if join.status_code != 200:
            raise QueueError(f"queue/join answered {join.status_code}: {join.text[:200]}")
        event_id = join.json()["event_id"]
        with self.http.stream(
            "GET", f"{self.base}{self.api_prefix}/queue/data", params={"session_hash": self.session_hash}
        ) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") != event_id or msg.get("msg") != "process_completed":
                    continue
                if not msg.get("success", False):
                    raise QueueError(f"{api_name} failed: {msg.get('output', {}).get('error')}")
                return msg["output"]["data"][0]
        raise QueueError(f"the event stream closed before {api_name} completed")

    def close(self) -> None:
        self.http.close()
