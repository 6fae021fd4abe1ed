"""Pick-a-Pic v2 compatibility of the export: every column of its schema with its type, UTC timestamps, PNG or JPEG
image bytes; the export loaded with `datasets` and run through Diffusion-DPO's data path (drop ties, decode, put the
chosen image first by label_0), and `ncp.train` training on a file written by hand in the real layout.

    python -m pytest -q tests/test_pickapic.py
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_store_export import Arena

from feedback_store.export import export_snapshot
from ncp.data import load_pairs
from ncp.pipelines import build_tiny_sd15

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
# The columns of yuvalkirstain/pickapic_v2 (its dataset card) and their Arrow types.
PICKAPIC_V2 = {
    "are_different": pa.bool_(),
    "best_image_uid": pa.string(),
    "caption": pa.string(),
    "created_at": pa.timestamp("us", tz="UTC"),
    "has_label": pa.bool_(),
    "image_0_uid": pa.string(),
    "image_0_url": pa.string(),
    "image_1_uid": pa.string(),
    "image_1_url": pa.string(),
    "jpg_0": pa.binary(),
    "jpg_1": pa.binary(),
    "label_0": pa.float64(),
    "label_1": pa.float64(),
    "model_0": pa.string(),
    "model_1": pa.string(),
    "ranking_id": pa.int64(),
    "user_id": pa.int64(),
    "num_example_per_prompt": pa.int64(),
}


@pytest.fixture
def snapshot(tmp_path: Path):
    arena = Arena(tmp_path)
    for i in range(24):
        arena.vote(("r_ann", "r_ben", "r_cat")[i % 3])
    try:
        yield arena, export_snapshot(arena.store, tmp_path / "snapshots", eval_fraction=0.2)
    finally:
        arena.store.close()


def test_every_pickapic_v2_column_is_there_with_its_type(snapshot) -> None:
    arena, snap = snapshot
    table = pq.read_table(snap.files["train.parquet"])
    for name, kind in PICKAPIC_V2.items():
        assert name in table.schema.names, name
        assert table.schema.field(name).type == kind, (name, table.schema.field(name).type)
    rows = table.to_pylist()
    votes = {v.vote_id: v for v in arena.store.votes()}
    for r in rows:
        assert r["ranking_id"] == r["vote_id"] and r["image_0_url"] is None and r["image_1_url"] is None
        assert r["created_at"].tzinfo is not None and r["created_at"].utcoffset().total_seconds() == 0
        assert r["created_at"].replace(tzinfo=None) == votes[r["vote_id"]].created
        v = r["adapter_version_0"]
        assert r["model_0"] == r["base_model_0"] + ("" if v == "base" else f"+{v}")
    by_rater = {}
    for r in rows:
        by_rater.setdefault(r["rater"], set()).add(r["user_id"])
    assert all(len(ids) == 1 for ids in by_rater.values()) and len(by_rater) == 3  # one stable id per rater
    everything = (
        pq.read_table(snap.files["train.parquet"]).to_pylist() + pq.read_table(snap.files["eval.parquet"]).to_pylist()
    )
    for r in everything:  # rows with this caption in the whole snapshot
        assert r["num_example_per_prompt"] == sum(x["caption"] == r["caption"] for x in everything)
    assert json.loads((snap.path / "manifest.json").read_text())["image_format"] == "png"


def test_diffusion_dpo_data_path_reads_the_export_with_datasets(snapshot) -> None:
    datasets = pytest.importorskip("datasets")
    _, snap = snapshot
    ds = datasets.load_dataset("parquet", data_files={"train": str(snap.files["train.parquet"])})["train"]
    # Diffusion-DPO (Wallace et al.; diffusers' train_diffusion_dpo*.py): drop ties, decode both images, and put the
    # preferred one first: the pair is flipped when label_0 == 0.
    ds = ds.filter(lambda x: x["label_0"] in (0, 1))
    assert len(ds) > 0 and all(h for h in ds["has_label"])

    def preprocess(examples: dict) -> dict:
        pixels = [
            [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in examples[c]] for c in ("jpg_0", "jpg_1")
        ]
        combined, chosen_sha = [], []
        for im_tup, label_0, raw in zip(
            zip(*pixels, strict=True),
            examples["label_0"],
            zip(examples["jpg_0"], examples["jpg_1"], strict=True),
            strict=True,
        ):
            if label_0 == 0:
                im_tup, raw = im_tup[::-1], raw[::-1]
            combined.append(np.concatenate(im_tup, axis=-1))  # (H, W, 6): chosen channels first
            chosen_sha.append(hashlib.sha256(raw[0]).hexdigest())
        return {"pixel_values": combined, "chosen_sha": chosen_sha}

    out = ds.map(preprocess, batched=True, remove_columns=ds.column_names)
    assert out["chosen_sha"] == ds["best_image_uid"]  # the chosen image is the voted one, bytes and all
    assert np.asarray(out[0]["pixel_values"]).shape[-1] == 6


def test_jpeg_export_keeps_uids_and_is_read_by_the_trainer(snapshot, tmp_path: Path) -> None:
    arena, png = snapshot
    jpg = export_snapshot(arena.store, tmp_path / "jpeg", eval_fraction=0.2, image_format="jpeg")
    a, b = pq.read_table(png.files["train.parquet"]).to_pylist(), pq.read_table(jpg.files["train.parquet"]).to_pylist()
    assert [r["image_0_uid"] for r in a] == [r["image_0_uid"] for r in b]
    for r in b:
        assert r["jpg_0"][:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(r["jpg_1"])).format == "JPEG"
    pairs, report = load_pairs(jpg.path)
    assert report.bad_rows == {} and len(pairs) == sum(r["label_0"] in (0.0, 1.0) for r in b)
    with pytest.raises(ValueError, match="image_format"):
        export_snapshot(arena.store, tmp_path / "x", image_format="webp")


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_training_on_a_hand_written_file_in_the_real_pickapic_layout(tmp_path: Path) -> None:
    rows = []
    for i in range(4):
        a, b = _jpeg((200, 20 * i, 20)), _jpeg((20, 20 * i, 200))
        label = (1.0, 0.0) if i % 2 else (0.0, 1.0)
        rows.append(
            {"are_different": True, "best_image_uid": f"uid-{i}-{label.index(1.0)}", "caption": f"a photo {i}",
             "created_at": pa.scalar(1_700_000_000_000_000 + i, pa.timestamp("us", tz="UTC")).as_py(),
             "has_label": True, "image_0_uid": f"uid-{i}-0", "image_0_url": f"https://example.org/{i}-0.jpg",
             "image_1_uid": f"uid-{i}-1", "image_1_url": f"https://example.org/{i}-1.jpg", "jpg_0": a, "jpg_1": b,
             "label_0": label[0], "label_1": label[1], "model_0": "sdxl", "model_1": "sd15", "ranking_id": 100 + i,
             "user_id": 7, "num_example_per_prompt": 1, "__index_level_0__": i}
        )  # fmt: skip
    rows.append({**rows[0], "label_0": 0.5, "label_1": 0.5, "best_image_uid": "", "ranking_id": 200})  # a tie
    schema = pa.schema([pa.field(k, PICKAPIC_V2.get(k, pa.int64())) for k in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "pickapic-shard-0.parquet")
    model = tmp_path / "model"
    build_tiny_sd15().save_pretrained(model)
    out = tmp_path / "adapter"
    cmd = [
        sys.executable,
        "-m",
        "ncp.train",
        "--model",
        str(model),
        "--data",
        str(tmp_path / "pickapic-shard-0.parquet"),
    ]
    cmd += ["--out", str(out), "--max-steps", "1", "--lora-rank", "4", "--lora-alpha", "4", "--threads", "1"]
    proc = subprocess.run([*cmd, "--no-progress-bar"], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert (data["rows"], data["kept"], data["ties_dropped"], data["bad_rows"]) == (5, 4, 1, {})
