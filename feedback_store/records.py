"""Records, vocabularies, input checks and errors of the preference store.

Every record the store returns is a frozen dataclass defined here. All times are naive UTC datetimes (DuckDB
TIMESTAMP), the vocabulary of DESIGN.md holds: left/right exist only in `Pair` and `Vote`; everything downstream of
the store speaks prompt/chosen/rejected (`PreferencePair`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

Outcome = Literal["left", "right", "tie", "both_bad"]
PairKind = Literal["on_policy", "cross_version", "control"]
PromptSource = Literal["pool", "typed"]
RaterStatus = Literal["active", "shadow_excluded", "deleted"]
Side = Literal["left", "right"]
AdapterStatus = Literal["candidate", "published", "rejected", "retired", "rolled_back"]
RunStatus = Literal["running", "succeeded", "failed", "cancelled"]

OUTCOMES: tuple[str, ...] = get_args(Outcome)
PAIR_KINDS: tuple[str, ...] = get_args(PairKind)
PROMPT_SOURCES: tuple[str, ...] = get_args(PromptSource)
RATER_STATUSES: tuple[str, ...] = get_args(RaterStatus)
ADAPTER_STATUSES: tuple[str, ...] = get_args(AdapterStatus)
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
BASE_VERSION = "base"

# Input limits (refusals name them so a client knows how to fix its request).
MAX_REASONS = 8
MAX_REASON_CHARS = 200
MAX_REASONS_BYTES = 1024
MAX_PROMPT_CHARS = 1000
MAX_TIME_TO_VOTE_MS = 24 * 3600 * 1000
# Identifiers (rater pseudonyms, sessions, adapter versions) are plain tokens: an e-mail address, an IP address or a
# user agent cannot pass this pattern, so none can be stored by mistake in an identifier column.
IDENT_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9_\-.]{1,128}$")
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class InputRejected(ValueError):
    """A refused input. `reason_code` is a stable machine-readable code; the message says what and how to fix."""

    def __init__(self, reason_code: str, message: str) -> None:
        super().__init__(f"[{reason_code}] {message}")
        self.reason_code = reason_code
        self.message = message


class VoteRejected(InputRejected):
    """`record_vote` refused the vote; nothing in the store changed. Codes: see `VOTE_REJECTION_CODES`."""


VOTE_REJECTION_CODES = (
    "unknown_token",  # forged, mistyped or never issued
    "wrong_session",  # the pair was issued to another session
    "expired",  # the pair's ttl passed before this (first) vote
    "conflicting_vote",  # the pair already has a different vote (other outcome or rater)
    "invalid_outcome",
    "invalid_reasons",
    "reasons_too_large",
    "invalid_text",  # non-UTF-8 bytes, lone surrogates, control or bidi-override characters
    "invalid_session",
    "invalid_time_to_vote",
    "unknown_rater",  # call ensure_rater() first
    "rater_deleted",
)


class StoreClosed(RuntimeError):
    """The store was closed; open a new FeedbackStore."""


def first(result: Any) -> tuple | None:
    """The first row of a DuckDB query result, or None. Reads the result to its end: in DuckDB 2.0 a result left
    unfinished (e.g. after fetchone()) keeps its transaction open on that cursor, which blocks CHECKPOINT (the WAL
    then grows without bound) and pins old row versions."""
    rows = result.fetchall()
    return rows[0] if rows else None


def utcnow() -> datetime:
    """Now as a naive UTC datetime (the store's time convention)."""
    return datetime.now(UTC).replace(tzinfo=None)


def as_utc_naive(when: datetime | None) -> datetime:
    """None -> now; aware -> converted to UTC; naive -> taken as UTC already."""
    if when is None:
        return utcnow()
    if not isinstance(when, datetime):
        raise TypeError(f"expected a datetime, got {type(when).__name__}")
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo is not None else when


def pseudonymize(raw_id: str, salt: str | bytes) -> str:
    """Salted pseudonym for a raw identity (HF user name, session): HMAC-SHA256, first 32 hex chars, prefixed "r_".

    The raw id never reaches the store; keep the salt secret (an entry point reads it from the environment) and stable,
    or the same person gets a new pseudonym.
    """
    key = salt.encode() if isinstance(salt, str) else salt
    if len(key) < 16:
        raise ValueError("salt must be at least 16 bytes; generate one with secrets.token_hex(16) and keep it secret")
    return "r_" + hmac.new(key, raw_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def clean_text(value: object, what: str, max_chars: int, code: str = "invalid_text") -> str:
    """Strict text check: str or UTF-8 bytes, no control, surrogate or bidi-override characters, at most max_chars."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputRejected(code, f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(value, str):
        raise InputRejected(code, f"{what} must be text, got {type(value).__name__}")
    for ch in value:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs") or ch in _BIDI_CONTROLS:
            raise InputRejected(code, f"{what} contains a forbidden character U+{ord(ch):04X}; send plain text")
    if len(value) > max_chars:
        raise InputRejected(code, f"{what} has {len(value)} characters; at most {max_chars} are allowed")
    return value


def check_ident(value: object, what: str, code: str = "invalid_text", pattern: re.Pattern = IDENT_RE) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InputRejected(code, f"{what} must match {pattern.pattern} (got {value!r:.60}); pass a pseudonym/id")
    return value


def check_choice(value: object, allowed: Sequence[str], what: str, code: str = "invalid_value") -> str:
    if value not in allowed:
        raise InputRejected(code, f"{what} must be one of {list(allowed)}, got {value!r:.60}")
    return str(value)


@dataclass(frozen=True)
class Rater:
    pseudonym: str
    created: datetime
    trust: float = 1.0
    status: RaterStatus = "active"
    status_reason: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.status, RATER_STATUSES, "Rater.status")
        if not 0.0 <= self.trust <= 1.0:
            raise ValueError(f"Rater.trust must be in [0, 1], got {self.trust}")


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    text: str
    source: PromptSource
    category: str | None
    created: datetime


@dataclass(frozen=True)
class Generation:
    """One stored image and its full lineage. `path` is relative to the store's data dir."""

    image_id: int
    prompt_id: int
    path: str
    sha256: str
    base_model: str
    adapter_version: str
    seed: int
    scheduler: str
    steps: int
    guidance: float
    width: int
    height: int
    created: datetime

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"Generation.sha256 must be 64 lowercase hex chars, got {self.sha256!r}")
        if self.steps < 1 or self.width < 1 or self.height < 1:
            raise ValueError("Generation.steps, width and height must be positive")


@dataclass(frozen=True)
class Pair:
    pair_id: int
    prompt_id: int
    left_image_id: int
    right_image_id: int
    left_version: str
    right_version: str
    kind: PairKind
    session: str
    issued_at: datetime
    expires_at: datetime
    control_bad_side: Side | None = None


@dataclass(frozen=True)
class PairSpec:
    """A pair to issue (FeedbackStore.issue_pairs); checked against the images when issued."""

    prompt_id: int
    left_image_id: int
    right_image_id: int
    kind: PairKind
    session: str
    control_bad_side: Side | None = None


@dataclass(frozen=True)
class IssuedPair:
    """What the UI keeps for a shown pair: the id and the bearer token that authorises its one vote."""

    pair_id: int
    token: str = field(repr=False)
    expires_at: datetime | None = None


@dataclass(frozen=True)
class VoteReceipt:
    """The acknowledgement of a committed vote; a repeat of the same vote returns an equal receipt."""

    vote_id: int
    pair_id: int
    outcome: Outcome
    chosen_image_id: int | None
    rejected_image_id: int | None
    left_version: str
    right_version: str
    control_passed: bool | None
    created: datetime


@dataclass(frozen=True)
class Vote:
    vote_id: int
    pair_id: int
    rater: str
    session: str
    outcome: Outcome
    reasons: tuple[str, ...]
    time_to_vote_ms: int | None
    created: datetime
    kind: PairKind
    control_passed: bool | None
    excluded_reason: str | None

    def __post_init__(self) -> None:
        check_choice(self.outcome, OUTCOMES, "Vote.outcome")


@dataclass(frozen=True)
class PreferencePair:
    """A strict preference, the unit of training: prompt, chosen image, rejected image."""

    vote_id: int
    pair_id: int
    prompt_id: int
    prompt: str
    chosen: Generation
    rejected: Generation
    rater: str
    created: datetime


@dataclass(frozen=True)
class Comparison:
    """One cross-version vote as the statistics see it: score_a is 1 (a won), 0.5 (tie) or 0 (b won)."""

    vote_id: int
    version_a: str
    version_b: str
    score_a: float
    created: datetime


@dataclass(frozen=True)
class AdapterVersion:
    version: str
    parent: str | None
    snapshot_id: str | None
    metrics: dict
    status: AdapterStatus
    created: datetime


@dataclass(frozen=True)
class TrainingRun:
    run_id: int
    adapter_version: str | None
    parent_version: str | None
    snapshot_id: str | None
    config: dict
    status: RunStatus
    reason: str | None
    metrics: dict
    started: datetime
    finished: datetime | None


@dataclass(frozen=True)
class SnapshotRecord:
    snapshot_id: str
    parent: str | None
    since_vote_id: int
    vote_id_max: int
    rows_train: int
    rows_eval: int
    path: str
    created: datetime
