"""The adapter registry on disk: `adapters/<version>/` folders and a pointer file replaced atomically.

A version folder holds a diffusers-format LoRA (`pytorch_lora_weights.safetensors`, with adapter metadata) and
`lineage.json` (parent version, snapshot it was trained on, metrics, sha256 of the weights). A version enters the
registry by an atomic rename of a complete staging folder, and the pointer `CURRENT.json` by write-temp + `os.replace`,
so a half-written version is never served and a crash at any point leaves the previous pointer intact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BASE = "base"
WEIGHTS = "pytorch_lora_weights.safetensors"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says why and nothing was changed."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    folder: Path
    parent: str
    snapshot_id: str | None
    weights_sha256: str
    metrics: dict
    created: float


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_json(path: Path, obj: dict) -> None:
    # Unique per process AND thread: two threads promoting at once (a round and an admin) must not rename each
    # other's temp file away (seen as FileNotFoundError in tests/test_runtime_swaps.py's interleaved promotions).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AdapterRegistry:
    def __init__(self, root: Path, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}.")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.pointer = self.root / "CURRENT.json"

    # -- reading ------------------------------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))

    def info(self, version: str) -> VersionInfo:
        folder = self.root / version
        meta_path = folder / "lineage.json"
        if not meta_path.exists():
            raise RegistryError(f"Version {version!r} is not in the registry at {self.root}.")
        meta = json.loads(meta_path.read_text())
        return VersionInfo(
            version=version,
            folder=folder,
            parent=meta.get("parent", BASE),
            snapshot_id=meta.get("snapshot_id"),
            weights_sha256=meta["weights_sha256"],
            metrics=meta.get("metrics", {}),
            created=meta.get("created", 0.0),
        )

    def current(self) -> str:
        """The version to serve ("base" when none was promoted or the pointed-to version is missing or corrupt)."""
        if not self.pointer.exists():
            return BASE
        version = json.loads(self.pointer.read_text()).get("version", BASE)
        if version != BASE and not self.verify(version):
            logger.error("registry pointer names %s but it fails verification; serving base", version)
            return BASE
        return version

    def history(self) -> list[dict]:
        """Every pointer change, oldest first (promotions and rollbacks)."""
        path = self.root / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def verify(self, version: str) -> bool:
        """True when the version's weights exist and match the sha256 recorded at publish time."""
        try:
            info = self.info(version)
            return file_sha256(info.folder / WEIGHTS) == info.weights_sha256
        except (RegistryError, OSError, KeyError, json.JSONDecodeError):
            return False

    def next_version(self) -> str:
        existing = [int(v[1:]) for v in self.versions()]
        staged = [int(m.group(1)) for p in self.root.glob(".staging-v*") if (m := re.search(r"v(\d+)", p.name))]
        return f"v{max(existing + staged + [0]) + 1:04d}"

    # -- writing ------------------------------------------------------------------------------------------------------
    def publish(self, candidate: Path, *, parent: str, snapshot_id: str | None, metrics: dict) -> VersionInfo:
        """Copy a finished adapter folder into the registry as the next version (not yet served)."""
        candidate = Path(candidate)
        if not (candidate / WEIGHTS).exists():
            raise RegistryError(f"{candidate} has no {WEIGHTS}; refusing to publish an incomplete adapter.")
        version = self.next_version()
        staging = self.root / f".staging-{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(candidate, staging)
        lineage = {
            "version": version,
            "parent": parent,
            "snapshot_id": snapshot_id,
            "metrics": metrics,
            "weights_sha256": file_sha256(staging / WEIGHTS),
            "created": time.time(),
        }
        _atomic_write_json(staging / "lineage.json", lineage)
        os.replace(staging, self.root / version)  # atomic: the version appears complete or not at all
        logger.info("published %s (parent %s, snapshot %s)", version, parent, snapshot_id)
        return self.info(version)

    def set_current(self, version: str, reason: str = "promote") -> None:
        if version != BASE and not self.verify(version):
            raise RegistryError(f"Cannot serve {version!r}: missing or its weights fail the sha256 check.")
        _atomic_write_json(self.pointer, {"version": version, "updated": time.time(), "reason": reason})
        with open(self.root / "history.jsonl", "a") as f:
            f.write(json.dumps({"version": version, "time": time.time(), "reason": reason}) + "\n")

    def prune(self) -> list[str]:
        """Delete all but the newest `keep` versions, never the current one or its parent; returns deleted names."""
        current = self.current()
        protect = {current}
        if current != BASE:
            protect.add(self.info(current).parent)
        versions = self.versions()
        deleted = [v for v in versions[: max(0, len(versions) - self.keep)] if v not in protect]
        for v in deleted:
            shutil.rmtree(self.root / v, ignore_errors=True)
        for stale in self.root.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return deleted
