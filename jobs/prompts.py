"""Prompts for the arena: a curated pool (by category) and validation of typed prompts.

The blocklist is a plain text file (one word or phrase per line, `#` comments) re-read whenever its modification
time changes, so moderators edit it without a redeploy. A model-specific validator (the shapes grammar for the
embedded model) can be plugged in; its error message is shown to the rater as is.
"""

from __future__ import annotations

import json
import random
import re
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_PROMPT_CHARS = 300
POOL_FILE = Path(__file__).with_name("prompt_pool.json")


class PromptRejected(ValueError):
    """A typed prompt that cannot be used; `code` is machine-readable, the message is for the rater."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PoolPrompt:
    text: str
    category: str


class Blocklist:
    """Case-insensitive whole-word/phrase blocklist backed by a file, hot-reloaded on change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._terms: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def terms(self) -> tuple[str, ...]:
        with self._lock:
            mtime = self.path.stat().st_mtime_ns if self.path.exists() else None
            if mtime != self._mtime:
                text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
                lines = (ln.split("#", 1)[0].strip().lower() for ln in text.splitlines())
                self._terms = tuple(t for t in lines if t)
                self._mtime = mtime
            return self._terms

    def write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.path)

    def match(self, prompt: str) -> str | None:
        low = prompt.lower()
        for term in self.terms():
            if re.search(rf"(?<!\w){re.escape(term)}(?!\w)", low):
                return term
        return None


def validate_prompt(
    text: object, blocklist: Blocklist | None = None, model_check: Callable[[str], None] | None = None
) -> str:
    """Return the normalised prompt or raise PromptRejected with a reason the rater can act on."""
    if not isinstance(text, str):
        raise PromptRejected("not_text", "The prompt must be text.")
    if "\x00" in text or any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in "\t\n" for ch in text):
        raise PromptRejected("control_chars", "The prompt contains control characters; type plain text.")
    text = " ".join(text.split())
    if not text:
        raise PromptRejected("empty", "The prompt is empty; type a description or leave it blank for a pool prompt.")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptRejected("too_long", f"The prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}.")
    if blocklist is not None and blocklist.match(text) is not None:
        raise PromptRejected("blocked", "This prompt is not allowed in the arena; please try another one.")
    if model_check is not None:
        try:
            model_check(text)
        except ValueError as err:
            raise PromptRejected("model_grammar", str(err)) from err
    return text


def load_pool(path: Path = POOL_FILE) -> list[PoolPrompt]:
    data = json.loads(Path(path).read_text())
    return [PoolPrompt(p, cat) for cat, prompts in data.items() for p in prompts]


class PromptPool:
    """Draws pool prompts over categories (uniformly, or by `weights`), then uniformly within the category."""

    def __init__(self, prompts: list[PoolPrompt], weights: dict[str, float] | None = None) -> None:
        if not prompts:
            raise ValueError("The prompt pool is empty.")
        self.by_category: dict[str, list[str]] = {}
        for p in prompts:
            self.by_category.setdefault(p.category, []).append(p.text)
        self._category_of = {p.text: p.category for p in prompts}
        self.weights = dict(weights or {})
        unknown = sorted(set(self.weights) - set(self.by_category))
        if unknown or any(not (w >= 0) for w in self.weights.values()) or (weights and not sum(self.weights.values())):
            raise ValueError(f"Category weights must be >= 0 with a positive sum over known categories, got "
                             f"{self.weights} (unknown: {unknown}; categories: {sorted(self.by_category)}).")  # fmt: skip

    def draw(self, rng: random.Random) -> str:
        cats = sorted(self.by_category)
        if self.weights:
            cat = rng.choices(cats, weights=[self.weights.get(c, 0.0) for c in cats])[0]
        else:
            cat = rng.choice(cats)
        return rng.choice(self.by_category[cat])

    def category(self, text: str) -> str:
        return self._category_of.get(text, "typed")

    def __len__(self) -> int:
        return len(self._category_of)
