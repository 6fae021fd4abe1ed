"""Lineage of the alignment loop: adapter versions, training runs and export snapshots (DESIGN.md "lineage
everywhere": every adapter version records the snapshot it was trained on and its parent version)."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from feedback_store.records import (
    ADAPTER_STATUSES,
    BASE_VERSION,
    RUN_STATUSES,
    VERSION_RE,
    AdapterVersion,
    InputRejected,
    SnapshotRecord,
    TrainingRun,
    as_utc_naive,
    check_choice,
    check_ident,
    clean_text,
    first,
    utcnow,
)

log = logging.getLogger(__name__)

_RUN_COLS = "run_id, adapter_version, parent_version, snapshot_id, config, status, reason, metrics, started, finished"
_VERSION_COLS = "version, parent, snapshot_id, metrics, status, created"
_SNAP_COLS = "snapshot_id, parent, since_vote_id, vote_id_max, rows_train, rows_eval, path, created"


def _json(value: dict | None, what: str) -> str:
    """Metadata as JSON text. Values JSON lacks (paths, datetimes, numpy scalars) are stored as their str()."""
    if value is None:
        return "{}"
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict (e.g. dataclasses.asdict(config)), got {type(value).__name__}")
    return json.dumps(value, sort_keys=True, default=str)


def _run(row: tuple) -> TrainingRun:
    r = list(row)
    r[4], r[7] = json.loads(r[4]), json.loads(r[7])
    return TrainingRun(*r)


class LineageMixin:
    """Mixed into FeedbackStore; relies on its `_cur()` and `_write()`."""

    _cur: Any
    _write: Any

    # -- adapter versions ------------------------------------------------------------------------------------------
    def register_adapter_version(
        self,
        version: str,
        parent: str | None,
        snapshot_id: str | None,
        metrics: dict | None = None,
        status: str = "candidate",
        now: datetime | None = None,
    ) -> AdapterVersion:
        """Record a new adapter version (its folder already complete): parent version ("base" or a registered one),
        the snapshot it was trained on, its metrics and status (candidate / published / rejected / retired /
        rolled_back). "base" (no adapter) is implicit and cannot be registered."""
        check_ident(version, "version", code="invalid_version", pattern=VERSION_RE)
        if version == BASE_VERSION:
            raise InputRejected("invalid_version", '"base" means no adapter; register trained versions only')
        check_choice(status, ADAPTER_STATUSES, "status")
        blob = _json(metrics, "metrics")
        with self._write() as cur:
            if first(cur.execute("SELECT 1 FROM adapter_versions WHERE version = ?", [version])):
                raise InputRejected("duplicate_version", f"adapter version {version!r} exists; versions are immutable")
            if parent not in (None, BASE_VERSION) and not first(
                cur.execute("SELECT 1 FROM adapter_versions WHERE version = ?", [parent])
            ):
                raise InputRejected("unknown_version", f"parent {parent!r} is not registered (use 'base' or None)")
            cur.execute(
                "INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?)",
                [version, parent, snapshot_id, blob, status, as_utc_naive(now)],
            )
        return self.adapter_version(version)  # type: ignore[return-value]

    def set_adapter_status(self, version: str, status: str, metrics: dict | None = None) -> AdapterVersion:
        """Move a version through the gate (e.g. candidate -> published); metrics, if given, are merged in."""
        check_choice(status, ADAPTER_STATUSES, "status")
        current = self.adapter_version(version)
        if current is None:
            raise InputRejected("unknown_version", f"adapter version {version!r} is not registered")
        merged = _json({**current.metrics, **(metrics or {})}, "metrics")
        with self._write() as cur:
            cur.execute(
                "UPDATE adapter_versions SET status = ?, metrics = ? WHERE version = ?", [status, merged, version]
            )
        return self.adapter_version(version)  # type: ignore[return-value]

    def adapter_version(self, version: str) -> AdapterVersion | None:
        row = first(self._cur().execute(f"SELECT {_VERSION_COLS} FROM adapter_versions WHERE version = ?", [version]))
        return None if row is None else AdapterVersion(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

    def adapter_versions(self) -> list[AdapterVersion]:
        rows = (
            self._cur().execute(f"SELECT {_VERSION_COLS} FROM adapter_versions ORDER BY created, version").fetchall()
        )
        return [AdapterVersion(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    # -- training runs ---------------------------------------------------------------------------------------------
    def start_training_run(
        self,
        snapshot_id: str | None,
        parent_version: str | None,
        config: dict | None = None,
        adapter_version: str | None = None,
        now: datetime | None = None,
    ) -> int:
        """Record that a training run started (status "running"); returns run_id."""
        blob = _json(config, "config")
        with self._write() as cur:
            row = first(
                cur.execute(
                    "INSERT INTO training_runs (adapter_version, parent_version, snapshot_id, config, status, metrics, "
                    "started) VALUES (?, ?, ?, ?, 'running', '{}', ?) RETURNING run_id",
                    [adapter_version, parent_version, snapshot_id, blob, as_utc_naive(now)],
                )
            )
        return int(row[0])

    def finish_training_run(
        self,
        run_id: int,
        status: str,
        reason: str | None = None,
        metrics: dict | None = None,
        adapter_version: str | None = None,
        now: datetime | None = None,
    ) -> TrainingRun:
        """Close a running run as succeeded / failed / cancelled, saying why (a failed run leaves the served
        adapter untouched, DESIGN.md)."""
        check_choice(status, [s for s in RUN_STATUSES if s != "running"], "status")
        reason = None if reason is None else clean_text(reason, "reason", 4000)
        blob = _json(metrics, "metrics")
        with self._write() as cur:
            row = first(cur.execute("SELECT status FROM training_runs WHERE run_id = ?", [run_id]))
            if row is None:
                raise InputRejected("unknown_run", f"training run {run_id} does not exist")
            if row[0] != "running":
                raise InputRejected("run_finished", f"training run {run_id} already finished as {row[0]!r}")
            cur.execute(
                "UPDATE training_runs SET status = ?, reason = ?, metrics = ?, finished = ?, "
                "adapter_version = coalesce(?, adapter_version) WHERE run_id = ?",
                [status, reason, blob, as_utc_naive(now), adapter_version, run_id],
            )
        return self.training_run(run_id)  # type: ignore[return-value]

    def mark_running_runs_failed(self, reason: str) -> int:
        """At app start: runs still "running" died with the previous process. Mark them failed; returns how many."""
        reason = clean_text(reason, "reason", 4000)
        with self._write() as cur:
            n = first(cur.execute("SELECT count(*) FROM training_runs WHERE status = 'running'"))[0]
            cur.execute(
                "UPDATE training_runs SET status = 'failed', reason = ?, finished = ? WHERE status = 'running'",
                [reason, utcnow()],
            )
        if n:
            log.warning("marked %d interrupted training run(s) failed: %s", n, reason)
        return int(n)

    def training_run(self, run_id: int) -> TrainingRun | None:
        row = first(self._cur().execute(f"SELECT {_RUN_COLS} FROM training_runs WHERE run_id = ?", [run_id]))
        return None if row is None else _run(row)

    def training_runs(self, limit: int = 100) -> list[TrainingRun]:
        """The most recent runs, newest first."""
        rows = (
            self._cur()
            .execute(f"SELECT {_RUN_COLS} FROM training_runs ORDER BY run_id DESC LIMIT ?", [int(limit)])
            .fetchall()
        )
        return [_run(r) for r in rows]

    # -- export snapshots ------------------------------------------------------------------------------------------
    def record_snapshot(self, snap: SnapshotRecord) -> None:
        """Called by export.export_snapshot once a snapshot folder is complete."""
        with self._write() as cur:
            cur.execute(
                f"INSERT INTO snapshots ({_SNAP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [snap.snapshot_id, snap.parent, snap.since_vote_id, snap.vote_id_max, snap.rows_train]
                + [snap.rows_eval, snap.path, snap.created],
            )

    def snapshots(self) -> list[SnapshotRecord]:
        rows = self._cur().execute(f"SELECT {_SNAP_COLS} FROM snapshots ORDER BY created, snapshot_id").fetchall()
        return [SnapshotRecord(*r) for r in rows]

    def snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        row = first(self._cur().execute(f"SELECT {_SNAP_COLS} FROM snapshots WHERE snapshot_id = ?", [snapshot_id]))
        return SnapshotRecord(*row) if row else None
