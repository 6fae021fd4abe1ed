"""Optional periodic push of the preference dataset to a Hugging Face dataset repo (off by default).

When `NCP_HUB_DATASET_REPO` and a token (`NCP_HUB_TOKEN`, or Spaces' `HF_TOKEN`) are both set, the app exports a
fresh snapshot (feedback_store.export: usable votes only, image bytes inline, raters as salted pseudonyms, no IP or
user agent exists to leak) every `NCP_HUB_PUSH_EVERY_S` seconds and uploads it as `snapshots/<snapshot_id>/` in one
commit. Snapshots are immutable, so a push is idempotent and researchers pin one by its folder. A push that fails
(network, permissions) is logged and recorded in `<data_dir>/hub_push.json` and retried at the next tick: it never
touches voting or training.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from feedback_store import FeedbackStore
from feedback_store.export import export_snapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubPushConfig:
    repo_id: str
    token: str
    every_s: float = 3600.0
    private: bool = True
    endpoint: str | None = None  # None: huggingface.co (HF_ENDPOINT is honoured by huggingface_hub)

    def __post_init__(self) -> None:
        if "/" not in self.repo_id or any(c.isspace() for c in self.repo_id):
            raise ValueError(f"NCP_HUB_DATASET_REPO must look like 'user/name', got {self.repo_id!r}.")
        if not self.token:
            raise ValueError("a hub push needs a token: set NCP_HUB_TOKEN (or HF_TOKEN) to a write token.")
        if self.every_s < 60:
            raise ValueError(f"NCP_HUB_PUSH_EVERY_S must be at least 60 seconds, got {self.every_s}.")


class HubPusher:
    def __init__(
        self, store: FeedbackStore, data_dir: Path, config: HubPushConfig, eval_fraction: float = 0.1
    ) -> None:
        self.store = store
        self.config = config
        self.eval_fraction = eval_fraction  # the loop's held-out share: the pushed split is the one its gate scores
        self.out_dir = Path(data_dir) / "hub_snapshots"
        self.status_file = Path(data_dir) / "hub_push.json"
        self._lock = threading.Lock()

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {"status": "never"}

    def _record(self, status: dict) -> dict:
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(status, indent=1))
        tmp.replace(self.status_file)
        return status

    def push(self) -> dict:
        """Export and upload one snapshot; returns (and records) the outcome. Never raises."""
        if not self._lock.acquire(blocking=False):
            return {"status": "skipped", "reason": "a push is already running"}
        started = time.time()
        try:
            snap = export_snapshot(self.store, self.out_dir, images=True, eval_fraction=self.eval_fraction)
            rows = int(snap.manifest["rows"]["total"])
            from huggingface_hub import HfApi

            api = HfApi(endpoint=self.config.endpoint, token=self.config.token)
            api.create_repo(self.config.repo_id, repo_type="dataset", private=self.config.private, exist_ok=True)
            api.upload_folder(
                folder_path=str(snap.path),
                repo_id=self.config.repo_id,
                repo_type="dataset",
                path_in_repo=f"snapshots/{snap.snapshot_id}",
                commit_message=f"ncp-arena snapshot {snap.snapshot_id} ({rows} votes)",
            )
            result = {"status": "pushed", "snapshot_id": snap.snapshot_id, "rows": rows}
        except Exception as err:  # noqa: BLE001 - any failure is recorded and retried at the next tick
            logger.warning("hub push to %s failed: %s", self.config.repo_id, err)
            result = {"status": "failed", "reason": f"{type(err).__name__}: {err}"[:500]}
        finally:
            self._lock.release()
        return self._record(
            {**result, "repo_id": self.config.repo_id, "at": started, "seconds": time.time() - started}
        )
