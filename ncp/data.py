"""Preference pairs for training: Pick-a-Pic v2 style Parquet in, `PreferencePair`s (prompt, chosen, rejected) out.

`load_pairs(paths)` reads Parquet with the Pick-a-Pic v2 columns `caption, jpg_0, jpg_1, label_0, label_1` (images as
encoded bytes; other columns are ignored) and maps every row to the project's one vocabulary, `prompt, chosen,
rejected`. A path is a Parquet file, a snapshot folder of `feedback_store.export` (its train.parquet only;
eval.parquet only with `include_eval=True`), a folder of Parquet shards (eval.parquet files left out the same way), or
a `datasets` folder written by `save_to_disk` (its train split). Files that cannot be read as that layout (empty, not
Parquet, a column missing or of the wrong type) raise `DataError`, whose message is one line: the file, the problem,
the fix. Ties (0.5/0.5) are dropped by default, as the reference Diffusion-DPO code does (METHOD.md, "Settings"). Bad
rows are skipped and counted in ONE warning. The optional "absolute winners" filter (paper sec. 5), exactly: an image
is identified by (prompt, sha256 of its bytes); over all valid rows, ties included, count its wins, losses and draws;
it is an absolute winner when it has no loss, no draw and at least two wins; a pair is kept when its chosen image is an
absolute winner (so never a tie).

The next stage, VAE latents and training batches, is `ncp.latents` (`encode_pairs`, `PreferenceDataset`,
`collate_pairs`); `ncp.trainer` uses both.

Run as a quick inspection tool: `python -m ncp.data data/snapshot.parquet [--absolute-winners] [--keep-ties]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
# Valid (label_0, label_1) outcomes in Pick-a-Pic v2: image 0 wins, image 1 wins, tie.
_WIN_0, _WIN_1, _TIE = (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)


@dataclass(frozen=True)
class PreferencePair:
    """One judged pair, in the project's vocabulary. Images are the original encoded bytes (PNG/JPEG/...).

    `chosen_size`/`rejected_size` are the decoded (height, width). For a kept tie (`is_tie`), `chosen` is `jpg_0`.
    """

    prompt: str
    chosen: bytes = field(repr=False)
    rejected: bytes = field(repr=False)
    chosen_size: tuple[int, int]
    rejected_size: tuple[int, int]
    is_tie: bool = False


@dataclass(frozen=True)
class LoadReport:
    """What `load_pairs` read and why rows were left out (counts add up to `rows`)."""

    files: tuple[str, ...]
    rows: int
    kept: int
    ties_dropped: int
    bad_rows: dict[str, int]
    not_absolute_winner: int

    def to_dict(self) -> dict:
        return {
            "files": list(self.files),
            "rows": self.rows,
            "kept": self.kept,
            "ties_dropped": self.ties_dropped,
            "bad_rows": dict(self.bad_rows),
            "not_absolute_winner": self.not_absolute_winner,
        }


class DataError(ValueError):
    """Preference data that cannot be trained on. The message is one line: the file, the problem, the fix."""


class DataNotFound(DataError, FileNotFoundError):
    """A `--data` path that does not exist, or a folder without training files."""


EVAL_FILE = "eval.parquet"  # feedback_store.export's held-out split: never read unless asked for
_FIX_LAYOUT = (
    "write it with `python -m feedback_store.export` or in the Pick-a-Pic v2 layout "
    "(caption string, jpg_0/jpg_1 image bytes, label_0/label_1 numbers; docs/API.md)"
)


def _dataset_dir_files(folder: Path, include_eval: bool) -> list[Path]:
    """The Arrow files of a `datasets.save_to_disk` folder: a Dataset, or a DatasetDict's train split (and its other
    splits with include_eval)."""
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        splits = json.loads(dict_file.read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{folder}: a datasets DatasetDict without a 'train' split (it has {splits}); "
                            "save the training rows as the 'train' split or pass one split's folder.")  # fmt: skip
        chosen = splits if include_eval else ["train"]
        return [f for split in chosen for f in sorted((folder / split).glob("*.arrow"))]
    return sorted(folder.glob("*.arrow"))


def parquet_files(paths: str | Path | Sequence[str | Path], *, include_eval: bool = False) -> list[Path]:
    """Expand the `--data` paths into the files to read (the rules are in the module docstring).

    A snapshot folder (it holds train.parquet) gives its train.parquet, plus eval.parquet with `include_eval`; any
    other folder gives every `*.parquet` below it (sorted) except files named eval.parquet unless `include_eval`, or
    a `datasets` folder's Arrow files; a file is read as given."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise DataError("No data given: pass a snapshot folder, a Parquet file, or a folder of Parquet shards.")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            if (item / "train.parquet").is_file():
                found = [item / "train.parquet"] + ([item / EVAL_FILE] if include_eval else [])
                files.extend(f for f in found if f.is_file())
                continue
            if (item / "state.json").is_file() or (item / "dataset_dict.json").is_file():
                found = _dataset_dir_files(item, include_eval)
            else:
                found = [f for f in sorted(item.rglob("*.parquet")) if include_eval or f.name != EVAL_FILE]
            if not found:
                raise DataNotFound(
                    f"{item}: the folder holds no training Parquet files; point --data at a snapshot folder (it "
                    "holds train.parquet), a Parquet file, or a folder of Parquet shards."
                )
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DataNotFound(f"{item}: does not exist; check the path given to --data.")
    return files


def _binary_like(kind: pa.DataType) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    # HF `datasets` Image columns: struct<bytes: binary, path: string>
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _binary_like(kind.field("bytes").type)


_COLUMN_TYPES = {
    "caption": ("text (string)", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "jpg_0": ("encoded image bytes (binary)", _binary_like),
    "jpg_1": ("encoded image bytes (binary)", _binary_like),
    "label_0": ("a number (1, 0 or 0.5)", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)),
    "label_1": ("a number (1, 0 or 0.5)", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)),
}


def _open_batches(path: Path) -> Iterable[pa.RecordBatch]:
    """Batches of the Pick-a-Pic columns of one file, after checking that it is one (DataError otherwise)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); re-export it or remove it from --data.")
    try:
        if path.suffix == ".arrow":
            reader = pa.ipc.open_stream(path)
            schema, batches = reader.schema, reader
        else:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            batches = pf.iter_batches(batch_size=256, columns=[c for c in REQUIRED_COLUMNS if c in schema.names])
    except (pa.ArrowInvalid, OSError) as err:
        kind = "Arrow" if path.suffix == ".arrow" else "Parquet"
        raise DataError(f"{path}: not a readable {kind} file ({' '.join(str(err).split())}); {_FIX_LAYOUT}.") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(
            f"{path}: lacks the Pick-a-Pic v2 column(s) {missing} (it has {schema.names[:12]}); {_FIX_LAYOUT}."
        )
    for name, (wanted, ok) in _COLUMN_TYPES.items():
        kind = schema.field(name).type
        if not ok(kind):
            raise DataError(f"{path}: column {name!r} is {kind}, not {wanted}; {_FIX_LAYOUT}.")
    for batch in batches:
        yield batch.select(list(REQUIRED_COLUMNS))


def _image_bytes(value: object) -> bytes | None:
    # Pick-a-Pic stores raw bytes; HF `datasets` Image columns store {"bytes": ..., "path": ...}.
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) and len(value) > 0 else None


def _decoded_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) if the bytes decode fully as an image, else None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.height, im.width
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _labels(label_0: object, label_1: object) -> tuple[float, float] | None:
    try:
        pair = (float(label_0), float(label_1))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    for valid in (_WIN_0, _WIN_1, _TIE):
        if all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(pair, valid, strict=True)):
            return valid
    return None


@dataclass(frozen=True)
class _Row:
    prompt: str
    images: tuple[bytes, bytes]
    sizes: tuple[tuple[int, int], tuple[int, int]]
    labels: tuple[float, float]


def _valid_rows(files: Sequence[Path], bad: Counter) -> Iterable[_Row]:
    for path in files:
        for batch in _open_batches(path):
            for rec in batch.to_pylist():
                caption = rec["caption"]
                if not isinstance(caption, str) or not caption.strip():
                    bad["missing_caption"] += 1
                    continue
                labels = _labels(rec["label_0"], rec["label_1"])
                if labels is None:
                    bad["bad_labels"] += 1
                    continue
                images = (_image_bytes(rec["jpg_0"]), _image_bytes(rec["jpg_1"]))
                sizes = tuple(_decoded_size(b) if b is not None else None for b in images)
                if None in images or None in sizes:
                    bad["undecodable_image"] += 1
                    continue
                yield _Row(caption, images, sizes, labels)  # type: ignore[arg-type]


def _absolute_winner_ids(rows: Sequence[_Row]) -> set[tuple[str, str]]:
    """The paper's "absolute winners" filter (sec. 5), as implemented here.

    An image is identified by (prompt, sha256 of its bytes). Over ALL valid rows (ties included), count for each image
    its wins, losses and draws. An image is an absolute winner when it has no losses, no draws and at least two wins
    for its prompt. A pair is kept by the filter when its chosen image is an absolute winner.
    """
    wins: Counter = Counter()
    spoiled: set[tuple[str, str]] = set()  # images with any loss or draw
    for row in rows:
        ids = [(row.prompt, hashlib.sha256(b).hexdigest()) for b in row.images]
        if row.labels == _TIE:
            spoiled.update(ids)
        else:
            win = 0 if row.labels == _WIN_0 else 1
            wins[ids[win]] += 1
            spoiled.add(ids[1 - win])
    return {img for img, n in wins.items() if n >= 2 and img not in spoiled}


def load_pairs(
    paths: str | Path | Sequence[str | Path],
    *,
    keep_ties: bool = False,
    absolute_winners: bool = False,
    include_eval: bool = False,
) -> tuple[list[PreferencePair], LoadReport]:
    """Read Pick-a-Pic v2 style Parquet into `PreferencePair`s plus a `LoadReport`.

    Bad rows (missing/empty caption, labels other than 1/0, 0/1, 0.5/0.5, an image that is missing or does not decode)
    are skipped and counted, with one warning for the whole load. `keep_ties` keeps 0.5/0.5 rows (as ordered pairs,
    `jpg_0` first, flagged `is_tie`); `absolute_winners` applies the paper's filter (rule in the module docstring);
    `include_eval` also reads a snapshot's eval.parquet. A file that is not in this layout raises DataError.
    """
    files = parquet_files(paths, include_eval=include_eval)
    bad: Counter = Counter()
    rows = list(_valid_rows(files, bad))
    n_total = len(rows) + sum(bad.values())
    winners = _absolute_winner_ids(rows) if absolute_winners else None
    pairs: list[PreferencePair] = []
    ties = filtered = 0
    for row in rows:
        is_tie = row.labels == _TIE
        c = 1 if row.labels == _WIN_1 else 0  # index of the chosen image (jpg_0 for a tie)
        if winners is not None and (is_tie or (row.prompt, hashlib.sha256(row.images[c]).hexdigest()) not in winners):
            filtered += 1
            continue
        if is_tie and not keep_ties:
            ties += 1
            continue
        pairs.append(
            PreferencePair(row.prompt, row.images[c], row.images[1 - c], row.sizes[c], row.sizes[1 - c], is_tie)
        )
    if bad:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
        logger.warning(
            "Skipped %d bad row(s) of %d in %d file(s) (%s).", sum(bad.values()), n_total, len(files), detail
        )
    report = LoadReport(tuple(map(str, files)), n_total, len(pairs), ties, dict(sorted(bad.items())), filtered)
    logger.info("Loaded %d pair(s): %s", len(pairs), report.to_dict())
    return pairs, report


def require_pairs(report: LoadReport, *, keep_ties: bool = False) -> None:
    """Raise DataError (one line: the files, why nothing is left, the fix) when a load kept no pair to train on."""
    if report.kept:
        return
    where = ", ".join(report.files[:3]) + (f" and {len(report.files) - 3} more" if len(report.files) > 3 else "")
    if report.rows == 0:
        problem, fix = "no rows", "collect votes first or point --data at a snapshot that has some"
    elif report.bad_rows and sum(report.bad_rows.values()) == report.rows:
        detail = ", ".join(f"{k}: {v}" for k, v in report.bad_rows.items())
        problem = f"none of its {report.rows} row(s) is usable ({detail})"
        fix = "store each image as its encoded PNG/JPEG bytes, a non-empty caption and labels 1/0, 0/1 or 0.5/0.5"
    else:
        kinds = "pair" if keep_ties else "strict preference pair (label 1/0 or 0/1)"
        problem = (
            f"no {kinds} among {report.rows} row(s) (ties dropped: {report.ties_dropped}, bad: "
            f"{sum(report.bad_rows.values())}, not absolute winners: {report.not_absolute_winner})"
        )
        fix = "collect more decisive votes, or pass --keep-ties / drop --absolute-winners"
    raise DataError(f"{where}: {problem}; {fix}.")


# ---------------------------------------------------------------------------------------------------- encoding


def coin_flip(pairs: list[PreferencePair], seed: int | str) -> list[PreferencePair]:
    """Each pair with its chosen and rejected images swapped with probability 1/2 (the null arm's labels). `seed`
    names the draw: the trainer's and the evaluator's use different names, so the n-th training pair and the n-th
    held-out pair never share a coin."""
    rng = random.Random(f"coin-flip-{seed}")
    return [
        dataclasses.replace(
            p, chosen=p.rejected, rejected=p.chosen, chosen_size=p.rejected_size, rejected_size=p.chosen_size
        )
        if rng.random() < 0.5
        else p
        for p in pairs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Summarise a Pick-a-Pic v2 style preference snapshot.")
    parser.add_argument("paths", nargs="+", help="snapshot folder(s), Parquet file(s) or folder(s) of shards")
    parser.add_argument("--keep-ties", action="store_true", help="keep 0.5/0.5 rows")
    parser.add_argument("--absolute-winners", action="store_true", help="apply the paper's sec. 5 filter")
    parser.add_argument("--include-eval", action="store_true", help="also read a snapshot's eval.parquet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        _, report = load_pairs(
            args.paths,
            keep_ties=args.keep_ties,
            absolute_winners=args.absolute_winners,
            include_eval=args.include_eval,
        )
    except DataError as err:
        logger.error("%s", err)
        return 2
    sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
