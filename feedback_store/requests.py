"""The checks a pair or vote request passes before it joins a write group, in the caller's thread (no database).

`prepare_pair` and `prepare_vote` validate their inputs (raising InputRejected / VoteRejected with a reason code) and
return a `PairRequest` / `VoteRequest` that feedback_store/voting.py's group-commit leader inserts; `token_hash` is how
a pair token is stored (its sha256 only).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from feedback_store.records import (
    MAX_REASON_CHARS,
    MAX_REASONS,
    MAX_REASONS_BYTES,
    MAX_TIME_TO_VOTE_MS,
    OUTCOMES,
    PAIR_KINDS,
    Generation,
    InputRejected,
    IssuedPair,
    VoteReceipt,
    VoteRejected,
    as_utc_naive,
    check_choice,
    check_ident,
    clean_text,
)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class PairRequest:
    prompt_id: int
    left_image_id: int
    right_image_id: int
    left_version: str
    right_version: str
    kind: str
    session: str
    token: str
    issued_at: datetime
    expires_at: datetime
    control_bad_side: str | None
    done: bool = False
    result: IssuedPair | None = None
    error: BaseException | None = None


@dataclass
class VoteRequest:
    token_sha256: str
    session: str
    outcome: str
    rater: str
    reasons: tuple[str, ...]
    time_to_vote_ms: int | None
    now: datetime
    excluded_reason: str | None = None  # stored flagged from the start (e.g. "too_fast"): never trained on
    done: bool = False
    result: VoteReceipt | None = None
    error: BaseException | None = None


def prepare_vote(
    token: object,
    session: object,
    outcome: object,
    rater: str,
    reasons: Sequence[str | bytes],
    time_to_vote_ms: int | None,
    now: datetime | None,
    excluded_reason: str | None = None,
) -> VoteRequest:
    """The checks that need no database. Raises VoteRejected with the reason code."""
    if not isinstance(token, str) or not 16 <= len(token) <= 128:
        raise VoteRejected("unknown_token", "the pair token is not one this server issued; request a new pair")
    try:
        check_ident(session, "session", code="invalid_session")
    except InputRejected as e:
        raise VoteRejected(e.reason_code, e.message) from None
    if outcome not in OUTCOMES:
        raise VoteRejected("invalid_outcome", f"outcome must be one of {list(OUTCOMES)}, got {outcome!r:.40}")
    if isinstance(reasons, str | bytes) or not isinstance(reasons, Sequence):
        raise VoteRejected("invalid_reasons", "reasons must be a list of short strings, e.g. ['artifacts']")
    if len(reasons) > MAX_REASONS:
        raise VoteRejected("reasons_too_large", f"{len(reasons)} reasons given; at most {MAX_REASONS} are allowed")
    cleaned: list[str] = []
    for i, reason in enumerate(reasons):
        try:
            text = clean_text(reason, f"reasons[{i}]", max_chars=10 * MAX_REASON_CHARS)
        except InputRejected as e:
            raise VoteRejected(e.reason_code, e.message) from None
        if len(text) > MAX_REASON_CHARS:
            raise VoteRejected(
                "reasons_too_large", f"reasons[{i}] has {len(text)} characters; at most {MAX_REASON_CHARS} allowed"
            )
        cleaned.append(text)
    if sum(len(r.encode("utf-8")) for r in cleaned) > MAX_REASONS_BYTES:
        raise VoteRejected("reasons_too_large", f"reasons exceed {MAX_REASONS_BYTES} bytes in total; shorten them")
    if time_to_vote_ms is not None and (
        isinstance(time_to_vote_ms, bool)
        or not isinstance(time_to_vote_ms, int)
        or not 0 <= time_to_vote_ms <= MAX_TIME_TO_VOTE_MS
    ):
        raise VoteRejected(
            "invalid_time_to_vote", f"time_to_vote_ms must be an int in [0, {MAX_TIME_TO_VOTE_MS}] or None"
        )
    if excluded_reason is not None:  # set by the server (jobs/abuse.py), never by a client: a code, not text
        check_ident(excluded_reason, "excluded_reason", code="invalid_excluded_reason")
    return VoteRequest(
        token_sha256=token_hash(token),
        session=str(session),
        outcome=str(outcome),
        rater=rater,
        reasons=tuple(cleaned),
        time_to_vote_ms=time_to_vote_ms,
        now=as_utc_naive(now),
        excluded_reason=excluded_reason,
    )


def prepare_pair(
    prompt_id: int,
    left: Generation | None,
    right: Generation | None,
    kind: str,
    session: str,
    ttl_s: float,
    control_bad_side: str | None,
    now: datetime | None,
) -> PairRequest:
    """Check a pair before it is issued (images exist, belong to the prompt, match the kind) and mint its token."""
    check_choice(kind, PAIR_KINDS, "kind")
    check_ident(session, "session", code="invalid_session")
    if (kind == "control") != (control_bad_side is not None):
        raise ValueError("control_bad_side ('left' or 'right') is required for kind='control' and only then")
    if control_bad_side is not None:
        check_choice(control_bad_side, ("left", "right"), "control_bad_side")
    if left is None or right is None or left.prompt_id != prompt_id or right.prompt_id != prompt_id:
        raise ValueError(f"both images must exist and be generated for prompt {prompt_id} (add_image first)")
    if left.image_id == right.image_id:
        raise ValueError("a pair needs two different images")
    same = left.adapter_version == right.adapter_version
    if (kind == "cross_version" and same) or (kind == "on_policy" and not same):
        raise ValueError(
            f"kind={kind!r} does not match the adapter versions {left.adapter_version!r}, {right.adapter_version!r}: "
            "cross_version needs two different versions, on_policy one"
        )
    issued = as_utc_naive(now)
    if not 0 < ttl_s <= 7 * 24 * 3600:
        raise ValueError(f"ttl_s must be in (0, 604800] seconds, got {ttl_s}")
    return PairRequest(
        prompt_id=prompt_id,
        left_image_id=left.image_id,
        right_image_id=right.image_id,
        left_version=left.adapter_version,
        right_version=right.adapter_version,
        kind=kind,
        session=session,
        token=secrets.token_urlsafe(32),  # unguessable bearer token; only its sha256 is stored
        issued_at=issued,
        expires_at=issued + timedelta(seconds=ttl_s),
        control_bad_side=control_bad_side,
    )
