"""Shared builders for the feedback_store tests: a store with a prompt, images of two versions and real PNG files."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from feedback_store import FeedbackStore


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class World:
    store: FeedbackStore
    prompt_id: int
    base_img: int  # adapter_version "base"
    base_img2: int  # a second base image (on_policy pairs)
    v1_img: int  # adapter_version "v1"


def add_png(
    store: FeedbackStore, prompt_id: int, name: str, color: tuple[int, int, int], version: str, seed: int
) -> int:
    """Write a real PNG under the store's data dir and register it (sha256 computed by the store)."""
    assert store.data_dir is not None
    path = store.data_dir / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return store.add_image(
        prompt_id,
        path,
        base_model="shapes-base",
        adapter_version=version,
        seed=seed,
        scheduler="ddim",
        steps=20,
        guidance=4.0,
        width=8,
        height=8,
    )


def make_world(store: FeedbackStore, prompt: str = "a large red circle on the left, gray background") -> World:
    pid = store.add_prompt(prompt, "pool", "shapes")
    tag = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return World(
        store=store,
        prompt_id=pid,
        base_img=add_png(store, pid, f"{tag}-b0.png", (200, 10, 10), "base", 1),
        base_img2=add_png(store, pid, f"{tag}-b1.png", (190, 20, 10), "base", 2),
        v1_img=add_png(store, pid, f"{tag}-v1.png", (250, 0, 0), "v1", 3),
    )


def fast_images(store: FeedbackStore, prompt_id: int, versions: tuple[str, ...]) -> dict[str, int]:
    """Image rows without files (sha256 given), one per version: for tests that never read pixels."""
    out = {}
    for i, v in enumerate(versions):
        out[v] = store.add_image(
            prompt_id,
            f"images/p{prompt_id}-{v}.png",
            base_model="shapes-base",
            adapter_version=v,
            seed=i,
            scheduler="ddim",
            steps=20,
            guidance=4.0,
            width=8,
            height=8,
            sha256=hashlib.sha256(f"{prompt_id}-{v}".encode()).hexdigest(),
        )
    return out


def table_state(store: FeedbackStore) -> tuple:
    """Everything a refused call must leave unchanged: table counts and the full votes/pairs/raters content."""
    cur = store._cur()
    return (
        store.counts(),
        cur.execute("SELECT * FROM votes ORDER BY vote_id").fetchall(),
        cur.execute("SELECT * FROM pairs ORDER BY pair_id").fetchall(),
        cur.execute("SELECT * FROM raters ORDER BY pseudonym").fetchall(),
    )


def root() -> Path:
    return Path(__file__).resolve().parents[1]
