"""The researchers' export: immutable Pick-a-Pic v2 compatible snapshots that datasets, pandas and duckdb read,
with lineage, a prompt-disjoint split, a verifiable manifest, incremental exports and honoured deletions."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading

import duckdb
import pandas as pd
import pytest
from PIL import Image
from store_fixtures import add_png, root

from feedback_store import FeedbackStore
from feedback_store.export import eval_mask, export_snapshot

PICKAPIC = ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid", "best_image_uid"]
LINEAGE = ["vote_id", "pair_id", "rater", "outcome", "kind", "excluded", "both_bad", "time_to_vote_ms"]
LINEAGE += ["adapter_version_0", "adapter_version_1", "seed_0", "seed_1", "base_model_0", "steps_1", "guidance_0"]
OUTCOMES = ("left", "right", "tie", "both_bad")


class Arena:
    """A file-backed store with 12 prompts, real PNGs for base and v1, and helpers to vote."""

    def __init__(self, path) -> None:
        self.store = FeedbackStore(path / "arena.duckdb")
        self.images = {}
        for i in range(12):
            pid = self.store.add_prompt(f"a {['red', 'blue', 'green'][i % 3]} shape number {i}", "pool", "shapes")
            color = (20 * i, 100, 200 - 10 * i)
            self.images[pid] = (
                add_png(self.store, pid, f"{i}-b.png", color, "base", i),
                add_png(self.store, pid, f"{i}-v1.png", color[::-1], "v1", 100 + i),
            )
        for r in ("r_ann", "r_ben", "r_cat"):
            self.store.ensure_rater(r)
        self.n = 0

    def vote(self, rater: str, outcome: str | None = None, kind: str = "cross_version") -> int:
        pid = list(self.images)[self.n % len(self.images)]
        left, right = self.images[pid]
        bad = "left" if kind == "control" else None
        pair = self.store.issue_pair(pid, left, right, kind, f"s_{rater}", control_bad_side=bad)
        outcome = outcome or OUTCOMES[self.n % 4]
        self.n += 1
        return self.store.record_vote(pair.token, f"s_{rater}", outcome, rater, time_to_vote_ms=1000 + self.n).vote_id


@pytest.fixture
def arena(tmp_path):
    a = Arena(tmp_path)
    yield a
    a.store.close()


def test_snapshot_is_pickapic_compatible_with_lineage_and_loads_everywhere(arena: Arena, tmp_path) -> None:
    ids = [arena.vote("r_ann") for _ in range(16)] + [arena.vote("r_ben") for _ in range(8)]
    arena.vote("r_ann", "left", kind="control")  # attention check: not training data
    arena.store.flag_vote(ids[0], "duplicate_burst")
    snap = export_snapshot(arena.store, tmp_path / "snaps", eval_fraction=0.3)
    m = snap.manifest
    assert snap.path == tmp_path / "snaps" / snap.snapshot_id and snap.path.is_dir()
    assert sorted(os.listdir(snap.path)) == ["eval.parquet", "manifest.json", "train.parquet"]
    assert (m["parent_snapshot"], m["vote_id_min"], m["vote_id_max"]) == (None, 1, 25)
    assert m["rows"] == {
        "train": m["files"]["train.parquet"]["rows"],
        "eval": m["files"]["eval.parquet"]["rows"],
        "total": 23,
    }
    for name, info in m["files"].items():
        data = (snap.path / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
        assert not os.access(snap.path / name, os.W_OK) or os.geteuid() == 0
        assert (os.stat(snap.path / name).st_mode & 0o222) == 0  # read-only

    from datasets import load_dataset

    files = {k: str(v) for k, v in {"train": snap.path / "train.parquet", "eval": snap.path / "eval.parquet"}.items()}
    ds = load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "hf"))
    assert (ds["train"].num_rows, ds["eval"].num_rows) == (m["rows"]["train"], m["rows"]["eval"])
    assert set(PICKAPIC + LINEAGE) <= set(ds["train"].column_names)
    df = pd.concat([pd.read_parquet(files["train"]), pd.read_parquet(files["eval"])])
    n_duck = duckdb.sql(f"SELECT count(*) FROM read_parquet(['{files['train']}', '{files['eval']}'])").fetchall()[0][0]
    assert len(df) == n_duck == 23
    assert ids[0] not in set(df.vote_id) and not df.excluded.any() and set(df.kind) == {"cross_version"}

    labels = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.5, 0.5)}
    for row in df.itertuples():
        assert (row.label_0, row.label_1) == labels[row.outcome]
        assert row.has_label == (row.outcome != "both_bad") and row.both_bad == (row.outcome == "both_bad")
        pair = arena.store.pair(row.pair_id)
        left, right = arena.store.image(pair.left_image_id), arena.store.image(pair.right_image_id)
        assert row.jpg_0 == (arena.store.data_dir / left.path).read_bytes()
        assert (row.image_0_uid, row.image_1_uid) == (left.sha256, right.sha256)
        assert (row.adapter_version_0, row.adapter_version_1, row.seed_0, row.seed_1) == (
            "base",
            "v1",
            left.seed,
            right.seed,
        )
        assert row.best_image_uid == {"left": left.sha256, "right": right.sha256}.get(row.outcome, "")
        assert row.caption == arena.store.prompt(pair.prompt_id).text and row.time_to_vote_ms > 1000
    assert Image.open(io.BytesIO(df.iloc[0].jpg_1)).size == (8, 8)
    train, evals = pd.read_parquet(files["train"]), pd.read_parquet(files["eval"])
    assert len(evals) > 0 and len(train) > 0 and not set(train.caption) & set(evals.caption)  # prompt-disjoint


def test_split_is_deterministic_and_whitespace_case_insensitive() -> None:
    import pyarrow as pa

    caps = pa.array([f"prompt {i}" for i in range(400)] + ["A  Red   Circle", "a red circle"])
    mask = eval_mask(caps, 0.2).to_pylist()
    assert mask == eval_mask(caps, 0.2).to_pylist()
    assert 40 <= sum(mask[:400]) <= 120 and mask[400] == mask[401]


def test_incremental_exports_deletion_and_audit_rows(arena: Arena, tmp_path) -> None:
    out = tmp_path / "snaps"
    for _ in range(6):
        arena.vote("r_ann")
        arena.vote("r_cat")
    first = export_snapshot(arena.store, out, images=False)
    assert first.manifest["rows"]["total"] == 12 and first.manifest["images"] is False
    for _ in range(4):
        arena.vote("r_ann")
        arena.vote("r_cat")
    arena.vote("r_ben", "right", kind="control")  # the broken image is on the left: passed
    assert arena.store.request_deletion("r_cat") == 10
    second = export_snapshot(arena.store, out, since=first.snapshot_id, include_excluded=True, images=False)
    m2 = second.manifest
    assert (m2["parent_snapshot"], m2["since_vote_id"], m2["vote_id_min"]) == (first.snapshot_id, 12, 13)
    assert m2["vote_id_max"] == 21 and m2["deleted_raters"] == ["r_cat"]
    df = pd.concat([pd.read_parquet(f) for f in second.files.values() if f.suffix == ".parquet"])
    assert "r_cat" not in set(df.rater) and len(df) == 5  # 4 by r_ann + the control row (audit mode)
    control = df[df.kind == "control"].iloc[0]
    assert control.excluded and control.control_passed and df.jpg_0.isna().all()
    assert df.vote_id.min() > first.manifest["vote_id_max"]
    # the earlier snapshot is untouched (immutable); a third export with nothing new is empty but valid
    assert (out / first.snapshot_id / "manifest.json").read_text() == json.dumps(
        first.manifest, indent=2, sort_keys=True
    ) + "\n"
    third = export_snapshot(arena.store, out, since=second.snapshot_id, images=False)
    assert third.manifest["rows"]["total"] == 0 and len(pd.read_parquet(third.files["train.parquet"])) == 0
    assert [s.snapshot_id for s in arena.store.snapshots()] == [
        first.snapshot_id,
        second.snapshot_id,
        third.snapshot_id,
    ]


def test_export_runs_inside_the_owning_process_while_votes_arrive(arena: Arena, tmp_path) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []

    def voter(rater: str) -> None:
        pid = list(arena.images)[0]
        left, right = arena.images[pid]
        try:
            while not stop.is_set():
                pair = arena.store.issue_pair(pid, left, right, "cross_version", f"s_{rater}")
                arena.store.record_vote(pair.token, f"s_{rater}", "left", rater)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=voter, args=(r,)) for r in ("r_ann", "r_ben")]
    for th in threads:
        th.start()
    try:
        snaps = [export_snapshot(arena.store, tmp_path / "live", images=False)]
        for _ in range(2):
            snaps.append(export_snapshot(arena.store, tmp_path / "live", since=snaps[-1].snapshot_id, images=False))
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors
    final = export_snapshot(arena.store, tmp_path / "live", since=snaps[-1].snapshot_id, images=False)
    exported = [
        v
        for s in [*snaps, final]
        for f in ("train.parquet", "eval.parquet")
        for v in pd.read_parquet(s.path / f).vote_id
    ]
    assert sorted(exported) == [v.vote_id for v in arena.store.votes()]  # no vote missed or exported twice


def test_cli(arena: Arena, tmp_path) -> None:
    for _ in range(5):
        arena.vote("r_ben")
    arena.store.close()
    env = dict(os.environ, PYTHONPATH=str(root()))
    cmd = [
        sys.executable,
        "-m",
        "feedback_store.export",
        "--db",
        str(tmp_path / "arena.duckdb"),
        "--out",
        str(tmp_path / "cli"),
    ]
    first = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
    assert first["rows"]["total"] == 5
    again = subprocess.run(
        [*cmd, "--since", first["snapshot_id"], "--no-images"], capture_output=True, text=True, env=env
    )
    assert again.returncode == 0 and json.loads(again.stdout)["rows"]["total"] == 0
    bad = subprocess.run([*cmd, "--since", "no-such-snapshot"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "not found" in bad.stderr
    # A stored image that no longer decodes (JPEG re-encodes every image): one line naming it, exit 2, no traceback.
    stored = sorted(f for f in tmp_path.rglob("*.png") if "cli" not in f.parts)
    stored[0].write_bytes(b"not an image")
    broken = subprocess.run([*cmd, "--image-format", "jpeg"], capture_output=True, text=True, env=env)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr, broken.stderr
    failed = [line for line in broken.stderr.splitlines() if line.startswith("export failed:")]
    assert len(failed) == 1 and stored[0].name in failed[0] and "--no-images" in failed[0], broken.stderr
    arena.store = FeedbackStore(tmp_path / "arena.duckdb")  # for the fixture's close()
