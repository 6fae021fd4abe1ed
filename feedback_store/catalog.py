"""Prompts and images: the catalogue that pairs are built from (every image row carries its full lineage)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from feedback_store.queries import IMAGE_COLS
from feedback_store.records import (
    MAX_PROMPT_CHARS,
    PROMPT_SOURCES,
    VERSION_RE,
    Generation,
    InputRejected,
    Prompt,
    check_choice,
    check_ident,
    clean_text,
    first,
    utcnow,
)


class CatalogMixin:
    """Mixed into FeedbackStore; relies on its `_cur()`, `_write()`, `data_dir` and `_images` (image cache)."""

    _cur: Any
    _write: Any
    _images: dict[int, Generation]
    data_dir: Path | None

    def add_prompt(self, text: str, source: str = "pool", category: str | None = None) -> int:
        """Store a prompt (pool: curated; typed: a rater's own) and return its id; the same text returns the same id."""
        text = clean_text(text, "prompt", MAX_PROMPT_CHARS, code="invalid_prompt").strip()
        if not text:
            raise InputRejected("invalid_prompt", "prompt is empty; type a description of the image")
        check_choice(source, PROMPT_SOURCES, "source")
        category = None if category is None else clean_text(category, "category", 100)
        with self._write() as cur:
            cur.execute(
                "INSERT INTO prompts (text, source, category, created) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [text, source, category, utcnow()],
            )
            return int(first(cur.execute("SELECT prompt_id FROM prompts WHERE text = ?", [text]))[0])

    def prompt(self, prompt_id: int) -> Prompt | None:
        sql = "SELECT prompt_id, text, source, category, created FROM prompts WHERE prompt_id = ?"
        row = first(self._cur().execute(sql, [prompt_id]))
        return Prompt(*row) if row else None

    def add_image(
        self,
        prompt_id: int,
        path: str | Path,
        *,
        base_model: str,
        seed: int,
        scheduler: str,
        steps: int,
        guidance: float,
        width: int,
        height: int,
        adapter_version: str = "base",
        sha256: str | None = None,
    ) -> int:
        """Record a generated image (its file already written under data_dir) with its lineage; returns image_id.
        sha256 is computed from the file when not given."""
        rel = self._relative(path)
        if sha256 is None:
            if self.data_dir is None:
                raise ValueError("pass sha256=... or open the store with data_dir=... so the image can be hashed")
            sha256 = hashlib.sha256((self.data_dir / rel).read_bytes()).hexdigest()
        if self.prompt(prompt_id) is None:
            raise InputRejected("unknown_prompt", f"prompt_id {prompt_id} does not exist; call add_prompt() first")
        check_ident(adapter_version, "adapter_version", code="invalid_version", pattern=VERSION_RE)
        fields = dict(prompt_id=prompt_id, path=rel, sha256=sha256, base_model=base_model)
        fields |= dict(adapter_version=adapter_version, seed=int(seed), scheduler=scheduler, steps=int(steps))
        fields |= dict(guidance=float(guidance), width=int(width), height=int(height), created=utcnow())
        Generation(image_id=0, **fields)  # validates
        with self._write() as cur:
            sql = (
                f"INSERT INTO images ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))}) RETURNING image_id"
            )
            row = first(cur.execute(sql, list(fields.values())))
        return int(row[0])

    def _relative(self, path: str | Path) -> str:
        p = Path(path)
        if p.is_absolute():
            if self.data_dir is None or not p.resolve().is_relative_to(self.data_dir):
                raise ValueError(f"image path {p} is not under the data dir {self.data_dir}; write images there")
            p = p.resolve().relative_to(self.data_dir)
        if ".." in p.parts:
            raise ValueError(f"image path {p} must not contain '..'")
        return p.as_posix()

    def image(self, image_id: int) -> Generation | None:
        cached = self._images.get(image_id)
        if cached is not None:
            return cached
        row = first(self._cur().execute(f"SELECT {IMAGE_COLS} FROM images WHERE image_id = ?", [image_id]))
        if row is None:
            return None
        if len(self._images) >= 10_000:  # image rows are immutable, so any cached one stays right; just bound it
            self._images.clear()
        self._images[image_id] = Generation(*row)
        return self._images[image_id]
