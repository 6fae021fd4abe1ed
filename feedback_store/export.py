"""The researchers' (and trainer's) export: immutable, versioned Parquet snapshots of the votes.

    python -m feedback_store.export --url http://127.0.0.1:7860 --out data/snapshots     # from a running app
    python -m feedback_store.export --db data/arena.duckdb --out data/snapshots [--since SNAPSHOT_ID]

`--url` asks a running app for its newest snapshot (its `/export` API: taken at call time when votes arrived since
the last one and that one is over 10 s old; docs/API.md), downloads the zip, checks every file against the
manifest's sha256 and unpacks the snapshot folder under `--out`. `--db` opens the database itself, so only while the
app is not running (DuckDB allows one process per file; the app's lock is reported in one line). Inside the app call
`export_snapshot(store, out_dir)`: it reads through the app's own connection and writes with pyarrow. Both CLIs end a
failure with one line (what, why, what to do) and exit status 2.

A snapshot is a folder `<out>/<snapshot_id>/` that is never modified after it appears (written to a temp folder, files
made read-only, then renamed into place): `train.parquet`, `eval.parquet` and `manifest.json`.

Rows: one per vote, image 0 = the left image, image 1 = the right image. Every Pick-a-Pic v2 column with its type,
so existing training code reads it: `caption` (string), `jpg_0`, `jpg_1` (binary: the image bytes, PNG by default,
lossless; `image_format="jpeg"` / `--image-format jpeg` re-encodes them as JPEG quality 95 as Pick-a-Pic stores them),
`label_0`, `label_1` (float64: 1/0 for a strict preference, 0.5/0.5 for a tie), `image_0_uid`, `image_1_uid`
(string: sha256 of the stored PNG, whatever the export format), `best_image_uid` (the chosen one's uid, "" for a tie),
`has_label`, `are_different` (bool), `created_at` (timestamp, UTC), `model_0`, `model_1` (string: the base model id,
plus "+<adapter version>" when a LoRA version made the image), `ranking_id` (int64: the vote id), `user_id` (int64:
the first 60 bits of sha256 of the rater's pseudonym, so the same rater keeps one id), `num_example_per_prompt`
(int64: rows with this caption in the snapshot, before the split), `image_0_url`, `image_1_url` (string, always
null: the images are in the file, not on a server). Decision on both_bad: kept, labelled 0.5/0.5 like a tie
but with `has_label = False` and `both_bad = True`, so code that filters on has_label (or drops ties, as the
reference DPO code does) skips them and no information is lost. Lineage columns: vote_id, pair_id, prompt_id,
category, prompt_source, rater (pseudonym), outcome, kind, excluded, excluded_reason, both_bad, control_passed,
time_to_vote_ms, and per image adapter_version_i, base_model_i, seed_i, scheduler_i, steps_i, guidance_i, width_i,
height_i (i = 0, 1).

By default only usable votes are exported (not flagged, active rater, not a control pair): the files are ready to train
on. `include_excluded=True` (`--include-excluded`) also writes flagged, shadow-excluded and control-pair rows with
`excluded`/`kind` set, for audits. Deleted raters' votes are gone from the database and never appear.

Split: a row goes to eval iff sha256(casefolded, whitespace-collapsed caption) read as a fraction is below
`eval_fraction`, so the split is deterministic, stable across incremental snapshots, and prompt-disjoint.

Incremental: `since=<snapshot_id>` exports only votes after that snapshot's `vote_id_max` and names it as parent.
The manifest lists schema versions, row counts, the vote-id range, sha256 and size of each file, the parent snapshot,
and every deleted rater pseudonym, so users of older snapshots can drop those rows too. No IP or user agent exists
anywhere in the store, so none can be exported.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import duckdb

from feedback_store.snapshot import (  # noqa: F401 - the export's public names: `from feedback_store.export import ...`
    EXPORT_FORMAT,
    EXPORT_VERSION,
    IMAGE_FORMATS,
    Snapshot,
    eval_mask,
    export_snapshot,
    file_sha256,
)
from feedback_store.store import FeedbackStore

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """An export that could not be made or fetched; the message is one line: what, why, what to do."""


def _call(url: str, api: str, data: list, timeout: float) -> dict:
    """One call of the app's HTTP API through Gradio's REST protocol (POST .../call/<api>, then its event stream)."""
    base = url.rstrip("/") + "/gradio_api/call/" + api
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(base, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{base}/{event_id}", timeout=timeout) as r:
        text = r.read().decode("utf-8", "replace")
    event, payload = "", ""
    for line in text.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            payload = line.split(":", 1)[1].strip()
    if event != "complete":
        raise ExportError(
            f"{base}: the app answered {event or 'nothing'} ({payload[:120]}); check --url and the app log"
        )
    answer = json.loads(payload)
    return answer[0] if answer and isinstance(answer[0], dict) else {}


def download_snapshot(url: str, out_dir: str | Path, token: str = "", timeout: float = 600.0) -> Snapshot:
    """Fetch the running app's newest snapshot (`/export`), verify it against its manifest and unpack it as
    `<out_dir>/<snapshot_id>/` (an existing, identical copy is kept). Raises ExportError with a one-line reason."""
    out = Path(out_dir)
    try:
        answer = _call(url, "export", [token], timeout)
        if "error" in answer:
            raise ExportError(f"{url}: /export refused: {answer['error']}: {answer.get('message', '')}")
        snapshot_id, name = answer["snapshot_id"], answer["file"]["path"]
        with urllib.request.urlopen(url.rstrip("/") + "/gradio_api/file=" + name, timeout=timeout) as r:
            blob = r.read()
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(
            f"{url}: could not fetch the export ({' '.join(str(err).split())[:160]}); check --url"
        ) from None
    manifest = answer["manifest"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{snapshot_id}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            for member in zf.namelist():
                parts = Path(member).parts
                if member.rstrip("/") == snapshot_id:
                    continue  # the folder's own entry
                if len(parts) != 2 or parts[0] != snapshot_id or parts[1] not in {*manifest["files"], "manifest.json"}:
                    raise ExportError(f"{url}: the export zip holds an unexpected entry {member!r}; not unpacked")
            zf.extractall(tmp)
        folder = tmp / snapshot_id
        for fname, meta in manifest["files"].items():
            if file_sha256(folder / fname) != meta["sha256"]:
                raise ExportError(f"{url}: {fname} does not match the manifest's sha256 (a broken download); retry")
        target = out / snapshot_id
        if not target.exists():
            os.rename(folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Snapshot(snapshot_id, target, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export an immutable Parquet snapshot of the arena's votes.")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running app (e.g. http://127.0.0.1:7860): download its newest snapshot")
    source.add_argument("--db", help="the arena's DuckDB file (stop the app first: it holds the lock)")
    ap.add_argument(
        "--token", default="", help="with --url: the admin token, when the app sets NCP_EXPORT_ACCESS=admin"
    )
    ap.add_argument("--out", required=True, help="folder that holds the snapshot folders")
    ap.add_argument("--since", default=None, help="snapshot id: export only votes after it (incremental)")
    ap.add_argument("--data-dir", default=None, help="root of the stored image paths (default: the db's folder)")
    ap.add_argument("--no-images", action="store_true", help="leave jpg_0/jpg_1 empty (metadata-only export)")
    ap.add_argument("--include-excluded", action="store_true", help="also flagged/shadow-excluded/control rows")
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument("--quarantine-s", type=float, default=0.0, help="hold back votes younger than this")
    ap.add_argument(
        "--image-format", choices=IMAGE_FORMATS, default="png", help="jpg_0/jpg_1 as stored (png) or as JPEG"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        snap = download_snapshot(args.url, args.out, args.token) if args.url else _export_db(args)
    except (ExportError, ValueError, FileNotFoundError) as err:
        log.error("export failed: %s", err)
        return 2
    except OSError as err:  # an unreadable or undecodable stored image (PIL's errors are OSErrors), a permission
        log.error("export failed: %s (check the data dir's files; --no-images exports the votes without images)", err)
        return 2
    sys.stdout.write(
        json.dumps({"snapshot_id": snap.snapshot_id, "path": str(snap.path), "rows": snap.manifest["rows"]}) + "\n"
    )
    return 0


def _export_db(args: argparse.Namespace) -> Snapshot:
    db = Path(args.db)
    if not db.is_file():
        raise ExportError(f"{db}: no such database file; pass the app's arena.duckdb (in NCP_DATA_DIR)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ExportError(f"{args.out}: exists and is not a folder; pass a folder for the snapshot folders")
    try:
        store = FeedbackStore(db, data_dir=args.data_dir)
    except duckdb.Error as err:
        if "lock" not in str(err).lower():
            raise ExportError(f"{db}: cannot be opened ({' '.join(str(err).split())[:160]})") from None
        raise ExportError(
            f"{db}: the running app holds this database (DuckDB allows one process); export from it instead: "
            "python -m feedback_store.export --url http://<app>:7860 --out ..."
        ) from None
    with store:
        return export_snapshot(
            store,
            args.out,
            args.since,
            images=not args.no_images,
            include_excluded=args.include_excluded,
            eval_fraction=args.eval_fraction,
            quarantine_s=args.quarantine_s,
            image_format=args.image_format,
        )


if __name__ == "__main__":
    sys.exit(main())
