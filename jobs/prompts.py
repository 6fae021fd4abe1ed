"""Prompts for the arena: a curated pool (by category) and validation of typed prompts.

The blocklist is a plain text file (one word or phrase per line, `#` comments) re-read whenever its modification
time changes, so moderators edit it without a redeploy. It is bounded (MAX_BLOCKLIST_BYTES, MAX_BLOCKLIST_TERMS,
MAX_TERM_WORDS words per phrase) and matched by looking the prompt's words up in a set: the time is linear in the
prompt's length whatever the list's size. Words are runs of letters and digits, and every other non-space character
is a word of its own, so "f*ck" matches "f*ck" but not "fuck"; matching ignores case and spacing. A model-specific
validator (the shapes grammar for the embedded model) can be plugged in; its error message is shown to the rater as
is.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_PROMPT_CHARS = 300
POOL_FILE = Path(__file__).with_name("prompt_pool.json")
logger = logging.getLogger(__name__)


class PromptRejected(ValueError):
    """A typed prompt that cannot be used; `code` is machine-readable, the message is for the rater."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PoolPrompt:
    text: str
    category: str


MAX_BLOCKLIST_BYTES = 256 * 1024
MAX_BLOCKLIST_TERMS = 20_000
MAX_TERM_WORDS = 8
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> tuple[str, ...]:
    """Lower-cased words: runs of letters/digits, and each other non-space character alone."""
    return tuple(_WORD_RE.findall(text.lower()))


def parse_blocklist(text: object) -> tuple[str, ...]:
    """The terms of a blocklist file's text (one per line, `#` starts a comment); raises ValueError when the text is
    not a string or is over the bounds, with the bound and how to get under it."""
    if not isinstance(text, str):
        raise ValueError(f"The blocklist must be text (one word or phrase per line), not {type(text).__name__}.")
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_BLOCKLIST_BYTES:
        raise ValueError(
            f"The blocklist has {size} bytes; the limit is {MAX_BLOCKLIST_BYTES}. Keep whole words, drop variants."
        )
    lines = (ln.split("#", 1)[0].strip().lower() for ln in text.splitlines())
    terms = tuple(dict.fromkeys(t for t in lines if t))
    if len(terms) > MAX_BLOCKLIST_TERMS:
        raise ValueError(f"The blocklist has {len(terms)} terms; the limit is {MAX_BLOCKLIST_TERMS}.")
    long = next((t for t in terms if len(words(t)) > MAX_TERM_WORDS), None)
    if long is not None:
        raise ValueError(f"The blocklist phrase {long[:60]!r} has more than {MAX_TERM_WORDS} words; shorten it.")
    return terms


class Blocklist:
    """Case-insensitive whole-word/phrase blocklist backed by a file, hot-reloaded on change (module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._terms: tuple[str, ...] = ()
        self._phrases: frozenset[tuple[str, ...]] = frozenset()  # each term as a tuple of words
        self._lengths: tuple[int, ...] = ()  # the distinct phrase lengths, at most MAX_TERM_WORDS of them
        self._lock = threading.Lock()

    def _load(self) -> None:
        mtime = self.path.stat().st_mtime_ns if self.path.exists() else None
        if mtime == self._mtime:
            return
        text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else ""
        try:
            terms = parse_blocklist(text)
        except ValueError as err:  # edited by hand past the bounds: keep the bounded head, say so
            logger.warning("blocklist %s: %s Only its first terms are used.", self.path, err)
            head = text.encode("utf-8")[:MAX_BLOCKLIST_BYTES].decode("utf-8", "ignore")
            lines = (ln.split("#", 1)[0].strip().lower() for ln in head.splitlines())
            terms = tuple(t for t in dict.fromkeys(lines) if t and len(words(t)) <= MAX_TERM_WORDS)
            terms = terms[:MAX_BLOCKLIST_TERMS]
        phrases = frozenset(w for w in map(words, terms) if w)
        self._terms, self._phrases, self._mtime = terms, phrases, mtime
        self._lengths = tuple(sorted({len(w) for w in phrases}))

    def terms(self) -> tuple[str, ...]:
        with self._lock:
            self._load()
            return self._terms

    def write(self, text: str) -> None:
        """Replace the file (atomically); raises ValueError, writing nothing, when `text` is over the bounds."""
        parse_blocklist(text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.path)

    def match(self, prompt: str) -> str | None:
        """The first blocked word or phrase in `prompt`, or None: at each word, one set lookup per distinct phrase
        length (at most MAX_TERM_WORDS), so the cost is linear in the prompt and does not grow with the list."""
        with self._lock:
            self._load()
            phrases, lengths = self._phrases, self._lengths
        seq = words(prompt)
        for i in range(len(seq)):
            for n in lengths:
                if seq[i : i + n] in phrases:
                    return " ".join(seq[i : i + n])
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
