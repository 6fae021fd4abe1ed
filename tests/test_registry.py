"""The adapter registry: atomic publish, verified pointer, rollback history, pruning."""

import json
from pathlib import Path

import pytest

from jobs.registry import BASE, WEIGHTS, AdapterRegistry, RegistryError


def make_candidate(tmp_path: Path, name: str, payload: bytes) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(payload)
    (folder / "metrics.json").write_text(json.dumps({"loss": 0.5}))
    return folder


def test_fresh_registry_serves_base(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "adapters")
    assert reg.current() == BASE
    assert reg.versions() == []
    assert reg.next_version() == "v0001"


def test_publish_promote_rollback(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "adapters")
    v1 = reg.publish(make_candidate(tmp_path, "c1", b"one"), parent=BASE, snapshot_id="s1", metrics={"acc": 0.6})
    assert v1.version == "v0001" and v1.parent == BASE and v1.snapshot_id == "s1"
    assert reg.current() == BASE  # published is not served until promoted
    reg.set_current("v0001")
    v2 = reg.publish(make_candidate(tmp_path, "c2", b"two"), parent="v0001", snapshot_id="s2", metrics={})
    reg.set_current(v2.version)
    assert reg.current() == "v0002"
    reg.set_current("v0001", reason="rollback")
    assert reg.current() == "v0001"
    assert [h["version"] for h in reg.history()] == ["v0001", "v0002", "v0001"]
    assert reg.history()[-1]["reason"] == "rollback"


def test_incomplete_candidate_refused(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "adapters")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RegistryError, match="incomplete"):
        reg.publish(empty, parent=BASE, snapshot_id=None, metrics={})
    assert reg.versions() == []


def test_corrupt_version_is_never_served(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "adapters")
    v1 = reg.publish(make_candidate(tmp_path, "c1", b"one"), parent=BASE, snapshot_id=None, metrics={})
    reg.set_current(v1.version)
    (v1.folder / WEIGHTS).write_bytes(b"tampered")
    assert not reg.verify(v1.version)
    assert reg.current() == BASE
    with pytest.raises(RegistryError, match="sha256"):
        reg.set_current(v1.version)


def test_prune_keeps_current_and_newest(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "adapters", keep=2)
    for i in range(5):
        reg.publish(make_candidate(tmp_path, f"c{i}", bytes([i])), parent=BASE, snapshot_id=None, metrics={})
    reg.set_current("v0001")
    deleted = reg.prune()
    assert set(reg.versions()) == {"v0001", "v0004", "v0005"}
    assert set(deleted) == {"v0002", "v0003"}
