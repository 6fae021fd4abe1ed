"""Writing an export snapshot: `export_snapshot(store, out_dir)` reads the votes through the store's connection and
writes `<out>/<snapshot_id>/` (train.parquet, eval.parquet, manifest.json) with pyarrow, never modified after it
appears. The format, the split and the CLI are described in feedback_store/export.py, the module researchers call.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from feedback_store.records import SnapshotRecord, as_utc_naive
from feedback_store.schema import SCHEMA_VERSION
from feedback_store.store import FeedbackStore

log = logging.getLogger(__name__)

EXPORT_FORMAT = "ncp-arena-preferences"
EXPORT_VERSION = 1
# Parquet row groups: at most this many rows, and (with images) about this many bytes, so memory stays bounded
# whether the images are 1 KB shapes or 1.5 MB SDXL PNGs. Images are read 64 rows at a time.
ROW_GROUP_ROWS = 65536
ROW_GROUP_BYTES = 64 << 20

_IMAGE_FIELDS = ("adapter_version", "base_model", "seed", "scheduler", "steps", "guidance", "width", "height")
_SQL = f"""
SELECT q.text AS caption,
    CASE v.outcome WHEN 'left' THEN 1.0 WHEN 'right' THEN 0.0 ELSE 0.5 END::DOUBLE AS label_0,
    CASE v.outcome WHEN 'left' THEN 0.0 WHEN 'right' THEN 1.0 ELSE 0.5 END::DOUBLE AS label_1,
    l.sha256 AS image_0_uid, x.sha256 AS image_1_uid,
    CASE v.outcome WHEN 'left' THEN l.sha256 WHEN 'right' THEN x.sha256 ELSE '' END AS best_image_uid,
    v.outcome <> 'both_bad' AS has_label, l.sha256 <> x.sha256 AS are_different, v.created AS created_at,
    CASE WHEN l.adapter_version = 'base' THEN l.base_model ELSE l.base_model || '+' || l.adapter_version END AS model_0,
    CASE WHEN x.adapter_version = 'base' THEN x.base_model ELSE x.base_model || '+' || x.adapter_version END AS model_1,
    v.vote_id::BIGINT AS ranking_id, count(*) OVER (PARTITION BY q.text)::BIGINT AS num_example_per_prompt,
    NULL::VARCHAR AS image_0_url, NULL::VARCHAR AS image_1_url,
    v.vote_id, v.pair_id, p.prompt_id, q.category, q.source AS prompt_source, v.rater, v.outcome, p.kind,
    (v.excluded_reason IS NOT NULL OR r.status <> 'active' OR p.kind = 'control') AS excluded,
    coalesce(v.excluded_reason, CASE WHEN r.status <> 'active' THEN 'rater_' || r.status END) AS excluded_reason,
    v.outcome = 'both_bad' AS both_bad, v.control_passed, v.time_to_vote_ms,
    {", ".join(f"l.{c} AS {c}_0, x.{c} AS {c}_1" for c in _IMAGE_FIELDS)},
    l.path AS _path_0, x.path AS _path_1
FROM votes v JOIN pairs p ON p.pair_id = v.pair_id JOIN raters r ON r.pseudonym = v.rater
JOIN prompts q ON q.prompt_id = p.prompt_id
JOIN images l ON l.image_id = p.left_image_id JOIN images x ON x.image_id = p.right_image_id
WHERE v.vote_id > ? AND v.vote_id <= ? AND r.status <> 'deleted'
"""
_USABLE = " AND v.excluded_reason IS NULL AND r.status = 'active' AND p.kind <> 'control'"


@dataclass(frozen=True)
class Snapshot:
    snapshot_id: str
    path: Path
    manifest: dict

    @property
    def files(self) -> dict[str, Path]:
        return {name: self.path / name for name in self.manifest["files"]}


def eval_mask(captions: pa.Array, eval_fraction: float) -> pa.Array:
    """True where a caption belongs to the eval split (deterministic, prompt-disjoint; see feedback_store/export.py)."""
    unique = pc.unique(captions).to_pylist()
    chosen = [c for c in unique if _fraction(c) < eval_fraction]
    return pc.is_in(captions, value_set=pa.array(chosen, type=pa.string()))


def _fraction(caption: str) -> float:
    norm = " ".join(caption.casefold().split())
    return int(hashlib.sha256(norm.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_since(store: FeedbackStore, out: Path, since: str | None) -> tuple[int, str | None]:
    if since is None:
        return 0, None
    manifest = out / since / "manifest.json"
    if manifest.is_file():
        return int(json.loads(manifest.read_text())["vote_id_max"]), since
    record = store.snapshot(since)
    if record is None:
        raise FileNotFoundError(f"snapshot {since!r} not found in {out} nor in the store; pass an existing id")
    return record.vote_id_max, since


IMAGE_FORMATS = ("png", "jpeg")


def _encoded(data: bytes, image_format: str) -> bytes:
    """The stored image bytes as they go into jpg_i: as stored (PNG), or re-encoded as JPEG quality 95."""
    if image_format == "png":
        return data
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _user_ids(raters: pa.Array) -> pa.Array:
    """Pick-a-Pic's int64 user_id from the rater pseudonym: the first 60 bits of its sha256 (stable per rater)."""
    ids = {r: int(hashlib.sha256(r.encode()).hexdigest()[:15], 16) for r in pc.unique(raters).to_pylist()}
    return pa.array([ids[r] for r in raters.to_pylist()], type=pa.int64())


def _pickapic_types(table: pa.Table) -> pa.Table:
    """user_id from the rater, created_at as a UTC timestamp (the store keeps naive UTC)."""
    created = table.column("created_at").cast(pa.timestamp("us", tz="UTC"))
    table = table.set_column(table.schema.get_field_index("created_at"), "created_at", created)
    at = table.schema.get_field_index("ranking_id")
    return table.add_column(at + 1, "user_id", _user_ids(table.column("rater").combine_chunks()))


def _with_images(store: FeedbackStore, table: pa.Table, images: bool, image_format: str = "png") -> pa.Table:
    """Attach jpg_0/jpg_1 (file bytes, or nulls when images=False) and drop the internal path columns."""
    cols, blobs = {}, {}
    for i in (0, 1):
        paths = table.column(f"_path_{i}").to_pylist()
        if images:
            if store.data_dir is None:
                raise ValueError("the store has no data_dir, so image files cannot be read; pass images=False")
            for p in paths:
                if p not in blobs:  # an image shown in several pairs is read once per row group
                    try:
                        blobs[p] = _encoded((store.data_dir / p).read_bytes(), image_format)
                    except OSError as err:  # unreadable, or not an image any more (PIL's errors are OSErrors)
                        why = err.strerror or type(err).__name__
                        raise OSError(f"stored image {store.data_dir / p}: {why}") from None
            cols[f"jpg_{i}"] = pa.array([blobs[p] for p in paths], type=pa.binary())
        else:
            cols[f"jpg_{i}"] = pa.nulls(len(paths), type=pa.binary())
    table = table.drop_columns(["_path_0", "_path_1"])
    return table.add_column(1, "jpg_0", cols["jpg_0"]).add_column(2, "jpg_1", cols["jpg_1"])


def _write_groups(
    writer: pq.ParquetWriter, store: FeedbackStore, part: pa.Table, images: bool, image_format: str
) -> None:
    step = 64 if images else ROW_GROUP_ROWS
    buf: list[pa.Table] = []
    for start in range(0, part.num_rows, step):
        buf.append(_with_images(store, part.slice(start, step), images, image_format))
        if sum(t.nbytes for t in buf) >= ROW_GROUP_BYTES or sum(t.num_rows for t in buf) >= ROW_GROUP_ROWS:
            writer.write_table(pa.concat_tables(buf))
            buf = []
    if buf:
        writer.write_table(pa.concat_tables(buf))


def export_snapshot(
    store: FeedbackStore,
    out_dir: str | Path,
    since: str | None = None,
    *,
    images: bool = True,
    include_excluded: bool = False,
    eval_fraction: float = 0.1,
    quarantine_s: float = 0.0,
    now: datetime | None = None,
    image_format: str = "png",
) -> Snapshot:
    """Write one immutable snapshot folder under out_dir and record it in the store (module docstring)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = as_utc_naive(now)
    since_id, parent = _resolve_since(store, out, since)
    cur = store._cur()
    cur.begin()  # one read transaction: the range bound and the rows come from the same state
    try:
        # Up to the first vote still in quarantine (ids are committed in order, so the range has no holes).
        held = cur.execute(
            "SELECT min(vote_id) FROM votes WHERE vote_id > ? AND created > ?",
            [since_id, now - timedelta(seconds=quarantine_s)],
        ).fetchall()[0][0]
        top = cur.execute("SELECT coalesce(max(vote_id), 0) FROM votes").fetchall()[0][0]
        upto = max(since_id, (held - 1) if held is not None else top)
        sql = _SQL + ("" if include_excluded else _USABLE) + " ORDER BY v.vote_id"
        table = _pickapic_types(cur.sql(sql, params=[since_id, upto]).to_arrow_table())
        deleted = [
            r[0] for r in cur.execute("SELECT pseudonym FROM raters WHERE status = 'deleted' ORDER BY 1").fetchall()
        ]
    finally:
        cur.commit()
    base_id = f"{now:%Y%m%dT%H%M%S}Z-v{upto}"
    snapshot_id, n = base_id, 1
    while (out / snapshot_id).exists() or store.snapshot(snapshot_id) is not None:  # ids are unique per store too
        n += 1
        snapshot_id = f"{base_id}-{n}"
    tmp = out / f".{snapshot_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        is_eval = eval_mask(table.column("caption"), eval_fraction)
        parts = {"train": table.filter(pc.invert(is_eval)), "eval": table.filter(is_eval)}
        files, schema = {}, None
        for split, part in parts.items():
            path = tmp / f"{split}.parquet"
            schema = _with_images(store, part.slice(0, 0), images, image_format).schema
            with pq.ParquetWriter(path, schema, compression="zstd") as writer:
                _write_groups(writer, store, part, images, image_format)
            files[path.name] = {"rows": part.num_rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        vote_ids = table.column("vote_id")
        manifest = {
            "format": EXPORT_FORMAT,
            "export_version": EXPORT_VERSION,
            "db_schema_version": SCHEMA_VERSION,
            "snapshot_id": snapshot_id,
            "parent_snapshot": parent,
            "created": now.isoformat() + "Z",
            "since_vote_id": since_id,
            "vote_id_min": since_id + 1,
            "vote_id_max": upto,
            "exported_vote_ids": [pc.min(vote_ids).as_py(), pc.max(vote_ids).as_py()],
            "rows": {"train": parts["train"].num_rows, "eval": parts["eval"].num_rows, "total": table.num_rows},
            "files": files,
            "images": images,
            "image_format": image_format,
            "include_excluded": include_excluded,
            "quarantine_s": quarantine_s,
            "split": {"eval_fraction": eval_fraction, "rule": "sha256(casefold+collapse-spaces(caption))[:8]/2^32"},
            "labels": "label_0=1: image 0 (left) chosen; 0.5/0.5: tie or both_bad (has_label false for both_bad)",
            "columns": schema.names if schema is not None else [],
            "deleted_raters": deleted,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o444)
        os.rename(tmp, out / snapshot_id)  # atomic: a snapshot folder is complete or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rows = manifest["rows"]
    record = SnapshotRecord(
        snapshot_id, parent, since_id, upto, rows["train"], rows["eval"], str(out / snapshot_id), now
    )
    store.record_snapshot(record)
    log.info("exported snapshot %s: %d train + %d eval rows", snapshot_id, rows["train"], rows["eval"])
    return Snapshot(snapshot_id, out / snapshot_id, manifest)
