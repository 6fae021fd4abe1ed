"""What `--data` reads and how bad data is refused: a snapshot folder gives its train.parquet only (eval.parquet with
--include-eval), and every unusable file (missing or mistyped column, 0 bytes, not Parquet, no rows, no decodable
image, no strict pair, a wrong path) stops `python -m ncp.train` and `python -m ncp.data` with ONE line that names the
file, the problem and the fix, exit status 2, before any model is loaded (the tests pass a model path that does not
exist: loading it first would fail differently)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ncp import data as ncp_data
from ncp import train as ncp_train
from ncp.data import DataError, load_pairs, parquet_files
from ncp.pipelines import build_tiny_sd15
from tests.test_data import png, row, write_parquet

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
RED, BLUE = png((200, 30, 30)), png((30, 30, 200))


def snapshot(folder: Path, train_rows: int = 3, eval_rows: int = 5) -> Path:
    """A folder in feedback_store.export's layout: train.parquet, eval.parquet, manifest.json."""
    folder.mkdir(parents=True)
    write_parquet(folder / "train.parquet", [row(f"train {i}", RED, BLUE, 1.0, 0.0) for i in range(train_rows)])
    write_parquet(folder / "eval.parquet", [row(f"eval {i}", RED, BLUE, 0.0, 1.0) for i in range(eval_rows)])
    (folder / "manifest.json").write_text(json.dumps({"rows": {"train": train_rows, "eval": eval_rows}}))
    return folder


def test_a_snapshot_folder_gives_its_train_split_only_unless_eval_is_asked_for(tmp_path: Path) -> None:
    snap = snapshot(tmp_path / "20260101T000000Z-v8")
    assert parquet_files(snap) == [snap / "train.parquet"]
    assert parquet_files(snap, include_eval=True) == [snap / "train.parquet", snap / "eval.parquet"]
    pairs, report = load_pairs(snap)
    assert report.rows == 3 and {p.prompt for p in pairs} == {"train 0", "train 1", "train 2"}
    assert load_pairs(snap, include_eval=True)[1].rows == 8
    # A folder of snapshot folders (or of shards) leaves eval.parquet files out the same way.
    snapshot(tmp_path / "20260102T000000Z-v9")
    assert all(f.name == "train.parquet" for f in parquet_files(tmp_path)) and len(parquet_files(tmp_path)) == 2
    assert parquet_files(snap / "eval.parquet") == [snap / "eval.parquet"]  # a file named on purpose is read


def test_a_datasets_save_to_disk_folder_is_read(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [row(f"p{i}", RED, BLUE, 1.0, 0.0) for i in range(2)] + [row("tie", RED, BLUE, 0.5, 0.5)]
    ds = datasets.Dataset.from_list(rows).cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "dd")
    pairs, report = load_pairs(tmp_path / "dd")
    assert (report.rows, len(pairs), report.ties_dropped) == (3, 2, 1)
    assert load_pairs(tmp_path / "dd", include_eval=True)[1].rows == 4


def test_the_trainer_reads_only_train_parquet_of_a_snapshot(tmp_path: Path) -> None:
    model = tmp_path / "model"
    build_tiny_sd15().save_pretrained(model)
    snap = snapshot(tmp_path / "snap")
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "ncp.train", "--model", str(model), "--data", str(snap), "--out", str(out)]
    cmd += ["--max-steps", "1", "--lora-rank", "4", "--lora-alpha", "4", "--threads", "1", "--no-progress-bar"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "metrics.json").read_text())["data"]
    assert data["files"] == [str(snap / "train.parquet")] and data["rows"] == 3


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (--data arguments, a word the one-line error must contain besides the file name)."""
    cases: dict[str, tuple[list[str], str]] = {}
    table = pa.table({"caption": ["a"], "jpg_0": [RED], "jpg_1": [BLUE], "label_1": [0.0]})
    pq.write_table(table, tmp / "no_label.parquet")
    cases["missing_column"] = ([str(tmp / "no_label.parquet")], "label_0")
    (tmp / "empty.parquet").write_bytes(b"")
    cases["zero_bytes"] = ([str(tmp / "empty.parquet")], "0 bytes")
    (tmp / "text.parquet").write_text("caption,jpg_0\nnot,parquet\n")
    cases["not_parquet"] = ([str(tmp / "text.parquet")], "not a readable Parquet file")
    write_parquet(tmp / "no_rows.parquet", [])
    cases["no_rows"] = ([str(tmp / "no_rows.parquet")], "no rows")
    write_parquet(tmp / "corrupt.parquet", [row("a", b"\x89PNG broken", b"junk", 1.0, 0.0)] * 3)
    cases["all_images_corrupt"] = ([str(tmp / "corrupt.parquet")], "undecodable_image: 3")
    write_parquet(tmp / "ties.parquet", [row("a", RED, BLUE, 0.5, 0.5)] * 2)
    cases["only_ties"] = ([str(tmp / "ties.parquet")], "strict preference pair")
    table = pa.table({"caption": ["a"], "jpg_0": [RED], "jpg_1": [BLUE], "label_0": ["1"], "label_1": ["0"]})
    pq.write_table(table, tmp / "string_labels.parquet")
    cases["wrong_type"] = ([str(tmp / "string_labels.parquet")], "not a number")
    cases["missing_path"] = ([str(tmp / "nowhere.parquet")], "does not exist")
    (tmp / "empty_dir").mkdir()
    cases["empty_folder"] = ([str(tmp / "empty_dir")], "no training Parquet files")
    return cases


STRUCTURAL = {"missing_column", "zero_bytes", "not_parquet", "wrong_type", "missing_path", "empty_folder"}


def test_every_bad_data_case_is_one_line_with_exit_2_before_the_model_loads(tmp_path: Path, caplog) -> None:
    cases = _bad_cases(tmp_path)
    for name, (data, word) in cases.items():
        caplog.clear()
        argv = ["--model", str(tmp_path / "no-such-model"), "--data", *data, "--out", str(tmp_path / f"out-{name}")]
        with caplog.at_level(logging.INFO):
            code = ncp_train.main(argv)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert code == 2, (name, caplog.text)
        assert len(errors) == 1 and "\n" not in errors[0], (name, errors)
        assert data[0] in errors[0] and word in errors[0], (name, errors[0])
        assert "no-such-model" not in caplog.text, name  # the model was never touched
        assert not (tmp_path / f"out-{name}").exists()
        if name in STRUCTURAL:  # the inspection tool refuses unreadable files the same way (it summarises the rest)
            caplog.clear()
            assert ncp_data.main(data) == 2 and len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_the_cli_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "empty.parquet").write_bytes(b"")
    cmd = [sys.executable, "-m", "ncp.train", "--model", "none", "--data", str(tmp_path / "empty.parquet")]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "o")], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "ncp." in ln]  # (import-time library notices aside)
    assert len(lines) == 1 and "ERROR" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert "empty.parquet" in lines[0] and "re-export" in lines[0]


def test_accelerate_launch_with_processes_but_no_multi_gpu_warns() -> None:
    env = {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "--multi_gpu" in ncp_train.launch_warning(env)
    assert ncp_train.launch_warning({**env, "WORLD_SIZE": "2"}) is None  # torchrun / --multi_gpu started them all
    assert ncp_train.launch_warning({}) is None  # plain python -m ncp.train


def test_accelerate_launch_num_processes_2_without_multi_gpu_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty.parquet").write_bytes(b"")
    cmd = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "-m", "ncp.train", "--model", "none", "--data", str(tmp_path / "empty.parquet")]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "o")], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "started ONE" in proc.stderr and "--multi_gpu" in proc.stderr, proc.stderr[-2000:]


def test_data_error_is_a_value_error() -> None:  # callers that caught ValueError for a missing column still do
    assert issubclass(DataError, ValueError)
