"""Client-supplied idempotency for `POST /api/create-checkout-session`: the rules, pure.

The shop sends an `Idempotency-Key` header (a UUID per checkout attempt is ideal) and may retry the
request as often as it likes: a double click, a timeout, a reload. The first request with a key
*claims* it (a row in `checkout_idempotency_keys`); what happens to a later request with the same key:

    the claim completed, same request          → REPLAY the stored answer (no Zendit, no Stripe call)
    the claim completed, another request       → MISMATCH (422)
    the claim still running, same request      → IN_PROGRESS (409, Retry-After): Stripe's own answer
    the claim still running, another request   → MISMATCH (422)
    the claim's lease expired (its process died
    mid-way, since a live attempt gives up before
    its lease runs out)                         → TAKE_OVER: the crashed attempt counts as failed
    the claim completed more than
    KEY_RETENTION_SECONDS ago, any request      → EXPIRED: the key is free again, claimed anew

A failed attempt deletes its claim, so a failure never burns a key. Completed keys are deleted once
older than KEY_RETENTION_SECONDS, a few at a time by later claims (no scheduler needed).
"Same request" means the same fingerprint: the sha256 of the validated, canonical request (whitespace
trimmed, unknown fields dropped, keys sorted), so a retry that re-serialises the JSON differently is
still the same request.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from enum import StrEnum

HEADER = "Idempotency-Key"
# Stripe's limit. Printable ASCII only (space to tilde): it is stored and compared byte for byte, and
# HTTP header values outside ASCII arrive in whatever encoding the client happened to use.
MAX_KEY_LENGTH = 255
# Stripe prunes its idempotency keys after 24 h, and a Checkout Session expires 24 h after it is created
# (Stripe's default): a replay any later would hand the shopper a dead Checkout URL.
KEY_RETENTION_SECONDS = 24 * 60 * 60
_KEY_RE = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_LENGTH}}}")
KEY_RULE = f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"


class InvalidIdempotencyKey(ValueError):
    pass


def check_key(value: str) -> str:
    """The key as given, or InvalidIdempotencyKey (the shop gets a 400 saying what a key must be)."""
    if not _KEY_RE.fullmatch(value):
        raise InvalidIdempotencyKey(KEY_RULE)
    return value


def request_fingerprint(endpoint: str, fields: Mapping[str, object]) -> str:
    """sha256 (hex) of the canonical request: the endpoint and its validated fields, keys sorted."""
    canonical = json.dumps(
        {"endpoint": endpoint, "request": dict(fields)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Verdict(StrEnum):
    REPLAY = "replay"
    MISMATCH = "mismatch"
    IN_PROGRESS = "in_progress"
    TAKE_OVER = "take_over"
    EXPIRED = "expired"


def judge(
    *, same_request: bool, completed: bool, lease_expired: bool, answer_expired: bool = False
) -> Verdict:
    """What to do with a request whose key is already claimed (see the table above).

    `answer_expired`: the claim completed more than KEY_RETENTION_SECONDS ago."""
    if completed and answer_expired:
        return Verdict.EXPIRED
    if completed:
        return Verdict.REPLAY if same_request else Verdict.MISMATCH
    if lease_expired:
        return Verdict.TAKE_OVER
    return Verdict.IN_PROGRESS if same_request else Verdict.MISMATCH
